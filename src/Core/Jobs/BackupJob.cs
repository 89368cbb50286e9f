using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Digests;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Jobs;

/*
 * A backup job, after QEMU's block/backup.c.
 *
 * Life: Prepare (checks, target created) → Freeze (under the source's write gate: the bitmap gets its
 * successor, the copy bitmap is initialised, copy-before-write is installed: this instant is the backup's
 * point in time) → Run (workers copy the copy bitmap's clusters; guest writes copy old data first) →
 * Pending → Finalize (target committed, bitmap abdicated or reclaimed per the bitmap mode) → Concluded.
 * Any failure or a cancel goes Aborting → Concluded, with the bitmap reclaimed (no bit lost) and a new target
 * deleted. Prepare and Freeze are separate so that a transaction can prepare several jobs and freeze them
 * all inside one quiesced instant.
 *
 * Threads: Run starts one controller task and Workers copy tasks; every state change happens under _lock
 * and raises StatusChanged outside it.
 *
 * Ending: every path reaches Concluded, whatever fails on the way out. The steps of an abort (detach, close and
 * delete the target, reclaim the bitmap) are each tried whatever failed before; their failures are collected in
 * CleanupErrors, never thrown where they would keep the job from concluding. The bitmap is cleaned up exactly once.
 */

/// <summary>One backup of one node into one target image.</summary>
public sealed class BackupJob
{
    private static long s_nextId;

    private readonly Lock _lock = new();
    private readonly ValidatedBackup _spec;
    private readonly BackupTarget _target;
    private readonly RateLimiter _rate;
    private readonly CancellationTokenSource _cancel = new();
    private readonly ManualResetEventSlim _running = new(initialState: true);
    private readonly TaskCompletionSource _finalizeRequested = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _completed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private BlockCopier? _copier;
    private DigestManifestWriter? _digests;
    private BlockJobStatus _status = BlockJobStatus.Created;
    private BlockException? _error;
    private BlockException? _lastTransientError;
    private bool _pausedByError;
    private bool _frozen;
    private DateTimeOffset? _ended;

    private BackupJob(ValidatedBackup spec, BackupTarget target, long clusterSize)
    {
        _spec = spec;
        _target = target;
        ClusterSize = clusterSize;
        _rate = new RateLimiter(spec.Request.BytesPerSecond);
        Id = "backup" + Interlocked.Increment(ref s_nextId);
    }

    #region Identity and options

    public string Id { get; }

    public BlockNode Source => _spec.Request.Source;

    /// <summary>Final path of the target image.</summary>
    public string TargetPath => _target.Path;

    public BackupSyncMode Sync => _spec.Request.Sync;

    public DirtyBitmap? Bitmap => _spec.Bitmap;

    public BitmapSyncMode? BitmapMode => _spec.BitmapMode;

    public bool AutoFinalize => _spec.Request.AutoFinalize;

    /// <summary>Copy granularity: max(64 KiB, target cluster size), as QEMU.</summary>
    public long ClusterSize { get; }

    public long BytesPerSecond { get => _rate.BytesPerSecond; set => _rate.BytesPerSecond = Math.Max(0, value); }

    /// <summary>The grouped transaction this job belongs to, or null. Set before <see cref="Freeze"/>.</summary>
    public JobGroup? Group
    {
        get => _group;
        set
        {
            if (_frozen)
                throw new InvalidOperationException("Join a group before the job is frozen.");
            _group = value;
            value?.Register(this);
        }
    }

    private JobGroup? _group;

    #endregion

    #region State

    public BlockJobStatus Status { get { lock (_lock) return _status; } }

    /// <summary>
    /// True while the job waits for <see cref="Complete"/> and for nothing else: Pending with auto-finalize off, or a
    /// -Sync None job running (it never ends by itself). False again once Complete or Cancel was called.
    /// </summary>
    public bool AwaitsCompletion
    {
        get
        {
            lock (_lock)
            {
                if (_finalizeRequested.Task.IsCompleted)
                    return false;
                return _spec.Sync == BackupSyncMode.None
                    ? _status is BlockJobStatus.Running or BlockJobStatus.Pending
                    : _status == BlockJobStatus.Pending && !AutoFinalize;
            }
        }
    }

