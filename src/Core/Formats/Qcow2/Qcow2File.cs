using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The image file under a qcow2 image: positional reads (zero-filled past the end of the file, as QEMU's file
/// driver reads), writes and fsync, with OS errors turned into <see cref="BlockException"/>s naming the file.
/// Tracks the file length so that offsets read from the image can be checked against it. A backing file's
/// descriptor is parkable (<see cref="ParkableFileHandle"/>): every call holds it open only while it runs.
/// </summary>
internal sealed class Qcow2File : IDisposable
{
    private readonly SafeFileHandle? _handle;
    private readonly ParkableFileHandle? _parkable;

    public Qcow2File(string path, SafeFileHandle handle)
    {
        Path = path;
        _handle = handle;
        Length = ImageFiles.Length(handle, path);
        Device = Get(() => BlockDevice.Of(handle), "read");
    }

    /// <summary>A read-only file whose descriptor the process's budget of open backing files may close while idle.</summary>
    public Qcow2File(ParkableFileHandle parkable)
    {
        Path = parkable.Path;
        _parkable = parkable;
        SafeFileHandle handle = Enter();
        try
        {
            Length = ImageFiles.Length(handle, Path);
        }
        finally
        {
            Exit();
        }
    }

    /// <summary>True when the descriptor is closed for now (a parked backing file).</summary>
    internal bool IsParked => _parkable?.IsParked == true;

    private SafeFileHandle Enter() => _handle ?? _parkable!.Enter();

    private void Exit() => _parkable?.Exit();

    public string Path { get; }

    /// <summary>
    /// The block device the image is on (qcow2 written straight onto an LVM volume, as oVirt does), or null for a file.
    /// A device is as long as it is: the image cannot grow past its end, where a write fails with ENOSPC.
    /// </summary>
    public BlockDevice? Device { get; }

    /// <summary>Current length of the file in bytes (grows with writes past the end); a device's size.</summary>
    public long Length { get; private set; }

    /// <summary>
    /// Test hook: sees every write (offset, bytes) and every fsync (offset -1, no bytes), in order, so that a test
    /// can replay any prefix of them as the state a crash could leave.
    /// </summary>
    internal Action<long, byte[]?>? Observer { get; set; }

    /// <summary>Read <paramref name="buffer"/> at <paramref name="offset"/>; bytes past the end of the file read as zeros.</summary>
    public void Read(long offset, Span<byte> buffer)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            int n;
            try
            {
                Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileRead, offset + done, buffer.Length - done);
                SafeFileHandle handle = Enter();
                try
                {
                    n = RandomAccess.Read(handle, buffer[done..], offset + done);
                }
                finally
                {
                    Exit();
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError,
                    $"I/O error on image '{Path}' during read at offset {offset + done}: {e.Message}", Path, e);
            }
            if (n == 0)
            {
                buffer[done..].Clear();
                return;
            }
            done += n;
        }
    }

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        if (data.IsEmpty)
            return;
        Observer?.Invoke(offset, data.ToArray());
        _unsynced = true;
        Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileWrite, offset, data.Length);
        SafeFileHandle handle = Enter();
        try
        {
            RandomAccess.Write(handle, data, offset);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"I/O error on image '{Path}' during write at offset {offset}: {e.Message}", Path, e);
        }
        finally
        {
            Exit();
        }
        Length = Math.Max(Length, offset + data.Length);
    }

    /// <summary>Read a block device's size again (it may have been grown since the open); returns the length. Only for a device.</summary>
    public long RefreshDeviceLength()
    {
        SafeFileHandle handle = Enter();
        try
        {
            Length = ImageFiles.Length(handle, Path);
        }
        finally
        {
            Exit();
        }
        return Length;
    }

    /// <summary>Make the file at least <paramref name="length"/> bytes long (the new part reads as zeros).</summary>
    public void Extend(long length)
    {
        if (length <= Length)
            return;
        _unsynced = true;
        Get(() =>
        {
            SafeFileHandle handle = Enter();
            try
            {
                RandomAccess.SetLength(handle, length);
            }
            finally
            {
                Exit();
            }
            return 0;
        }, "write");
        Length = length;
    }

    /// <summary>Written since the last sync that succeeded.</summary>
    private bool _unsynced;

    /// <summary>
    /// A scratch image (a backup's '.partial' file, discarded after a crash): ordering barriers (<see cref="Sync"/>) are
    /// skipped, and only <see cref="SyncNow"/> (the commit) syncs. Saves the fsyncs of every metadata stage.
    /// </summary>
    public bool DeferOrdering { get; set; }

    /// <summary>
    /// An ordering barrier: everything written so far is durable before anything written after (fdatasync). Nothing to
    /// do when nothing was written since the last sync, or for a scratch image (<see cref="DeferOrdering"/>).
    /// </summary>
    public void Sync()
    {
        if (!DeferOrdering)
            SyncNow();
    }

    /// <summary>Start writing what was written so far to the disk, without waiting (<see cref="LinuxFile.StartWriteback"/>).</summary>
    public void StartWriteback()
    {
        SafeFileHandle handle = Enter();
        try
        {
            LinuxFile.StartWriteback(handle);
        }
        finally
        {
            Exit();
        }
    }

    /// <summary>A durability point (fdatasync): everything written so far is durable when this returns.</summary>
    public void SyncNow()
    {
        if (!_unsynced)
            return;
        Observer?.Invoke(-1, null);
        Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileSync, 0, 1);
        Get(() =>
        {
            SafeFileHandle handle = Enter();
            try
            {
                IO.LinuxFile.DataSync(handle);
            }
            finally
            {
                Exit();
            }
            return 0;
        }, "flush");
        _unsynced = false;
    }

    public void Dispose()
    {
        _handle?.Dispose();
        _parkable?.Dispose();
    }

    private T Get<T>(Func<T> action, string what)
    {
        try
        {
            return action();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, what == "read" ? BlockErrorCategory.ReadError : BlockErrorCategory.WriteError,
                $"I/O error on image '{Path}' during {what}: {e.Message}", Path, e);
        }
    }
}
