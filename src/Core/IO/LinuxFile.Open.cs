using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/*
 * Opening image files on Linux without .NET's File.OpenHandle, for two reasons: .NET's open blocks on a FIFO
 * (open(2) of a FIFO waits for the other end) and takes flock() locks, which QEMU neither sees nor honours.
 * Here every open has O_NONBLOCK (a FIFO put in place between the type check and the open cannot block it; the
 * flag is cleared again once the descriptor is known to be a file or a block device), O_CLOEXEC (a child process
 * such as qemu-img must not inherit the descriptor, or it would keep our image locks alive) and O_NOCTTY.
 * File types come from statx(2), whose structure has the same layout on every architecture.
 */
internal static partial class LinuxFile
{
    // <fcntl.h> values of the generic Linux ABI (x86_64 and arm64 alike).
    private const int ORdOnly = 0x0;
    private const int ORdWr = 0x2;
    private const int OCreat = 0x40;
    private const int OExcl = 0x80;
    private const int ONoCtty = 0x100;
    private const int ONonBlock = 0x800;
    private const int OCloExec = 0x80000;
    private const int FGetFl = 3;
    private const int FSetFl = 4;
    private const int NewFileMode = 0x1B6; // 0666, less the umask: what .NET creates files with

    private const int AtFdCwd = -100;
    private const int AtEmptyPath = 0x1000;
    private const uint StatxTypeMask = 0x1; // STATX_TYPE
    private const int StatxSize = 256;
    private const int StatxModeOffset = 28;
    private const int StatxDevMajorOffset = 136;
    private const int StatxDevMinorOffset = 140;
    private const int SIfMt = 0xF000;

    public const int ENOENT = 2;
    public const int EINTR = 4;
    public const int EAGAIN = 11;
    public const int EACCES = 13;
    public const int EEXIST = 17;
    public const int ENOTDIR = 20;
    public const int EISDIR = 21;
    public const int EINVAL = 22;
    public const int EROFS = 30;
    public const int ENOLCK = 37;
    public const int ENOSYS = 38;
    public const int EOPNOTSUPP = 95;
    public const int EPERM = 1;
    public const int ENFILE = 23;
    public const int EMFILE = 24;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int OpenWithMode(string path, int flags, int mode);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static partial int FcntlInt(int fd, int cmd, int arg);

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static unsafe partial int Statx(int dirfd, string path, int flags, uint mask, byte* buffer);

    /// <summary>
    /// The kind of file at <paramref name="path"/> (links followed). Returns 0 or the errno: ENOENT when nothing is
    /// there; ENOSYS when statx is missing (<paramref name="kind"/> is then <see cref="FileKind.Unknown"/>).
    /// </summary>
    public static unsafe int GetKind(string path, out FileKind kind)
    {
        kind = FileKind.Unknown;
        byte* buffer = stackalloc byte[StatxSize];
        int errno = StatxCall(AtFdCwd, path, 0, buffer);
        if (errno == 0)
            kind = KindOf(*(ushort*)(buffer + StatxModeOffset));
        return errno;
    }

    /// <summary>The kind of the open file, and the file system it is on (major:minor of its device).</summary>
    public static unsafe int GetKind(SafeFileHandle handle, out FileKind kind, out ulong device)
    {
        kind = FileKind.Unknown;
        device = 0;
        byte* buffer = stackalloc byte[StatxSize];
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            int errno = StatxCall((int)handle.DangerousGetHandle(), "", AtEmptyPath, buffer);
            if (errno != 0)
                return errno;
            kind = KindOf(*(ushort*)(buffer + StatxModeOffset));
            device = ((ulong)*(uint*)(buffer + StatxDevMajorOffset) << 32) | *(uint*)(buffer + StatxDevMinorOffset);
            return 0;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    /// <summary>
    /// Which file <paramref name="path"/> is (links followed): its file system (major:minor), inode number and, where
    /// the file system keeps one, its birth time. Returns 0 or the errno (ENOSYS without statx).
    /// </summary>
    public static int GetIdentity(string path, out FileIdentity identity)
    {
        int errno = GetInodeIdentity(null, path, out ulong fileSystem, out ulong inode, out long born);
        identity = errno == 0
            ? new FileIdentity(fileSystem, inode, born / 1_000_000_000L, (uint)(born % 1_000_000_000L))
            : default;
        return errno;
    }

    private static unsafe int StatxCall(int dirfd, string path, int flags, byte* buffer)
    {
        try
        {
            return Statx(dirfd, path, flags, StatxTypeMask, buffer) == 0 ? 0 : Marshal.GetLastPInvokeError();
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException)
        {
            return ENOSYS; // glibc before 2.28
        }
    }

    private static FileKind KindOf(ushort mode) => (mode & SIfMt) switch
    {
        0x8000 => FileKind.RegularFile,
        0x6000 => FileKind.BlockDevice,
        0x4000 => FileKind.Folder,
        0x2000 => FileKind.CharacterDevice,
        0x1000 => FileKind.Fifo,
        0xC000 => FileKind.Socket,
        _ => FileKind.Unknown,
    };

    /// <summary>
    /// open(2) that never blocks and is never inherited: read-only or read-write; with <paramref name="create"/>
    /// the file is created if missing (with <paramref name="exclusive"/>, only then). Never truncates. Returns 0 or
    /// the errno; the caller checks the kind of what it got and then calls <see cref="ClearNonBlocking"/>.
    /// </summary>
    public static int OpenNonBlocking(string path, bool write, bool create, bool exclusive, out SafeFileHandle handle)
    {
        int flags = (write ? ORdWr : ORdOnly) | ONonBlock | OCloExec | ONoCtty
            | (create ? OCreat : 0) | (create && exclusive ? OExcl : 0);
        int fd;
        do
        {
            fd = OpenWithMode(path, flags, NewFileMode);
        }
        while (fd < 0 && Marshal.GetLastPInvokeError() == EINTR);
        if (fd < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            handle = new SafeFileHandle();
            return errno;
        }
        handle = new SafeFileHandle(fd, ownsHandle: true);
        return 0;
    }

    /// <summary>Back to blocking I/O (the default) once the descriptor is known to be a file or a device.</summary>
    public static int ClearNonBlocking(SafeFileHandle handle)
    {
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            int fd = (int)handle.DangerousGetHandle();
            int flags = FcntlInt(fd, FGetFl, 0);
            if (flags < 0 || FcntlInt(fd, FSetFl, flags & ~ONonBlock) < 0)
                return Marshal.GetLastPInvokeError();
            return 0;
        }
        finally
        {
            if (added)
                handle.DangerousRelease();
        }
    }

    /// <summary>The system's text for an errno.</summary>
    public static string Describe(int errno) => Marshal.GetPInvokeErrorMessage(errno);

    [StructLayout(LayoutKind.Sequential)]
    private struct RLimit
    {
        public ulong Current;
        public ulong Maximum;
    }

    [LibraryImport("libc", EntryPoint = "getrlimit", SetLastError = true)]
    private static partial int GetRLimit(int resource, out RLimit limit);

    /// <summary>The process's limit on open files (RLIMIT_NOFILE: soft, hard), or null when unknown.</summary>
    public static (ulong Soft, ulong Hard)? OpenFileLimit()
    {
        try
        {
            return OperatingSystem.IsLinux() && GetRLimit(7 /* RLIMIT_NOFILE */, out RLimit l) == 0 ? (l.Current, l.Maximum) : null;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
    }
}