    /// <summary>True while paused by <see cref="JobErrorAction.Stop"/> after an error.</summary>
    public bool PausedByError { get { lock (_lock) return _pausedByError; } }

    /// <summary>The instant the backup represents (set by <see cref="Freeze"/>).</summary>
    public DateTimeOffset PointInTime { get; private set; }

    public DateTimeOffset? EndTime { get { lock (_lock) return _ended; } }

    public long BytesTotal => _copier?.BytesTotal ?? _finalBytesTotal;

    public long BytesDone => _copier?.BytesDone ?? _finalBytesDone;

    /// <summary>Bytes read from the source (<see cref="BlockCopier.BytesRead"/>): what a backup after a crash costs the disk.</summary>
    public long BytesRead => _copier?.BytesRead ?? _finalBytesRead;

    // What the job reports once it has concluded and let go of its copier (see Conclude).
    private long _finalBytesTotal, _finalBytesDone, _finalBytesRead;

    /// <summary>Why the job failed, or null.</summary>
    public BlockException? Error { get { lock (_lock) return _error; } }

    /// <summary>The last error that paused the job or was ignored.</summary>
    public BlockException? LastTransientError { get { lock (_lock) return _lastTransientError; } }

    public bool Succeeded => Status == BlockJobStatus.Concluded && Error is null;

    /// <summary>Completes when the job is concluded, whatever the outcome (never faults).</summary>
    public Task Completion => _completed.Task;

    /// <summary>Raised once when the job's outcome is final, before its status becomes Concluded (cleanup hook).</summary>
    public event Action<BackupJob>? Concluding;

    /// <summary>Raised after every status change, on the thread that changed it.</summary>
    public event Action<BackupJob, BlockJobStatus>? StatusChanged;

    #endregion

    #region Creation

    /// <summary>Check, create the target and set up a job; nothing on the source changes yet.</summary>
    public static BackupJob Prepare(BackupRequest request, BackupTargetOptions? targetOptions = null)
    {
        targetOptions ??= BackupTargets.For(request.ClusterSize, request.BackingFile, request.Compress ? request.Compression : Formats.Qcow2.Qcow2CompressionType.Deflate);
        ValidatedBackup spec = ValidatedBackup.Check(request);
        SyncSource(request.Source);
        BackupRequest r = spec.Request;
        BackupTarget target = r.UseExistingTarget
            ? BackupTarget.OpenExisting(r.Target, r.Source.Size, targetOptions)
            : BackupTarget.CreateNew(r.Target, r.TargetFormat, r.Source.Size, targetOptions);
        long cluster = Math.Max(65536, target.Image.ClusterSize);
        var job = new BackupJob(spec, target, cluster);
        try
        {
            job._digests = StartManifest(spec, target, cluster);
        }
        catch
        {
            job.Cleanup(() => target.Discard());
            throw;
        }
        return job;
    }

    /// <summary>
    /// The digest manifest this backup writes beside its target, or null. A backup from a bitmap into a new target
    /// writes one: a full backup from scratch, an incremental from the manifest of the backup it goes on top of (no
    /// manifest when that one has none or it does not fit: another node, another cluster size).
    /// </summary>
    private static DigestManifestWriter? StartManifest(ValidatedBackup spec, BackupTarget target, long cluster)
    {
        if (spec.Bitmap is not { } bitmap || !target.Created || spec.Sync is not (BackupSyncMode.Full or BackupSyncMode.Bitmap))
            return null;
        BlockNode source = spec.Request.Source;
        var info = new DigestManifestInfo(source.Path, bitmap.Name!, bitmap.Granularity, source.Size, cluster,
            System.IO.Path.GetFileName(target.Path), DateTimeOffset.Now);
        if (spec.Sync == BackupSyncMode.Full)
            return DigestManifestWriter.Create(DigestManifest.PathFor(target.Path), info, previous: null);
        if (target.Image is not Formats.Qcow2.Qcow2Image { BackingChain: [{ } below, ..] })
            return null;
        string previousPath = DigestManifest.PathFor(below.Path);
        if (!File.Exists(previousPath))
            return null;
        using DigestManifest previous = DigestManifest.Open(previousPath);
        if (previous.Info.ClusterSize != cluster || !string.Equals(previous.Info.NodePath, source.Path, StringComparison.Ordinal))
            return null;
        return DigestManifestWriter.Create(DigestManifest.PathFor(target.Path), info, previous);
    }

