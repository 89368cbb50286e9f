using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/// <summary>
/// A read-only image file whose descriptor <see cref="FileHandleBudget"/> may close while it is idle ("parked");
/// its next use opens it again with the same locks, after checking that it is still the file it was (same length,
/// same modification time): a backing file changed while it was closed is refused (BackingFileChanged), never read
/// through tables cached from before. Each use runs between <see cref="Enter"/> and <see cref="Exit"/>, which hold
/// the descriptor open for that call only.
/// </summary>
internal sealed class ParkableFileHandle : IDisposable
{
    private readonly object _gate = new();
    private readonly bool _forceShare;
    private readonly long _length;
    private readonly DateTime _modified;
    private SafeFileHandle? _handle;
    private bool _disposed;

    private ParkableFileHandle(string path, bool forceShare, SafeFileHandle handle)
    {
        Path = path;
        _forceShare = forceShare;
        _handle = handle;
        (_length, _modified) = Stamp(handle, path);
        LastUse = FileHandleBudget.Tick();
    }

    public string Path { get; }

    /// <summary>Budget clock at the last use (the least recent is parked first).</summary>
    internal long LastUse { get; private set; }

    /// <summary>True while the descriptor is closed by the budget.</summary>
    public bool IsParked
    {
        get
        {
            lock (_gate)
                return _handle is null && !_disposed;
        }
    }

    /// <summary>Open <paramref name="path"/> read-only with reader locks (none with <paramref name="forceShare"/>).</summary>
    public static ParkableFileHandle Open(string path, bool forceShare)
    {
        var handle = new ParkableFileHandle(path, forceShare, ImageFiles.Open(path, readOnly: true, forceShare));
        FileHandleBudget.Opened(handle, again: false);
        return handle;
    }

    /// <summary>The open descriptor, reopened if it was parked; until <see cref="Exit"/> it stays open. Exit must follow.</summary>
    /// <exception cref="BlockException">BackingFileChanged, or the errors of opening the file.</exception>
    public SafeFileHandle Enter()
    {
        Monitor.Enter(_gate);
        try
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            LastUse = FileHandleBudget.Tick();
            if (_handle is null)
                Reopen();
            return _handle!;
        }
        catch
        {
            Monitor.Exit(_gate);
            throw;
        }
    }

    public void Exit() => Monitor.Exit(_gate);

    private void Reopen()
    {
        SafeFileHandle handle = ImageFiles.Open(Path, readOnly: true, _forceShare);
        try
        {
            (long length, DateTime modified) = Stamp(handle, Path);
            if (length != _length || modified != _modified)
                Throw.Block(ErrorIds.BackingFileChanged, BlockErrorCategory.InvalidData,
                    $"Backing file '{Path}' changed while this process had closed it to stay within its budget of {FileHandleBudget.Limit} open backing files " +
                    $"(it was {_length} bytes, modified {_modified:O}; now {length} bytes, modified {modified:O}). A backing file must not change under the images above it; open the chain again.",
                    Path);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
        _handle = handle;
        FileHandleBudget.Opened(this, again: true);
    }

    /// <summary>Close the descriptor if no one is using it (called by the budget). False when busy, parked or disposed.</summary>
    internal bool TryPark()
    {
        if (!Monitor.TryEnter(_gate))
            return false;
        try
        {
            if (_handle is null || _disposed)
                return false;
            _handle.Dispose();
            _handle = null;
            return true;
        }
        finally
        {
            Monitor.Exit(_gate);
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed)
                return;
            _disposed = true;
            _handle?.Dispose();
            _handle = null;
        }
        FileHandleBudget.Closed(this);
    }

    private static (long Length, DateTime Modified) Stamp(SafeFileHandle handle, string path)
    {
        long length = 0;
        DateTime modified = default;
        ImageFiles.Io(path, "read", () =>
        {
            length = RandomAccess.GetLength(handle);
            modified = File.GetLastWriteTimeUtc(handle);
        });
        return (length, modified);
    }
}
