using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Jobs;

/// <summary>
/// The image a backup writes. A new target is created as "&lt;path&gt;.partial" and renamed to its final name
/// only when the backup succeeds, so a failed, stopped or crashed backup never leaves a file that passes for a
/// finished backup: it leaves nothing (failure and stop delete the partial file) or a ".partial" file (crash).
/// An existing target (-UseExistingTarget) is written in place; on failure it is left as it is and the
/// result says the backup failed.
/// </summary>
public sealed class BackupTarget : IDisposable
{
    public const string PartialSuffix = ".partial";

    // Final paths of the targets being written by this process's backups.
    private static readonly System.Collections.Concurrent.ConcurrentDictionary<string, byte> s_inUse = new(StringComparer.Ordinal);

    private bool _finished;

    private BackupTarget(string path, string writePath, IBlockImage image, bool created)
    {
        Path = path;
        WritePath = writePath;
        Image = image;
        Created = created;
    }

    /// <summary>The final path of the backup.</summary>
    public string Path { get; }

    /// <summary>The file being written (the partial file for a new target).</summary>
    public string WritePath { get; }

    /// <summary>The image being written; a closed stand-in once the backup has ended (<see cref="ReleaseImage"/>).</summary>
    public IBlockImage Image { get; private set; }

    /// <summary>Whether this backup created the file (and so deletes it on failure).</summary>
    public bool Created { get; }

    /// <summary>True when a failed backup kept its partial file (<see cref="WritePath"/>).</summary>
    public bool KeptPartial { get; private set; }

    /// <summary>
    /// True when <see cref="Discard"/> kept what was copied, flushed (the partial file of a new target, or an existing
    /// target written in place): only then may a failed "always" backup drop the copied clusters from its bitmap.
    /// </summary>
    public bool KeptCopiedData { get; private set; }

    /// <summary>A new image for a backup of <paramref name="size"/> bytes.</summary>
    public static BackupTarget CreateNew(string path, ImageFormat format, long size, BackupTargetOptions options)
    {
        if (File.Exists(path) || Directory.Exists(path))
            Throw.Block(ErrorIds.ImageAlreadyExists, BlockErrorCategory.ResourceExists,
                $"Backup target '{path}' already exists; choose a new file, or use the existing one with -UseExistingTarget.", path);
        Reserve(path);
        string partial = path + PartialSuffix;
        try
        {
            if (File.Exists(partial))
            {
                ThrowIfBeingWritten(partial); // a live backup in another process holds its locks; a crashed one left none
                File.Delete(partial); // left by a crashed backup: never a valid backup
            }
            options.Create(partial, format, size);
            try
            {
                return new BackupTarget(path, partial, options.Open(partial, format), created: true);
            }
            catch
            {
                File.Delete(partial);
                throw;
            }
        }
        catch
        {
            s_inUse.TryRemove(path, out _);
            throw;
        }
    }

    /// <summary>ImageInUse when another process holds <paramref name="partial"/> (a backup writing it holds the writer locks).</summary>
    private static void ThrowIfBeingWritten(string partial)
    {
        try
        {
            IO.ImageFiles.Open(partial, readOnly: false).Dispose();
        }
        catch (BlockException e) when (e.ErrorId == ErrorIds.ImageInUse)
        {
            throw new BlockException(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Backup target '{partial}' is being written by another process; choose another target. {e.Message}", partial, e);
        }
        catch (BlockException)
        {
            // not an image that opens (a folder, a FIFO...): nothing holds it as a backup, it goes as before
        }
    }

    private static void Reserve(string path)
    {
        if (!s_inUse.TryAdd(path, 0))
            Throw.Block(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Backup target '{path}' is being written by another backup; choose another target.", path);
    }

    /// <summary>An existing image of the same virtual size, written in place.</summary>
    public static BackupTarget OpenExisting(string path, long size, BackupTargetOptions options)
    {
        Reserve(path);
        IBlockImage image;
        try
        {
            image = options.OpenExisting(path);
        }
        catch
        {
            s_inUse.TryRemove(path, out _);
            throw;
        }
        if (image.Size != size)
        {
            image.Dispose();
            s_inUse.TryRemove(path, out _);
            Throw.Block(ErrorIds.TargetSizeMismatch, BlockErrorCategory.InvalidArgument,
                $"Source and target image have different sizes: the source has {size} bytes, target '{path}' has {image.Size}.", path);
        }
        return new BackupTarget(path, path, image, created: false);
    }

    /// <summary>
    /// What of <see cref="Commit"/> can fail before the rename, done early (the copy is over): data and metadata
    /// written back and synced, and the final name still free. Throws when a step fails; the target is then not
    /// finished and <see cref="Discard"/> removes it.
    /// </summary>
    public void Prepare()
    {
        if (_finished)
            return;
        Image.Flush();
        if (Created && (File.Exists(Path) || Directory.Exists(Path)))
            Throw.Block(ErrorIds.ImageAlreadyExists, BlockErrorCategory.ResourceExists,
                $"Backup target '{Path}' cannot be given its name: a {(Directory.Exists(Path) ? "folder" : "file")} with that name appeared while the backup ran.", Path);
    }

    /// <summary>
    /// Make the backup durable and give it its name: data and metadata synced, the image closed, a new target renamed
    /// from its partial name, the folder synced. Throws when a step fails; the target is then not finished, and
    /// <see cref="Discard"/> still removes the partial file.
    /// </summary>
    public void Commit()
    {
        if (_finished)
            return;
        Image.Flush();
        CloseImage();
        if (Created)
        {
            File.Move(WritePath, Path, overwrite: false);
            IO.LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(Path)!); // the new name survives a power failure
        }
        _finished = true;
        _committed = true;
        s_inUse.TryRemove(Path, out _);
    }

    private bool _committed;

    /// <summary>
    /// Undo <see cref="Commit"/> of a new target (a grouped transaction whose other backup could not complete): the
    /// file takes its partial name back, so that <see cref="Discard"/> deletes it and nothing passes for a backup.
    /// A target written in place (-UseExistingTarget) has no name to give back: it stays as written.
    /// </summary>
    public void RollBackCommit()
    {
        if (!_committed || !Created)
            return;
        File.Move(Path, WritePath, overwrite: false);
        IO.LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(Path)!);
        _committed = false;
        _finished = false;
    }