    /// <summary>The digest manifest this backup writes (its final path), or null when it writes none.</summary>
    public string? ManifestPath => _digests?.Path;

    /// <summary>
    /// Write the source's unsynced data and metadata back before the point in time, so that the backup never holds
    /// data a crash of this process could take from the disk. Best effort: a source that cannot be synced now (its
    /// filesystem is full) is still backed up; its write-back is retried by its window.
    /// </summary>
    private static void SyncSource(BlockNode source)
    {
        try
        {
            if (!source.ReadOnly && source.HasUnsyncedWrites)
                source.Flush();
        }
        catch (BlockException)
        {
        }
    }

    /// <summary>
    /// Take the point in time. The caller holds <see cref="BlockNode.Quiesce"/> of the source, so no write is in
    /// flight: the bitmap gets a successor, the copy bitmap is set from the sync mode, copy-before-write is on.
    /// </summary>
    public void Freeze()
    {
        if (_frozen)
            throw new InvalidOperationException("The job is already frozen.");
        BlockNode source = Source;
        long clusters = (source.Size + ClusterSize - 1) / ClusterSize;
        var toCopy = new HierarchicalBitmap(clusters);
        switch (_spec.Sync)
        {
            case BackupSyncMode.Bitmap:
                toCopy.Merge(_spec.Bitmap!.Snapshot(), _spec.Bitmap.Granularity, ClusterSize);
                break;
            case BackupSyncMode.Top:
                toCopy.SetAll();
                foreach (AllocationExtent e in source.GetAllocation().Where(e => e.State == AllocationState.Unallocated))
                    ResetWholeClusters(toCopy, e);
                break;
            default:
                toCopy.SetAll();
                break;
        }
        long zeroFrom = TargetReadsZerosFrom();
        if (zeroFrom < source.Size)
        {
            foreach (AllocationExtent e in source.GetChainAllocation(zeroFrom).Where(e => e.State != AllocationState.Data))
                ResetWholeClusters(toCopy, e); // zeros where the target reads zeros already: nothing to copy
        }
        _spec.Bitmap?.CreateSuccessor(repair: _spec.RepairsBitmap);
        var policy = new CopyPolicy(
            SkipUnallocated: _spec.Sync is BackupSyncMode.Full && _target.Created && _target.Image.BackingFile is null,
            ZeroesAsZeroClusters: _spec.Sync == BackupSyncMode.Bitmap,
            Compress: _spec.Request.Compress,
            ZeroFrom: zeroFrom,
            Digests: _digests);
        _copier = new BlockCopier(source, _target.Image, ClusterSize, toCopy, policy);
        source.AddWriteInterceptor(_copier);
        PointInTime = DateTimeOffset.Now;
        _frozen = true;
    }

    /// <summary>
    /// From where a new target reads zeros wherever nothing is written, so that zeros there need no copy at all: past
    /// the end of its backing image (the range a grown disk added costs nothing), or everywhere for a full backup into
    /// a target without one (a 1 TiB disk holding 7 MiB costs what 7 MiB cost). Elsewhere zeros are written as they
    /// are: a -Sync Top target without a backing file is put on one later, and an existing target may hold anything.
    /// </summary>
    private long TargetReadsZerosFrom()
    {
        if (!_target.Created)
            return long.MaxValue;
        if (_target.Image is Formats.Qcow2.Qcow2Image { BackingImage: { } backing })
            return backing.Size;
        return _spec.Sync == BackupSyncMode.Full ? 0 : long.MaxValue;
    }

