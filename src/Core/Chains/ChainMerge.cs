using System.Collections.Concurrent;
using BitmapBackup.Core.Digests;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Testing;

namespace BitmapBackup.Core.Chains;

/*
 * Chain retention (Merge-BackupChain): a chain I0 <- I1 <- ... <- Im-1 (base first, Im-1 the top) keeps at most n
 * images (-Keep n), or is flattened into a new standalone image (-Into).
 *
 * Which name survives. -Keep n merges I0..Ik, k = m - n, into one standalone image that takes the place of Ik: the
 * image then holds what the chain read as of Ik's point in time, which is what Ik stood for before, so every name
 * still means "the disk at that backup's point in time" (with dated names, "backup-06-03.qcow2" restores June 3rd,
 * before and after), Ik+1 keeps its backing file name, and every digest manifest that stays (Ik's and the newer
 * ones) still describes its backup. This is QEMU's block-stream / qemu-img rebase -b "" applied to Ik, and the same
 * chain as qemu-img commit of I1..Ik into I0 followed by a rebase of Ik+1, without ever writing an image that is in
 * use: the merged image is built beside Ik and swapped in by one rename. -Keep 1 flattens the chain into its top.
 * -Into writes the flattened chain (as of the top) to a new file and leaves the chain as it was.
 *
 * Crash order (-Keep). The chain is opened read-only for the whole copy and switch: every image holds QEMU's reader
 * locks, so no writer (a VM, qemu-io, a node here) can open any of it meanwhile, and an image a writer holds is
 * refused before anything starts.
 *   1. Settle what an earlier crashed merge left (MergeJournal.Recover, stale "<image>.merging" files).
 *   2. Build the merged image as "<Ik>.merging" (a new qcow2 file, writer-locked), flush it (data, then metadata,
 *      fsync), close it.                                       crash: old chain; a ".merging" file nothing reads.
 *   3. Write the journal "<Ik>.merge-journal": the files to delete after the switch (I0..Ik-1 and their manifests,
 *      newest first); fsync, rename, fsync the folder.          crash: old chain; step 1 of the next merge drops
 *                                                               the journal and the ".merging" file (Ik still has a
 *                                                               backing file, so the switch did not happen).
 *   4. Switch: rename "<Ik>.merging" over Ik (atomic: the name is the old file or the new one, never neither), fsync
 *      the folder.                                              crash: new chain (Ik standalone <- Ik+1 ... top);
 *                                                               I0..Ik-1 are still a valid chain ending at Ik-1.
 *   5. Close the old chain; delete the journal's files, newest first (so what remains of the old images is always a
 *      valid shorter chain), fsync the folders.                 crash: new chain; the next merge carries the journal
 *                                                               out (Ik is standalone: the switch happened).
 *   6. Delete the journal.
 * A Stop-Job (cancel) is honoured until the merged image is complete (step 2): the ".merging" file is deleted and
 * the chain is as it was. From step 3 on the merge finishes; the remaining steps are a few renames and deletions.
 * Each step is a CrashPoints point, which the tests kill -9 a child at.
 *
 * -Into: the flattened chain is written to "<into>.partial" and renamed to its name when complete (the folder
 * fsynced), then the top's manifest, if any, is copied beside it as "<into>.digests" (it describes the same content
 * at the same point in time; only the backup file name in its header changes), written the way a backup writes its
 * manifest (".tmp", fsync, rename). A crash leaves no image or the complete one.
 *
 * Refused: -Keep below 1 (InvalidKeepCount); a chain image open for writing, here (ImageInUse naming the node) or
 * by another process (ImageInUse, from the locks); a chain that does not open or whose qcow2 metadata is corrupt
 * (BackupChainBroken); an image to delete that is the backing file of an image outside the chain, in the folders of
 * the images to delete (BackupChainShared); a chain being merged already (ImageInUse).
 */

