using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/// <summary>
/// The few Linux file calls .NET does not expose: hole-aware seeking (SEEK_DATA/SEEK_HOLE) for allocation
/// maps and hole punching for write-zeroes. Every call degrades to "not supported" (false) off Linux or on
/// file systems without the feature, and callers then fall back to plain I/O.
/// </summary>
internal static partial class LinuxFile
{
    private const int SeekData = 3;
    private const int SeekHole = 4;
    private const int FallocKeepSize = 0x01;
    private const int FallocPunchHole = 0x02;
    private const int ENXIO = 6;

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long LSeek(int fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int FAllocate(int fd, int mode, long offset, long length);

    private static bool Available => OperatingSystem.IsLinux();

    /// <summary>
    /// Next data and hole offsets at or after <paramref name="offset"/>. Returns false when unsupported.
    /// <paramref name="dataStart"/> is the file size when there is no more data.
    /// </summary>
    public static bool TryFindData(SafeFileHandle handle, long offset, long fileSize, out long dataStart, out long dataEnd)
    {
        dataStart = dataEnd = fileSize;
        if (!Available)
            return false;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            int fd = (int)handle.DangerousGetHandle();
            long data = LSeek(fd, offset, SeekData);
            if (data < 0)
                return Marshal.GetLastPInvokeError() == ENXIO; // ENXIO: no data past offset
            long hole = LSeek(fd, data, SeekHole);
            if (hole < 0)
                return false;
            dataStart = Math.Min(data, fileSize);
            dataEnd = Math.Min(hole, fileSize);
            return true;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int FSync(int fd);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);

    /// <summary>
    /// Make a rename in <paramref name="directory"/> durable (fsync of the folder), so that after a power failure
    /// the new name is there. Best effort: false when unsupported.
    /// </summary>
    public static bool TrySyncDirectory(string directory)
    {
        if (!Available)
            return false;
        try
        {
            int fd = Open(directory, 0x10000 /* O_RDONLY | O_DIRECTORY */);
            if (fd < 0)
                return false;
            try
            {
                return FSync(fd) == 0;
            }
            finally
            {
                Close(fd);
            }
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
    }

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static partial int FDataSync(int fd);

    /// <summary>
    /// Make the file's data durable (fdatasync: data and the metadata needed to read it, not timestamps), as QEMU's
    /// flush does. False when unsupported (the caller falls back to a full fsync); an I/O error (EIO, ENOSPC) throws
    /// <see cref="IOException"/> with the system's message.
    /// </summary>
    public static bool TryDataSync(SafeFileHandle handle)
    {
        if (!Available)
            return false;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            if (FDataSync((int)handle.DangerousGetHandle()) == 0)
                return true;
            int errno = Marshal.GetLastPInvokeError();
            throw new IOException(Marshal.GetPInvokeErrorMessage(errno), errno);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    [LibraryImport("libc", EntryPoint = "sync_file_range", SetLastError = true)]
    private static partial int SyncFileRange(int fd, long offset, long nbytes, uint flags);

    private const uint SyncFileRangeWrite = 2; // SYNC_FILE_RANGE_WRITE: start writeback of the dirty pages, do not wait

    /// <summary>
    /// Start writing the file's dirty pages to the disk without waiting (sync_file_range SYNC_FILE_RANGE_WRITE): a
    /// later fdatasync then waits only for what was written since. A hint: durability still needs the fdatasync, and
    /// where the call is missing or fails nothing happens.
    /// </summary>
    public static void StartWriteback(SafeFileHandle handle)
    {
        if (!Available)
            return;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            _ = SyncFileRange((int)handle.DangerousGetHandle(), 0, 0, SyncFileRangeWrite);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    /// <summary>fdatasync where available, else a full flush to disk.</summary>
    public static void DataSync(SafeFileHandle handle)
    {
        if (!TryDataSync(handle))
            RandomAccess.FlushToDisk(handle);
    }

    /// <summary>
    /// Allocate the blocks of a range (fallocate mode 0; the file grows to cover it), so that later writes there need no
    /// free space. Returns 0, or the errno (ENOSPC when the file system is full; EOPNOTSUPP where it cannot).
    /// </summary>
    public static int Allocate(SafeFileHandle handle, long offset, long length)
    {
        if (!Available || length <= 0)
            return 0;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            return FAllocate((int)handle.DangerousGetHandle(), 0, offset, length) == 0 ? 0 : Marshal.GetLastPInvokeError();
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return EOPNOTSUPP;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    /// <summary>Deallocate a range, keeping the file size. Returns false when unsupported.</summary>
    public static bool TryPunchHole(SafeFileHandle handle, long offset, long length)
    {
        if (!Available || length <= 0)
            return false;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            return FAllocate((int)handle.DangerousGetHandle(), FallocPunchHole | FallocKeepSize, offset, length) == 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }
}