    private void ResetWholeClusters(HierarchicalBitmap toCopy, AllocationExtent e)
    {
        long first = (e.Offset + ClusterSize - 1) / ClusterSize;
        long end = e.End >= Source.Size ? toCopy.Length : e.End / ClusterSize;
        if (end > first)
            toCopy.Reset(first, end - first);
    }

    /// <summary>Give up a prepared job that was never run (a transaction rolled back): nothing was copied.</summary>
    public void Abandon()
    {
        if (_frozen)
        {
            Cleanup(DetachFromSource);
            Cleanup(() =>
            {
                if (Interlocked.Exchange(ref _bitmapCleanedUp, 1) == 0)
                    _spec.Bitmap?.Reclaim();
            });
        }
        Cleanup(() => _target.Discard());
        Cleanup(() => _digests?.Dispose());
        Conclude(new BlockException(ErrorIds.BackupCancelled, BlockErrorCategory.InvalidOperation, $"Backup job '{Id}' was cancelled before it started.", Id));
    }

    /// <summary>Prepare, freeze at once and run: the usual way to start one backup.</summary>
    public static BackupJob Start(BackupRequest request, BackupTargetOptions? targetOptions = null)
    {
        BackupJob job = Prepare(request, targetOptions);
        try
        {
            using (request.Source.Quiesce())
                job.Freeze();
        }
        catch
        {
            job.Cleanup(() => job._target.Discard());
            throw;
        }
        job.Run();
        return job;
    }

    #endregion

    #region Verbs

    /// <summary>Start copying (after <see cref="Freeze"/>).</summary>
    public void Run()
    {
        if (!_frozen)
            throw new InvalidOperationException("Freeze the job before running it.");
        SetStatus(BlockJobStatus.Running);
        _ = Task.Run(Control); // thread-pool threads: a small job pays no thread start-up
    }

    /// <summary>Pause copying (QEMU's job-pause). Copy-before-write goes on, so the point in time holds.</summary>
    public void Pause()
    {
        bool changed;
        lock (_lock)
        {
            RequireVerb("pause", BlockJobStatus.Created, BlockJobStatus.Running, BlockJobStatus.Paused);
            _running.Reset();
            changed = ChangeStatusLocked(BlockJobStatus.Paused);
        }
        if (changed)
            RaiseStatusChanged(BlockJobStatus.Paused);
    }

    /// <summary>Resume copying; clusters that failed are retried.</summary>
    public void Resume()
    {
        bool changed;
        lock (_lock)
        {
            RequireVerb("resume", BlockJobStatus.Created, BlockJobStatus.Running, BlockJobStatus.Paused);
            _pausedByError = false;
            // Status and the workers' gate change together: a worker that fails again at once pauses after this.
            changed = ChangeStatusLocked(BlockJobStatus.Running);
            _running.Set();
        }
        if (changed)
            RaiseStatusChanged(BlockJobStatus.Running);
    }

    /// <summary>Cancel (QEMU's job-cancel): the job aborts, keeping every dirty bit. A paused job is resumed to end.</summary>
    public void Cancel()
    {
        lock (_lock)
        {
            if (_status is BlockJobStatus.Concluded or BlockJobStatus.Aborting)
                return;
        }
        _cancel.Cancel();
        _running.Set();
        _finalizeRequested.TrySetResult();
    }

    /// <summary>
    /// Finalize a pending job (auto-finalize off; QEMU's job-finalize), or end a -Sync None job successfully.
    /// </summary>
    public void Complete()
    {
        lock (_lock)
        {
            if (!(_status == BlockJobStatus.Pending || (_spec.Sync == BackupSyncMode.None && _status is BlockJobStatus.Running or BlockJobStatus.Paused)))
                RequireVerb("finalize", BlockJobStatus.Pending);
        }
        _finalizeRequested.TrySetResult();
        if (_group is not null)
        {
            foreach (BackupJob other in _group.Jobs.Where(j => j != this)) // QEMU: finalizing one job of a transaction finalizes all
                other._finalizeRequested.TrySetResult();
        }
    }