/// <summary>A chain merge: prepared (chain open, checked, planned), then run on a worker thread.</summary>
public sealed class ChainMerge
{
    /// <summary>Suffix of the merged image while it is built beside the image it replaces.</summary>
    public const string MergingSuffix = ".merging";

    /// <summary>Suffix of a flattened image (-Into) while it is written.</summary>
    public const string PartialSuffix = ".partial";

    private static readonly ConcurrentDictionary<string, byte> s_busy = new(StringComparer.Ordinal);
    private static int s_ids;

    private readonly Lock _lock = new();
    private readonly IBlockImage _top;
    private readonly IReadOnlyList<IBlockImage> _layers;
    private readonly int _mergeIndex;
    private readonly string? _writePath;
    private readonly IReadOnlyList<string> _doomed;
    private readonly IReadOnlyList<(long Offset, long Length)> _ranges;
    private readonly List<string> _reserved;
    private readonly RateLimiter _rate;
    private readonly CancellationTokenSource _cancel = new();
    private readonly TaskCompletionSource _completed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly List<string> _removed = [];
    private readonly List<string> _warnings = [];
    private ChainMergeStatus _status = ChainMergeStatus.Created;
    private BlockException? _error;
    private long _bytesDone;
    private int _started;
    private bool _chainClosed;
    private DateTimeOffset? _ended;

    private ChainMerge(ChainMergeRequest request, string top, IBlockImage image, IReadOnlyList<IBlockImage> layers, int mergeIndex,
        string? mergedPath, IReadOnlyList<string> doomed, IReadOnlyList<(long Offset, long Length)> ranges, IReadOnlyList<string> recovered,
        List<string> reserved)
    {
        Id = $"merge{Interlocked.Increment(ref s_ids)}";
        TopPath = top;
        Keep = request.Keep;
        Into = mergedPath is not null && request.Into is not null ? mergedPath : null;
        _top = image;
        _layers = layers;
        _mergeIndex = mergeIndex;
        MergedImage = mergedPath;
        _writePath = mergedPath is null ? null : mergedPath + (request.Into is null ? MergingSuffix : PartialSuffix);
        _doomed = doomed;
        _ranges = ranges;
        Recovered = recovered;
        _reserved = reserved;
        _rate = new RateLimiter(request.BytesPerSecond);
        ChainBefore = layers.Select(l => l.Path).ToArray();
        ChainAfter = request.Into is not null || mergeIndex < 0
            ? ChainBefore
            : [mergedPath!, .. ChainBefore.Skip(mergeIndex + 1)];
        BytesTotal = ranges.Sum(r => r.Length);
        StartTime = DateTimeOffset.Now;
    }

    #region Properties

    /// <summary>The engine's name for the merge (merge1, merge2, ...).</summary>
    public string Id { get; }

    /// <summary>The top image of the chain.</summary>
    public string TopPath { get; }

    public int? Keep { get; }

    /// <summary>The new image of -Into, or null.</summary>
    public string? Into { get; }

    /// <summary>The chain before the merge, base first.</summary>
    public IReadOnlyList<string> ChainBefore { get; }

    /// <summary>The chain once the merge has completed, base first (the same chain with -Into, or when there is nothing to merge).</summary>
    public IReadOnlyList<string> ChainAfter { get; }

    /// <summary>The image that receives the merged content: the image it replaces (-Keep), the new image (-Into), or null when there is nothing to merge.</summary>
    public string? MergedImage { get; }

    /// <summary>Files deleted before the merge while finishing an earlier merge that a crash interrupted.</summary>
    public IReadOnlyList<string> Recovered { get; }

    /// <summary>Files the merge has deleted (older images and their digest manifests).</summary>
    public IReadOnlyList<string> Removed
    {
        get
        {
            lock (_lock)
                return _removed.ToArray();
        }
    }

