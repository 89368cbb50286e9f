using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/*
 * Block devices: what fstat cannot tell (st_size is 0 for a device), from the block layer's ioctls, as QEMU's
 * host_device driver asks them (block/file-posix.c): BLKGETSIZE64 for the size in bytes, BLKSSZGET and BLKPBSZGET
 * for the logical and physical sector sizes, BLKZEROOUT and BLKDISCARD for zeroing and discarding a range (both
 * take a {start, length} pair of u64 in bytes, each a multiple of the logical sector size), LOOP_GET_STATUS64 for a
 * loop device's backing file. Request numbers are those of the generic Linux ABI (x86_64 and arm64 alike).
 */
internal static partial class LinuxFile
{
    private const ulong BlkGetSize64 = 0x80081272; // _IOR(0x12, 114, size_t)
    private const ulong BlkSszGet = 0x1268;        // _IO(0x12, 104)
    private const ulong BlkPbszGet = 0x127B;       // _IO(0x12, 123)
    private const ulong BlkDiscard = 0x1277;       // _IO(0x12, 119)
    private const ulong BlkZeroOut = 0x127F;       // _IO(0x12, 127)
    private const ulong LoopGetStatus64 = 0x4C05;
    private const int LoopInfo64Size = 232;        // struct loop_info64
    private const int StatxRDevMajorOffset = 128;
    private const int StatxRDevMinorOffset = 132;
    private const int StatxInoOffset = 32;
    private const int StatxBirthOffset = 80;
    private const uint StatxInoMask = 0x100;       // STATX_INO
    private const uint StatxBirthMask = 0x800;     // STATX_BTIME

    public const int ENOTTY = 25;
    public const int ENOSPC = 28;

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    private static unsafe partial int Ioctl(int fd, ulong request, void* argument);