    private void RequireVerb(string verb, params BlockJobStatus[] allowed)
    {
        if (!allowed.Contains(_status))
            Throw.Block(ErrorIds.JobStateInvalid, BlockErrorCategory.InvalidOperation,
                $"Job '{Id}' in state '{_status}' cannot accept command verb '{verb}'.", Id);
    }

    #endregion

    #region Running

    private void Control()
    {
        try
        {
            ControlCore();
        }
        catch (Exception e)
        {
            // A bug or an unexpected failure on the way to an outcome: the job still concludes, keeping every bit.
            AbortWith(e as BlockException ?? new BlockException(ErrorIds.BackupFailed, BlockErrorCategory.InvalidOperation,
                $"Backup job '{Id}' failed: {e.Message}", Id, e));
        }
    }

    private void ControlCore()
    {
        BlockException? failure = null;
        try
        {
            if (_spec.Sync == BackupSyncMode.None)
                _finalizeRequested.Task.Wait(_cancel.Token);
            else
                RunWorkers();
        }
        catch (OperationCanceledException)
        {
        }
        catch (AggregateException e) when (e.InnerExceptions.All(x => x is OperationCanceledException))
        {
        }
        catch (Exception e)
        {
            Exception inner = e is AggregateException a ? a.InnerExceptions.First(x => x is not OperationCanceledException) : e;
            lock (_lock)
                _error ??= inner as BlockException ?? new BlockException(ErrorIds.BackupFailed, BlockErrorCategory.InvalidOperation,
                    $"Backup job '{Id}' failed: {inner.Message}", Id, inner);
            _cancel.Cancel();
        }
        lock (_lock)
            failure = _error;
        failure ??= _copier!.CopyBeforeWriteFailure;
        if (failure is null && _cancel.IsCancellationRequested)
            failure = Cancelled();
        if (failure is null && _spec.Sync != BackupSyncMode.None && !_copier!.IsDone)
            failure = new BlockException(ErrorIds.BackupFailed, BlockErrorCategory.InvalidOperation, $"Backup job '{Id}' ended with data left to copy.", Id);
        if (failure is null && _spec.Sync != BackupSyncMode.None)
            failure = PrepareCommit();
        if (failure is null && _group is not null)
        {
            SetStatus(BlockJobStatus.Waiting);
            if (!_group.WaitForAll(this, _cancel.Token, out BlockException? why))
                failure = why ?? Cancelled();
        }
        if (failure is null)
        {
            SetStatus(BlockJobStatus.Pending);
            if (!AutoFinalize && _spec.Sync != BackupSyncMode.None)
                _finalizeRequested.Task.Wait();
            if (_cancel.IsCancellationRequested)
                failure = Cancelled();
            else
                failure = _copier!.CopyBeforeWriteFailure ?? FinalizeSuccess();
        }
        if (failure is not null)
            AbortWith(failure);
    }

    /// <summary>
    /// Copy with as many workers as there are chunks to share (at most -Workers): this controller is the first, the
    /// others run on the thread pool. A job with one chunk to copy starts no other thread.
    /// </summary>
    private void RunWorkers()
    {
        long chunks = (BytesTotal + BlockCopier.MaxChunk - 1) / BlockCopier.MaxChunk;
        int workers = (int)Math.Clamp(chunks, 1, Math.Max(1, _spec.Request.Workers));
        Task[] others = Enumerable.Range(1, workers - 1).Select(_ => Task.Run(Work)).ToArray();
        Exception? mine = null;
        try
        {
            Work();
        }
        catch (Exception e)
        {
            mine = e;
        }
        try
        {
            Task.WaitAll(others);
        }
        catch (AggregateException e) when (mine is not null)
        {
            throw new AggregateException(e.InnerExceptions.Prepend(mine));
        }
        if (mine is not null)
            throw new AggregateException(mine);
    }

    private BlockException Cancelled()
        => new(ErrorIds.BackupCancelled, BlockErrorCategory.InvalidOperation, $"Backup job '{Id}' was cancelled.", Id);

