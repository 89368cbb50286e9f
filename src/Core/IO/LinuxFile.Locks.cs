using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/*
 * Open-file-description byte-range locks (fcntl F_OFD_GETLK / F_OFD_SETLK, Linux 3.15), the locks QEMU takes on
 * its images. They belong to the open file description, not to the process: two opens in one process conflict
 * like two processes do, and the kernel drops them when the last descriptor of the description is closed —
 * at close, at process exit and when the process is killed. They never interact with flock().
 */
internal static partial class LinuxFile
{
    private const int FOfdGetLk = 36;
    private const int FOfdSetLk = 37;
    private const short FRdLck = 0;
    private const short FWrLck = 1;
    private const short FUnLck = 2;
    private const short SeekSet = 0;

    /// <summary>struct flock of the 64-bit Linux ABI (32 bytes; l_pid must be 0 for OFD locks).</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct Flock
    {
        public short Type;
        public short Whence;
        public long Start;
        public long Length;
        public int Pid;
    }

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static partial int FcntlLock(int fd, int cmd, ref Flock flock);

    /// <summary>
    /// Whether another open file description holds a lock on byte <paramref name="offset"/> that a write lock
    /// would conflict with (QEMU's qemu_lock_fd_test). Returns 0 or the errno.
    /// </summary>
    public static int TestByte(SafeFileHandle handle, long offset, out bool locked)
    {
        var flock = new Flock { Type = FWrLck, Whence = SeekSet, Start = offset, Length = 1 };
        int errno = Fcntl(handle, FOfdGetLk, ref flock);
        locked = errno == 0 && flock.Type != FUnLck;
        return errno;
    }

    /// <summary>Take a shared (read) lock on byte <paramref name="offset"/>, without waiting. Returns 0 or the errno (EAGAIN: a write lock is held).</summary>
    public static int LockByteShared(SafeFileHandle handle, long offset)
    {
        var flock = new Flock { Type = FRdLck, Whence = SeekSet, Start = offset, Length = 1 };
        return Fcntl(handle, FOfdSetLk, ref flock);
    }

    /// <summary>Release this description's lock on byte <paramref name="offset"/>. Returns 0 or the errno.</summary>
    public static int UnlockByte(SafeFileHandle handle, long offset)
    {
        var flock = new Flock { Type = FUnLck, Whence = SeekSet, Start = offset, Length = 1 };
        return Fcntl(handle, FOfdSetLk, ref flock);
    }

    private static int Fcntl(SafeFileHandle handle, int cmd, ref Flock flock)
    {
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            int fd = (int)handle.DangerousGetHandle();
            int result;
            do
            {
                result = FcntlLock(fd, cmd, ref flock);
            }
            while (result < 0 && Marshal.GetLastPInvokeError() == EINTR);
            return result == 0 ? 0 : Marshal.GetLastPInvokeError();
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException)
        {
            return ENOSYS;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }
}