    /// <summary>One ioctl with a pointer argument on the open descriptor; 0 or the errno (ENOSYS off Linux).</summary>
    private static unsafe int IoctlCall(SafeFileHandle handle, ulong request, void* argument)
    {
        if (!Available)
            return ENOSYS;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            int fd = (int)handle.DangerousGetHandle();
            int result;
            do
            {
                result = Ioctl(fd, request, argument);
            }
            while (result < 0 && Marshal.GetLastPInvokeError() == EINTR);
            return result < 0 ? Marshal.GetLastPInvokeError() : 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return ENOSYS;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    /// <summary>The size of a block device in bytes (BLKGETSIZE64). Returns 0 or the errno.</summary>
    public static unsafe int GetDeviceSize(SafeFileHandle handle, out long size)
    {
        ulong bytes = 0;
        int errno = IoctlCall(handle, BlkGetSize64, &bytes);
        size = (long)bytes;
        return errno;
    }

    /// <summary>Logical and physical sector sizes of a block device (BLKSSZGET, BLKPBSZGET). Returns 0 or the errno.</summary>
    public static unsafe int GetSectorSizes(SafeFileHandle handle, out int logical, out int physical)
    {
        int l = 0;
        uint p = 0;
        int errno = IoctlCall(handle, BlkSszGet, &l);
        if (errno == 0)
            errno = IoctlCall(handle, BlkPbszGet, &p);
        logical = l;
        physical = (int)p;
        return errno;
    }

    /// <summary>
    /// Make a range of a block device read as zeros in the device (BLKZEROOUT: a WRITE ZEROES command where the device
    /// has one, zero pages written by the kernel otherwise). Offset and length are multiples of the logical sector
    /// size. Returns 0 or the errno (EINVAL, EOPNOTSUPP, ENOTTY where it cannot).
    /// </summary>
    public static unsafe int ZeroOutDevice(SafeFileHandle handle, long offset, long length)
    {
        ulong* range = stackalloc ulong[2];
        range[0] = (ulong)offset;
        range[1] = (ulong)length;
        return IoctlCall(handle, BlkZeroOut, range);
    }

    /// <summary>Discard a range of a block device (BLKDISCARD); what it reads afterwards is up to the device. Returns 0 or the errno.</summary>
    public static unsafe int DiscardDevice(SafeFileHandle handle, long offset, long length)
    {
        ulong* range = stackalloc ulong[2];
        range[0] = (ulong)offset;
        range[1] = (ulong)length;
        return IoctlCall(handle, BlkDiscard, range);
    }

    /// <summary>
    /// The backing file of a loop device (LOOP_GET_STATUS64): its file system and inode, and the offset the device
    /// starts at in it. Returns 0 or the errno (ENXIO when no file is attached, ENOTTY for a device that is not a loop).
    /// </summary>
    public static unsafe int GetLoopBacking(SafeFileHandle handle, out ulong device, out ulong inode, out ulong offset)
    {
        byte* info = stackalloc byte[LoopInfo64Size];
        new Span<byte>(info, LoopInfo64Size).Clear();
        int errno = IoctlCall(handle, LoopGetStatus64, info);
        device = *(ulong*)info;
        inode = *(ulong*)(info + 8);
        offset = *(ulong*)(info + 24);
        return errno;
    }

    /// <summary>The device number (major, minor) of the open block or character device. Returns 0 or the errno.</summary>
    public static unsafe int GetDeviceNumber(SafeFileHandle handle, out uint major, out uint minor)
    {
        major = minor = 0;
        byte* buffer = stackalloc byte[StatxSize];
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            int errno = StatxCall((int)handle.DangerousGetHandle(), "", AtEmptyPath, buffer);
            if (errno != 0)
                return errno;
            major = *(uint*)(buffer + StatxRDevMajorOffset);
            minor = *(uint*)(buffer + StatxRDevMinorOffset);
            return 0;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    /// <summary>The kind of the file at <paramref name="path"/> (links followed) and, for a device, its number. Returns 0 or the errno.</summary>
    public static unsafe int GetDeviceNumber(string path, out FileKind kind, out uint major, out uint minor)
    {
        kind = FileKind.Unknown;
        major = minor = 0;
        byte* buffer = stackalloc byte[StatxSize];
        int errno = StatxCall(AtFdCwd, path, 0, buffer);
        if (errno != 0)
            return errno;
        kind = KindOf(*(ushort*)(buffer + StatxModeOffset));
        major = *(uint*)(buffer + StatxRDevMajorOffset);
        minor = *(uint*)(buffer + StatxRDevMinorOffset);
        return 0;
    }

    /// <summary>
    /// Which file is open (or, with a path, named): its file system (major:minor), inode number and birth time (0 where
    /// the file system keeps none). Returns 0 or the errno.
    /// </summary>
    public static unsafe int GetInodeIdentity(SafeFileHandle? handle, string path, out ulong fileSystem, out ulong inode, out long born)
    {
        fileSystem = inode = 0;
        born = 0;
        byte* buffer = stackalloc byte[StatxSize];
        bool added = false;
        try
        {
            int errno;
            try
            {
                if (handle is not null)
                {
                    handle.DangerousAddRef(ref added);
                    errno = Statx((int)handle.DangerousGetHandle(), "", AtEmptyPath, StatxTypeMask | StatxInoMask | StatxBirthMask, buffer) == 0 ? 0 : Marshal.GetLastPInvokeError();
                }
                else
                {
                    errno = Statx(AtFdCwd, path, 0, StatxTypeMask | StatxInoMask | StatxBirthMask, buffer) == 0 ? 0 : Marshal.GetLastPInvokeError();
                }
            }
            catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException)
            {
                return ENOSYS;
            }
            if (errno != 0)
                return errno;
            uint mask = *(uint*)buffer;
            fileSystem = ((ulong)*(uint*)(buffer + StatxDevMajorOffset) << 32) | *(uint*)(buffer + StatxDevMinorOffset);
            inode = (mask & StatxInoMask) != 0 ? *(ulong*)(buffer + StatxInoOffset) : 0;
            born = (mask & StatxBirthMask) != 0 ? (*(long*)(buffer + StatxBirthOffset) * 1_000_000_000L) + *(uint*)(buffer + StatxBirthOffset + 8) : 0;
            return 0;
        }
        finally
        {
            if (added)
                handle!.DangerousRelease();
        }
    }

    [LibraryImport("libc", EntryPoint = "access", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Access(string path, int mode);

    /// <summary>Whether this process may create files in <paramref name="folder"/> (access W_OK|X_OK: permissions and a read-only mount).</summary>
    public static bool CanWriteIn(string folder)
    {
        if (!Available)
            return true;
        try
        {
            return Access(folder, 0x2 | 0x1) == 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return true;
        }
    }
}