    private void Work()
    {
        CancellationToken cancel = _cancel.Token;
        while (true)
        {
            _running.Wait(cancel);
            if (_copier!.CopyBeforeWriteFailure is not null)
                return;
            if (!_copier.TryClaim(BlockCopier.MaxChunk, out long first, out long count))
            {
                if (_copier.IsDone)
                    return;
                _copier.WaitForChange(TimeSpan.FromMilliseconds(50));
                continue;
            }
            try
            {
                cancel.ThrowIfCancellationRequested();
                long data = _copier.CopyClaimed(first, count);
                // Pace after the copy, holding no claim: guest writes never wait for the limit, and a pause
                // requested meanwhile takes effect before the next claim (QEMU's block-copy does the same).
                _rate.Wait(data, cancel);
            }
            catch (OperationCanceledException)
            {
                _copier.Unclaim(first, count);
                throw;
            }
            catch (CopyFailedException e)
            {
                JobErrorAction action = e.SourceSide ? _spec.Request.OnSourceError : _spec.Request.OnTargetError;
                switch (action)
                {
                    case JobErrorAction.Report:
                        lock (_lock)
                            _error ??= e.Error;
                        _cancel.Cancel();
                        return;
                    case JobErrorAction.Stop:
                        PauseForError(e.Error);
                        break;
                    default:
                        lock (_lock)
                            _lastTransientError = e.Error;
                        cancel.WaitHandle.WaitOne(TimeSpan.FromMilliseconds(20)); // retried later
                        break;
                }
            }
        }
    }

    /// <summary>-OnSourceError/-OnTargetError Stop: pause (the workers wait on <see cref="_running"/>) until Resume retries.</summary>
    private void PauseForError(BlockException error)
    {
        bool changed;
        lock (_lock)
        {
            _lastTransientError = error;
            _pausedByError = true;
            _running.Reset();
            changed = ChangeStatusLocked(BlockJobStatus.Paused);
        }
        if (changed)
            RaiseStatusChanged(BlockJobStatus.Paused);
    }