    /// <summary>What the merge wants said, but did not stop for (a manifest it could not copy, a folder it could not sync).</summary>
    public IReadOnlyList<string> Warnings
    {
        get
        {
            lock (_lock)
                return _warnings.ToArray();
        }
    }

    /// <summary>Bytes of the chain the copy reads: what the merged images store.</summary>
    public long BytesTotal { get; }

    public long BytesDone => Interlocked.Read(ref _bytesDone);

    public ChainMergeStatus Status
    {
        get
        {
            lock (_lock)
                return _status;
        }
    }

    public BlockException? Error
    {
        get
        {
            lock (_lock)
                return _error;
        }
    }

    public bool Succeeded => Status == ChainMergeStatus.Completed;

    /// <summary>True when the chain was already short enough: the merge changes nothing (beyond finishing an earlier one).</summary>
    public bool NothingToMerge => _mergeIndex < 0;

    public DateTimeOffset StartTime { get; private set; }

    public DateTimeOffset? EndTime
    {
        get
        {
            lock (_lock)
                return _ended;
        }
    }

    /// <summary>Completes when the merge has concluded (completed, failed or cancelled).</summary>
    public Task Completion => _completed.Task;

    /// <summary>Raised once, on the worker thread, when the merge concludes (before <see cref="Completion"/> completes).</summary>
    public event Action<ChainMerge>? Concluded;

    #endregion

    #region Prepare

    /// <summary>
    /// Open the chain of <paramref name="request"/>'s top read-only (QEMU's reader locks), finish what a crashed merge
    /// of it left, check it and plan the merge. The chain stays open until the merge concludes or is abandoned.
    /// </summary>
    /// <exception cref="BlockException">
    /// InvalidKeepCount, InvalidSpeed, ImageNotFound, ImageInUse, BackupChainBroken, BackupChainShared,
    /// ImageAlreadyExists (-Into), UnsupportedImageFeature, ImageIOFailed and the special-file ids.
    /// </exception>
    public static ChainMerge Prepare(ChainMergeRequest request, BlockEngine engine)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentNullException.ThrowIfNull(engine);
        if ((request.Keep is null) == (request.Into is null))
            throw new ArgumentException("A merge keeps a number of images or goes into a new image: give Keep or Into.", nameof(request));
        string top = System.IO.Path.GetFullPath(request.Top);
        if (request.Keep is { } keep && keep < 1)
            Throw.Block(ErrorIds.InvalidKeepCount, BlockErrorCategory.InvalidArgument,
                $"-Keep {keep} is not a valid retention for the chain of '{top}': a chain keeps at least its newest image (-Keep 1 flattens it into that image).", keep);
        if (request.BytesPerSecond < 0)
            Throw.Block(ErrorIds.InvalidSpeed, BlockErrorCategory.InvalidArgument, $"-BytesPerSecond expects a non-negative value, not {request.BytesPerSecond}.", request.BytesPerSecond);
        string? into = request.Into is null ? null : System.IO.Path.GetFullPath(request.Into);
        if (into is not null)
            CheckNewImagePath(into);