    /// <summary>
    /// Close and, for a new target, delete the partial file — or, with <paramref name="keepPartial"/>, flush and
    /// keep it under its ".partial" name (a failed "always" backup: its clusters are no longer in the bitmap).
    /// Every step is tried whatever failed before it; the first failure is thrown at the end (the target is
    /// finished all the same: a retry would not do better).
    /// </summary>
    public void Discard(bool keepPartial = false)
    {
        if (_finished)
            return;
        _finished = true;
        Exception? failure = null;
        try
        {
            if (keepPartial && !_imageClosed)
                Image.Flush();
        }
        catch (Exception e) when (e is BlockException or IOException or UnauthorizedAccessException)
        {
            failure = e;
            keepPartial = false; // not flushed: what it holds is not known, so it must not stay
        }
        CloseImage();
        s_inUse.TryRemove(Path, out _);
        if (keepPartial)
        {
            KeptPartial = Created;
            KeptCopiedData = true;
            return;
        }
        if (Created)
        {
            try
            {
                File.Delete(WritePath);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                failure ??= new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                    $"The partial backup '{WritePath}' could not be deleted: {e.Message} It is not a valid backup; delete it by hand.", WritePath, e);
            }
        }
        if (failure is not null)
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);
    }

    private bool _imageClosed;

    /// <summary>Close the image once; closing never throws (a driver's write-back at close is best effort).</summary>
    private void CloseImage()
    {
        if (_imageClosed)
            return;
        _imageClosed = true;
        try
        {
            Image.Dispose();
        }
        catch (Exception e) when (e is BlockException or IOException or ObjectDisposedException)
        {
        }
    }

    /// <summary>The backup has ended: drop the (closed) image and what it holds. Only valid after Commit or Discard.</summary>
    internal void ReleaseImage()
    {
        if (_imageClosed)
            Image = ReleasedImage.Instance;
    }

    public void Dispose() => Discard();

    /// <summary>What <see cref="Image"/> is after the backup ended: nothing left to read or write.</summary>
    private sealed class ReleasedImage : IBlockImage
    {
        public static readonly ReleasedImage Instance = new();

        public ImageFormat Format => ImageFormat.Raw;
        public string Path => string.Empty;
        public long Size => 0;
        public int ClusterSize => 0;
        public bool ReadOnly => true;
        public string? BackingFile => null;

        public void Read(long offset, Span<byte> buffer) => throw new ObjectDisposedException(nameof(BackupTarget));
        public void Write(long offset, ReadOnlySpan<byte> data) => throw new ObjectDisposedException(nameof(BackupTarget));
        public void WriteZeroes(long offset, long length) => throw new ObjectDisposedException(nameof(BackupTarget));
        public void Flush() => throw new ObjectDisposedException(nameof(BackupTarget));
        public void Resize(long newSize) => throw new ObjectDisposedException(nameof(BackupTarget));
        public IEnumerable<AllocationExtent> GetAllocation(long offset, long length) => throw new ObjectDisposedException(nameof(BackupTarget));
        public void Dispose()
        {
        }
    }
}

/// <summary>How a backup target is created and opened: format drivers plug in here.</summary>
public sealed class BackupTargetOptions
{
    /// <summary>Create an image file (the raw driver by default).</summary>
    public Action<string, ImageFormat, long> Create { get; init; } = (path, format, size) =>
    {
        if (format != ImageFormat.Raw)
            Throw.Block(ErrorIds.UnsupportedFormat, BlockErrorCategory.NotImplemented, $"Backup targets of format {format} are not supported yet ('{path}').", path);
        RawImage.Create(path, size);
    };

    /// <summary>Open a file this backup created, read-write.</summary>
    public Func<string, ImageFormat, IBlockImage> Open { get; init; } = (path, _) => RawImage.Open(path, readOnly: false);

    /// <summary>Open an existing target, read-write, detecting its format.</summary>
    public Func<string, IBlockImage> OpenExisting { get; init; } = path => RawImage.Open(path, readOnly: false);
}