    /// <summary>
    /// Everything of the commit that can fail, but the rename, done before the job waits for its group or for
    /// Complete (QEMU's .prepare): the copy is over (copy-before-write has nothing left to copy), so the target is
    /// flushed now and its final name checked. A failure here fails the job, and with it the whole group, before any
    /// job of the group has committed: a grouped transaction completes all its backups or none, even when the
    /// target's file system fills up while its metadata is written back. That write-back is a write of the target, so
    /// -OnTargetError applies to it as to the copy: Stop pauses the job until Resume retries it, Ignore retries it.
    /// </summary>
    private BlockException? PrepareCommit()
    {
        while (true)
        {
            BlockException error;
            try
            {
                PrepareTargetAndManifest();
                return null;
            }
            catch (Exception e) when (e is BlockException or IOException or UnauthorizedAccessException)
            {
                error = e as BlockException ?? new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                    $"Backup target '{TargetPath}' could not be completed: {e.Message}", TargetPath, e);
            }
            JobErrorAction action = error.ErrorId == ErrorIds.ImageIOFailed ? _spec.Request.OnTargetError : JobErrorAction.Report;
            try
            {
                switch (action)
                {
                    case JobErrorAction.Stop:
                        PauseForError(error);
                        _running.Wait(_cancel.Token);
                        break;
                    case JobErrorAction.Ignore:
                        lock (_lock)
                            _lastTransientError = error;
                        if (_cancel.Token.WaitHandle.WaitOne(TimeSpan.FromMilliseconds(20)))
                            return Cancelled();
                        break;
                    default:
                        return error;
                }
            }
            catch (OperationCanceledException)
            {
                return Cancelled();
            }
        }
    }

    /// <summary>
    /// The target's data and metadata synced, and the manifest's last digests written and synced (a full disk fails, or
    /// pauses, the backup, not its manifest): the two syncs at once, the manifest's on a pool thread, since each waits
    /// for the disk. The target's failure is thrown first.
    /// </summary>
    private void PrepareTargetAndManifest()
    {
        if (_digests is not { } digests)
        {
            _target.Prepare();
            return;
        }
        DateTimeOffset pointInTime = PointInTime;
        Task manifest = Task.Run(() => digests.Seal(pointInTime));
        Exception? targetFailure = null;
        try
        {
            _target.Prepare();
        }
        catch (Exception e)
        {
            targetFailure = e;
        }
        try
        {
            manifest.GetAwaiter().GetResult();
        }
        catch (Exception) when (targetFailure is not null)
        {
            // the target's own failure is the one reported
        }
        if (targetFailure is not null)
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(targetFailure);
    }

    private BlockException? FinalizeSuccess()
    {
        DetachFromSource();
        try
        {
            _target.Commit();
        }
        catch (Exception e) when (e is BlockException or IOException or UnauthorizedAccessException)
        {
            return e as BlockException ?? new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"Backup target '{TargetPath}' could not be completed: {e.Message}", TargetPath, e);
        }
        if (_group is not null && !_group.WaitForCommits(this, _cancel.Token, out BlockException? why))
        {
            // Another job of the group could not name its target: this one gives its name back, and the abort discards it.
            Cleanup(_target.RollBackCommit);
            return why ?? Cancelled();
        }
        Cleanup(CommitManifest);
        CleanUpBitmap(succeeded: true);
        Conclude(null);
        return null;
    }

    /// <summary>
    /// The backup has committed: its manifest gets its name, and, when the bitmap now starts from this backup, the
    /// index points the bitmap at it. A failure here does not undo the backup; it is reported with the job.
    /// </summary>
    private void CommitManifest()
    {
        if (_digests is null)
            return;
        try
        {
            _digests.Commit(PointInTime);
        }
        catch
        {
            _digests.Dispose(); // no half-written manifest stays behind
            throw;
        }
        if (_spec.Bitmap is { } bitmap && _spec.BitmapMode != BitmapSyncMode.Never)
            ManifestIndex.Record(Source.Path, bitmap.Name!, _digests.Path);
    }

    /// <summary>
    /// End the job with <paramref name="failure"/>: leave the group, stop copy-before-write, drop the target, give
    /// the bitmap its bits back. Each step runs whatever failed before; none of them can keep the job from concluding.
    /// </summary>
    private void AbortWith(BlockException failure)
    {
        if (_completed.Task.IsCompleted)
            return;
        SetStatus(BlockJobStatus.Aborting);
        Cleanup(() => _group?.Fail(this));
        Cleanup(DetachFromSource);
        // An "always" bitmap drops what was copied even on failure: keep those clusters, in the partial file.
        bool keep = _spec.BitmapMode == BitmapSyncMode.Always && BytesDone > 0;
        Cleanup(() => _target.Discard(keepPartial: keep));
        Cleanup(() => _digests?.Dispose());
        Cleanup(() => CleanUpBitmap(succeeded: false));
        if (_target.KeptPartial)
            failure = new BlockException(failure.ErrorId, failure.Category,
                $"{failure.Message} With -BitmapMode Always the clusters copied so far are no longer dirty: they are kept in '{_target.WritePath}'.", failure.Target, failure);
        Conclude(failure);
    }

    /// <summary>Run one step of an abort; its failure is recorded in <see cref="CleanupErrors"/>, not thrown.</summary>
    private void Cleanup(Action step)
    {
        try
        {
            step();
        }
        catch (Exception e)
        {
            BlockException error = e as BlockException ?? new BlockException(ErrorIds.BackupFailed, BlockErrorCategory.InvalidOperation,
                $"Cleaning up backup job '{Id}' failed: {e.Message}", Id, e);
            lock (_lock)
                _cleanupErrors.Add(error);
        }
    }

    private readonly List<BlockException> _cleanupErrors = new();

    /// <summary>What failed while the job cleaned up after a failure (deleting the partial target, say); the job concluded anyway.</summary>
    public IReadOnlyList<BlockException> CleanupErrors { get { lock (_lock) return _cleanupErrors.ToArray(); } }

    /// <summary>The partial image a failed "always" backup kept, or null.</summary>
    public string? KeptPartialTarget => _target.KeptPartial ? _target.WritePath : null;

    private bool _detached;

    private void DetachFromSource()
    {
        if (_detached || _copier is null)
            return;
        _detached = true;
        using (Source.Quiesce())
            Source.RemoveWriteInterceptor(_copier);
        _copier.Detach();
    }

    private int _bitmapCleanedUp;

    /// <summary>QEMU's backup_cleanup_sync_bitmap; runs once whatever calls it.</summary>
    private void CleanUpBitmap(bool succeeded)
    {
        DirtyBitmap? bitmap = _spec.Bitmap;
        if (bitmap is null || Interlocked.Exchange(ref _bitmapCleanedUp, 1) != 0)
            return;
        BitmapSyncMode mode = _spec.BitmapMode!.Value;
        // A failed "always" backup drops the clusters it copied only when the target keeps them (flushed): if the
        // partial image could not be kept (its file system is full, say), the bitmap keeps every bit instead.
        bool sync = mode switch
        {
            BitmapSyncMode.Always => succeeded || _target.KeptCopiedData,
            BitmapSyncMode.Never => false,
            _ => succeeded,
        };
        if (sync)
            bitmap.Abdicate();
        else
            bitmap.Reclaim();
        if (sync && !succeeded)
            bitmap.MergeInternal(_copier!.Remaining(), ClusterSize);
    }

    private void Conclude(BlockException? error)
    {
        lock (_lock)
        {
            _error = error;
            _ended = DateTimeOffset.Now;
        }
        LetGo();
        try
        {
            Concluding?.Invoke(this);
        }
        catch (Exception e)
        {
            // Cleanup of the caller's resources must not keep the job from concluding.
            lock (_lock)
                _cleanupErrors.Add(e as BlockException ?? new BlockException(ErrorIds.BackupFailed, BlockErrorCategory.InvalidOperation,
                    $"Cleaning up backup job '{Id}' failed: {e.Message}", Id, e));
        }
        try
        {
            SetStatus(BlockJobStatus.Concluded);
        }
        finally
        {
            _completed.TrySetResult();
        }
    }

    /// <summary>
    /// A concluded job keeps its outcome, not its working set: the copy bitmap (2 MiB for a 1 TiB disk), the target
    /// image with its caches and backing chain. A session that keeps hundreds of finished jobs in Get-Job stays small.
    /// </summary>
    private void LetGo()
    {
        if (_copier is { } copier)
        {
            _finalBytesTotal = copier.BytesTotal;
            _finalBytesDone = copier.BytesDone;
            _finalBytesRead = copier.BytesRead;
            _copier = null;
        }
        _target.ReleaseImage();
    }

    private void SetStatus(BlockJobStatus status)
    {
        bool changed;
        lock (_lock)
            changed = ChangeStatusLocked(status);
        if (changed)
            RaiseStatusChanged(status);
    }

    /// <summary>Set the status (caller holds _lock); false when unchanged or already concluded.</summary>
    private bool ChangeStatusLocked(BlockJobStatus status)
    {
        if (_status == status || _status == BlockJobStatus.Concluded)
            return false;
        _status = status;
        return true;
    }

    /// <summary>Tell observers, outside the lock. Events of racing changes may arrive out of order: observers read <see cref="Status"/>.</summary>
    private void RaiseStatusChanged(BlockJobStatus status)
    {
        try
        {
            StatusChanged?.Invoke(this, status);
        }
        catch (Exception e)
        {
            // An observer's failure is the observer's: the job's own state has changed all the same.
            lock (_lock)
                _cleanupErrors.Add(e as BlockException ?? new BlockException(ErrorIds.BackupFailed, BlockErrorCategory.InvalidOperation,
                    $"An observer of backup job '{Id}' failed at status {status}: {e.Message}", Id, e));
        }
    }

    #endregion

    public override string ToString() => $"{Id} ({Source.Name} → {TargetPath}, {Status})";
}