        IBlockImage image = OpenChain(top, engine);
        List<string> reserved = [];
        try
        {
            IReadOnlyList<IBlockImage> layers = Layers(image);
            var chain = new HashSet<string>(layers.Select(l => l.Path), StringComparer.Ordinal);
            if (into is not null && chain.Contains(into))
                Throw.Block(ErrorIds.ImageAlreadyExists, BlockErrorCategory.ResourceExists, $"'{into}' is an image of the chain itself; -Into needs a new file.", into);
            Reserve(reserved, [.. chain, .. into is null ? Array.Empty<string>() : [into]]);

            var recovered = new List<string>();
            foreach (IBlockImage layer in layers)
            {
                recovered.AddRange(MergeJournal.Recover(layer.Path, switched: layer.BackingFile is null, chain));
                DeleteStale(layer.Path + MergingSuffix, top);
            }
            if (into is not null)
                DeleteStale(into + PartialSuffix, top);
            CheckMetadata(layers, top);

            int m = layers.Count;
            int k = request.Keep is { } n ? m - n : m - 1;
            if (k <= 0 && request.Keep is not null)
                return new ChainMerge(request, top, image, layers, -1, null, [], [], recovered, reserved);
            k = Math.Max(k, 0);
            IBlockImage target = layers[k];
            var doomed = new List<string>();
            if (request.Keep is not null)
            {
                for (int j = k - 1; j >= 0; j--)
                {
                    string manifest = DigestManifest.PathFor(layers[j].Path);
                    if (File.Exists(manifest))
                        doomed.Add(manifest);
                    doomed.Add(layers[j].Path);
                }
                CheckNotShared(layers.Take(k).Select(l => l.Path).ToArray(), chain);
            }
            int clusterSize = target.ClusterSize > 0 ? target.ClusterSize : Qcow2Image.DefaultClusterSize;
            IReadOnlyList<(long Offset, long Length)> ranges = ChainFlattener.Plan(layers.Take(k + 1).ToArray(), target.Size, clusterSize);
            return new ChainMerge(request, top, image, layers, k, into ?? target.Path, doomed, ranges, recovered, reserved);
        }
        catch
        {
            Release(reserved);
            image.Dispose();
            throw;
        }
    }

    /// <summary>Open the chain for reading; say which node holds an image that a writer holds, and call a chain that does not open broken.</summary>
    private static IBlockImage OpenChain(string top, BlockEngine engine)
    {
        try
        {
            return BlockEngine.OpenImage(top, readOnly: true);
        }
        catch (BlockException e) when (e.ErrorId == ErrorIds.ImageInUse)
        {
            throw WritableNode(top, engine, e) ?? e;
        }
        catch (BlockException e) when (e.ErrorId is ErrorIds.BackingFileNotFound or ErrorIds.BackingChainLoop or ErrorIds.BackingFileChanged
                                           or ErrorIds.ImageCorrupt or ErrorIds.UnsupportedFormat)
        {
            throw Broken(top, e.Message, e);
        }
    }

    /// <summary>ImageInUse naming the node of this session that has an image of the chain open for writing, or null.</summary>
    private static BlockException? WritableNode(string top, BlockEngine engine, BlockException cause)
    {
        var paths = new HashSet<string>(StringComparer.Ordinal) { top };
        try
        {
            using IBlockImage shared = BlockEngine.OpenImage(top, readOnly: true, forceShare: true);
            foreach (IBlockImage layer in Layers(shared))
                paths.Add(layer.Path);
        }
        catch (BlockException)
        {
            // only the top is known: look for it alone
        }
        BlockNode? node = engine.Nodes.FirstOrDefault(n => !n.ReadOnly && paths.Contains(n.Path));
        return node is null
            ? null
            : new BlockException(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Image '{node.Path}' of the chain of '{top}' is open for writing as node '{node.Name}'; close it (Close-BlockNode) before merging the chain.", node.Path, cause);
    }

    private static BlockException Broken(string top, string why, Exception? inner = null)
        => new(ErrorIds.BackupChainBroken, BlockErrorCategory.InvalidData,
            $"The backup chain of '{top}' is broken, so nothing was merged: {why}", top, inner);

    /// <summary>Every image of the chain, base first.</summary>
    private static IReadOnlyList<IBlockImage> Layers(IBlockImage top)
    {
        var layers = new List<IBlockImage>();
        for (IBlockImage? image = top; image is not null; image = (image as Qcow2Image)?.BackingImage)
            layers.Add(image);
        layers.Reverse();
        return layers;
    }

    /// <summary>A merge must not build on images whose metadata is corrupt: each qcow2 layer is checked as qemu-img check does (leaks are harmless).</summary>
    private static void CheckMetadata(IReadOnlyList<IBlockImage> layers, string top)
    {
        foreach (IBlockImage layer in layers.Where(l => l.Format == ImageFormat.Qcow2))
        {
            Qcow2CheckReport report = Qcow2Checker.Check(layer.Path);
            string? first = report.Corruptions.Concat(report.CheckErrors).FirstOrDefault();
            if (first is not null)
                throw Broken(top, $"qemu-img check would report '{layer.Path}' as corrupt ({first}).");
        }
    }

    /// <summary>
    /// Refuse to delete an image that another image, outside the chain, reads as its backing file: the images of the
    /// folders of <paramref name="doomed"/> are looked at (their headers only).
    /// </summary>
    private static void CheckNotShared(IReadOnlyList<string> doomed, IReadOnlySet<string> chain)
    {
        var doomedSet = new HashSet<string>(doomed, StringComparer.Ordinal);
        foreach (string folder in doomed.Select(d => System.IO.Path.GetDirectoryName(d) ?? "/").Distinct(StringComparer.Ordinal))
        {
            IEnumerable<string> files;
            try
            {
                files = Directory.EnumerateFiles(folder).ToArray();
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                continue;
            }
            foreach (string file in files)
            {
                string full = System.IO.Path.GetFullPath(file);
                if (chain.Contains(full) || full.EndsWith(MergingSuffix, StringComparison.Ordinal))
                    continue;
                string? backing = Qcow2Image.PeekBackingFileName(full);
                if (backing is null || backing.StartsWith("json:", StringComparison.Ordinal))
                    continue;
                string resolved;
                try
                {
                    resolved = System.IO.Path.GetFullPath(System.IO.Path.IsPathRooted(backing) ? backing : System.IO.Path.Combine(folder, backing));
                }
                catch (Exception e) when (e is ArgumentException or NotSupportedException)
                {
                    continue;
                }
                if (doomedSet.Contains(resolved))
                    Throw.Block(ErrorIds.BackupChainShared, BlockErrorCategory.InvalidOperation,
                        $"Image '{resolved}' would be deleted by the merge, but '{full}' is not part of this chain and has it as its backing file, so it would no longer open. Nothing was merged; merge or move the other chain first.", resolved);
            }
        }
    }

    /// <summary>-Into needs a new file in an existing folder.</summary>
    private static void CheckNewImagePath(string into)
    {
        if (File.Exists(into) || Directory.Exists(into))
            Throw.Block(ErrorIds.ImageAlreadyExists, BlockErrorCategory.ResourceExists, $"Cannot merge the chain into '{into}': a {(Directory.Exists(into) ? "folder" : "file")} with that name already exists.", into);
        string? folder = System.IO.Path.GetDirectoryName(into);
        if (!string.IsNullOrEmpty(folder) && !Directory.Exists(folder))
            Throw.Block(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"The folder '{folder}' for image '{into}' does not exist.", into);
    }

    /// <summary>Delete a file an interrupted merge left, unless another process is writing it (a merge running there: ImageInUse).</summary>
    private static void DeleteStale(string path, string top)
    {
        if (!File.Exists(path))
            return;
        try
        {
            ImageFiles.Open(path, readOnly: false).Dispose();
        }
        catch (BlockException e) when (e.ErrorId == ErrorIds.ImageInUse)
        {
            throw new BlockException(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"The chain of '{top}' is being merged by another process ('{path}' is being written); wait for that merge to end.", path, e);
        }
        catch (BlockException)
        {
            // not an image that opens: nothing writes it as a merge does; it goes as well
        }
        MergeJournal.Delete(path);
        LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(path) ?? "/");
    }

    /// <summary>Claim the paths for this merge in this process, all or none (ImageInUse when another merge has one).</summary>
    private static void Reserve(List<string> reserved, IEnumerable<string> paths)
    {
        foreach (string path in paths)
        {
            if (!s_busy.TryAdd(path, 0))
            {
                Release(reserved);
                Throw.Block(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                    $"Image '{path}' is part of a chain being merged in this session; wait for that merge (Wait-Job) to end.", path);
            }
            reserved.Add(path);
        }
    }

    /// <summary>Give back what <see cref="Reserve"/> claimed (once: the list is emptied).</summary>
    private static void Release(List<string> reserved)
    {
        lock (reserved)
        {
            foreach (string path in reserved)
                s_busy.TryRemove(path, out _);
            reserved.Clear();
        }
    }

    #endregion

    #region Run

    /// <summary>Start the merge on a worker thread (once).</summary>
    public void Run()
    {
        if (Interlocked.Exchange(ref _started, 1) != 0)
            return;
        StartTime = DateTimeOffset.Now;
        Task.Factory.StartNew(Execute, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>Stop the merge (Stop-Job): honoured while the merged image is being built; the chain stays as it was.</summary>
    public void Cancel() => _cancel.Cancel();

    /// <summary>Release a merge that was prepared but will not run (its chain is closed).</summary>
    public void Abandon()
    {
        if (Interlocked.Exchange(ref _started, 1) != 0)
            return;
        CloseChain();
        Release(_reserved);
        Conclude(ChainMergeStatus.Cancelled, new BlockException(ErrorIds.MergeCancelled, BlockErrorCategory.InvalidOperation, $"The merge of the chain of '{TopPath}' did not start.", TopPath));
    }

    private void Execute()
    {
        bool switched = false;
        try
        {
            if (_mergeIndex < 0)
            {
                Conclude(ChainMergeStatus.Completed, null);
                return;
            }
            SetStatus(ChainMergeStatus.Copying);
            BuildMergedImage();
            CrashPoints.Reached("merge:copied");
            _cancel.Token.ThrowIfCancellationRequested(); // the last point a stop is honoured
            SetStatus(ChainMergeStatus.Switching);
            if (Into is null)
            {
                MergeJournal.Write(MergedImage!, _doomed);
                CrashPoints.Reached("merge:journaled");
                KeepFileMode(MergedImage!, _writePath!);
                ImageFiles.Io(MergedImage!, "rename", () => File.Move(_writePath!, MergedImage!, overwrite: true));
                switched = true;
                SyncFolder(MergedImage!);
                CrashPoints.Reached("merge:switched");
                CloseChain();
                SetStatus(ChainMergeStatus.CleaningUp);
                DeleteOldImages();
                MergeJournal.Remove(MergedImage!);
            }
            else
            {
                using DigestManifestWriter? manifest = CopyTopManifest();
                ImageFiles.Io(Into, "rename", () => File.Move(_writePath!, Into, overwrite: false));
                switched = true;
                SyncFolder(Into);
                CloseChain();
                manifest?.Commit(manifest.Info.PointInTime);
            }
            Conclude(ChainMergeStatus.Completed, null);
        }
        catch (OperationCanceledException) when (_cancel.IsCancellationRequested && !switched)
        {
            Cleanup(switched);
            Conclude(ChainMergeStatus.Cancelled, new BlockException(ErrorIds.MergeCancelled, BlockErrorCategory.InvalidOperation,
                $"The merge of the chain of '{TopPath}' was stopped before its switch: the chain is as it was.", TopPath));
        }
        catch (BlockException e)
        {
            Cleanup(switched);
            Conclude(ChainMergeStatus.Failed, e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or OperationCanceledException)
        {
            Cleanup(switched);
            Conclude(ChainMergeStatus.Failed, new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"The merge of the chain of '{TopPath}' failed: {e.Message}", TopPath, e));
        }
    }

    /// <summary>Step 2: the merged image, complete and durable, under its temporary name.</summary>
    private void BuildMergedImage()
    {
        IBlockImage source = _layers[_mergeIndex];
        int clusterSize = source.ClusterSize > 0 ? source.ClusterSize : Qcow2Image.DefaultClusterSize;
        Qcow2Image.Create(_writePath!, source.Size, clusterSize);
        bool reached = false;
        using Qcow2Image target = Qcow2Image.Open(_writePath!, readOnly: false);
        ChainFlattener.Copy(source, target, _ranges, _rate, _cancel.Token, done =>
        {
            Interlocked.Exchange(ref _bytesDone, done);
            if (!reached)
            {
                reached = true;
                CrashPoints.Reached("merge:copying");
            }
        });
        target.Flush();
    }

    /// <summary>Step 5: the older images and their manifests, newest first.</summary>
    private void DeleteOldImages()
    {
        bool first = true;
        foreach (string file in _doomed)
        {
            if (MergeJournal.Delete(file))
            {
                lock (_lock)
                    _removed.Add(file);
            }
            if (first)
            {
                first = false;
                CrashPoints.Reached("merge:deleted");
            }
        }
        foreach (string folder in _doomed.Select(f => System.IO.Path.GetDirectoryName(f) ?? "/").Distinct(StringComparer.Ordinal))
            LinuxFile.TrySyncDirectory(folder);
        CrashPoints.Reached("merge:cleaned");
    }

    /// <summary>-Into: the top's manifest, copied for the new image (null when the top has none, or it cannot be read).</summary>
    private DigestManifestWriter? CopyTopManifest()
    {
        string source = DigestManifest.PathFor(TopPath);
        if (!File.Exists(source))
            return null;
        try
        {
            using DigestManifest previous = DigestManifest.Open(source);
            DigestManifestInfo info = previous.Info with { BackupFile = System.IO.Path.GetFileName(Into!) };
            return DigestManifestWriter.Create(DigestManifest.PathFor(Into!), info, previous);
        }
        catch (BlockException e)
        {
            Warn($"The digest manifest '{source}' of the chain's top was not copied for '{Into}': {e.Message}");
            return null;
        }
    }

    /// <summary>The merged image gets the permissions of the image it replaces.</summary>
    private void KeepFileMode(string original, string replacement)
    {
        if (OperatingSystem.IsWindows())
            return;
        try
        {
            File.SetUnixFileMode(replacement, File.GetUnixFileMode(original));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Warn($"The permissions of '{original}' could not be given to the merged image: {e.Message}");
        }
    }

    private void SyncFolder(string path)
    {
        if (!LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(path) ?? "/") && OperatingSystem.IsLinux())
            Warn($"The folder of '{path}' could not be synced: the rename may not survive a power failure.");
    }

    /// <summary>After a failure or a stop before the switch: the temporary image goes, the chain is as it was.</summary>
    private void Cleanup(bool switched)
    {
        CloseChain();
        if (switched || _writePath is null)
            return;
        try
        {
            MergeJournal.Delete(_writePath);
            if (Into is null && MergedImage is not null)
                MergeJournal.Remove(MergedImage);
        }
        catch (BlockException e)
        {
            Warn($"'{_writePath}' could not be deleted ({e.Message}); it is not part of any chain, and the next merge of the chain deletes it.");
        }
    }

    private void CloseChain()
    {
        lock (_lock)
        {
            if (_chainClosed)
                return;
            _chainClosed = true;
        }
        try
        {
            _top.Dispose();
        }
        catch (Exception e) when (e is BlockException or IOException)
        {
            // read-only: nothing to write back
        }
    }

    private void Warn(string message)
    {
        lock (_lock)
            _warnings.Add(message);
    }

    private void SetStatus(ChainMergeStatus status)
    {
        lock (_lock)
            _status = status;
    }

    private void Conclude(ChainMergeStatus status, BlockException? error)
    {
        Release(_reserved);
        lock (_lock)
        {
            _status = status;
            _error = error;
            _ended = DateTimeOffset.Now;
        }
        try
        {
            Concluded?.Invoke(this);
        }
        finally
        {
            _completed.TrySetResult();
        }
    }

    #endregion

    public override string ToString() => $"{Id} ({TopPath}, {Status})";
}
