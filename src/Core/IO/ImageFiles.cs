using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/// <summary>
/// Opens and creates image files. Only regular files and block devices are opened: a FIFO, a socket, a character
/// device or a folder is refused with its own error before anything could block on it. On Linux every open takes
/// QEMU's image locks (<see cref="ImageLocks"/>): a writer (a writable node, a backup target, a restore
/// destination, a bitmap sidecar being written) holds the image against every other writer and reader, readers
/// share it with readers, in this process as across processes and with QEMU alike. A force-share read takes no
/// lock at all. Elsewhere .NET's share modes do the same between users of this module (on Windows, its share
/// modes are the platform's locks; on other systems they are flock(), and a warning says QEMU's locks are missing).
/// </summary>
internal static class ImageFiles
{
    /// <summary>Open an existing image: for writing (writer locks), reading (reader locks) or, with <paramref name="forceShare"/>, reading without locks.</summary>
    /// <exception cref="BlockException">
    /// ForceShareRequiresReadOnly, ImageNotFound, ImageIsFolder, ImageIsFifo, ImageIsSocket, ImageIsCharacterDevice,
    /// ImageInUse, ImageIOFailed.
    /// </exception>
    public static SafeFileHandle Open(string path, bool readOnly, bool forceShare = false)
    {
        if (forceShare && !readOnly)
            Throw.Block(ErrorIds.ForceShareRequiresReadOnly, BlockErrorCategory.InvalidArgument,
                $"Image '{path}' cannot be opened for writing with force-share: only a read-only open may ignore the image locks (QEMU: force-share=on can only be used with read-only images).", path);
        if (OperatingSystem.IsLinux())
            return OpenOnLinux(path, write: !readOnly, create: false, forceShare ? null : readOnly ? ImageLockRole.Reader : ImageLockRole.Writer);
        WarnNoImageLocks();
        CheckIsFileElsewhere(path);
        try
        {
            return readOnly
                ? File.OpenHandle(path, FileMode.Open, FileAccess.Read, forceShare ? FileShare.ReadWrite : FileShare.Read)
                : File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.None);
        }
        catch (UnauthorizedAccessException e)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.PermissionDenied,
                $"Image file '{path}' cannot be opened {(readOnly ? "for reading" : "for writing")}: {e.Message}", path, e);
        }
        catch (IOException e) when (e is not FileNotFoundException and not DirectoryNotFoundException)
        {
            throw new BlockException(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Image file '{path}' is locked by another user of the image (it is open for writing elsewhere, or open here while you ask to write it).",
                path, e);
        }
        catch (IOException e)
        {
            throw new BlockException(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"Image file '{path}' does not exist.", path, e);
        }
    }

    /// <summary>
    /// Open an existing file for reading without any lock: to probe an image's format (probing never conflicts
    /// with a user of the image; the driver's open that follows takes the locks), or to read a file that is only
    /// ever replaced whole by a rename (a bitmap sidecar).
    /// </summary>
    public static SafeFileHandle OpenUnlocked(string path) => Open(path, readOnly: true, forceShare: true);

    /// <summary>Create a new file, failing if it exists; the handle holds the writer locks.</summary>
    public static SafeFileHandle CreateNew(string path)
    {
        string? dir = System.IO.Path.GetDirectoryName(path);
        if (!string.IsNullOrEmpty(dir) && !Directory.Exists(dir))
            Throw.Block(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"The folder '{dir}' for image '{path}' does not exist.", path);
        if (OperatingSystem.IsLinux())
            return OpenOnLinux(path, write: true, create: true, ImageLockRole.Writer, exclusive: true);
        try
        {
            return File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException) when (File.Exists(path) || Directory.Exists(path))
        {
            throw AlreadyExists(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot create image '{path}': {e.Message}", path, e);
        }
    }

    /// <summary>
    /// Open a file to write it anew from offset 0, creating it if missing: the writer locks are taken first, and
    /// only then is the file truncated, so a file another writer holds is never cut under it.
    /// </summary>
    public static SafeFileHandle OpenToRewrite(string path)
    {
        SafeFileHandle handle;
        if (OperatingSystem.IsLinux())
        {
            handle = OpenOnLinux(path, write: true, create: true, ImageLockRole.Writer);
        }
        else
        {
            try
            {
                handle = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot write '{path}': {e.Message}", path, e);
            }
        }
        try
        {
            Io(path, "write", () => RandomAccess.SetLength(handle, 0));
            return handle;
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Run an I/O call and turn an OS failure into a <see cref="BlockException"/> naming the image.</summary>
    public static void Io(string path, string what, Action action)
    {
        try
        {
            action();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, what.StartsWith("read", StringComparison.Ordinal) ? BlockErrorCategory.ReadError : BlockErrorCategory.WriteError,
                $"I/O error on image '{path}' during {what}: {e.Message}", path, e);
        }
    }

    /// <summary>
    /// Refuse what is not a regular file or a block device, by its type (stat, links followed), without opening it.
    /// </summary>
    /// <exception cref="BlockException">ImageNotFound, ImageIsFolder, ImageIsFifo, ImageIsSocket, ImageIsCharacterDevice.</exception>
    public static void CheckIsImageFile(string path)
    {
        if (!OperatingSystem.IsLinux())
        {
            CheckIsFileElsewhere(path);
            return;
        }
        int errno = LinuxFile.GetKind(path, out FileKind kind);
        if (errno is LinuxFile.ENOENT or LinuxFile.ENOTDIR)
            throw NotFound(path);
        RefuseKind(path, kind);
    }

    private static SafeFileHandle OpenOnLinux(string path, bool write, bool create, ImageLockRole? role, bool exclusive = false)
    {
        if (!create)
            CheckIsImageFile(path);
        int errno = LinuxFile.OpenNonBlocking(path, write, create, exclusive, out SafeFileHandle handle);
        if (errno is LinuxFile.EMFILE or LinuxFile.ENFILE && FileHandleBudget.ParkIdle() > 0)
            errno = LinuxFile.OpenNonBlocking(path, write, create, exclusive, out handle); // idle backing files gave their descriptors back
        if (errno != 0)
            throw OpenFailed(path, write, create, errno);
        try
        {
            // What was opened may not be what was checked: a FIFO put there meanwhile did not block the open (O_NONBLOCK).
            // Without statx the type stays unknown, and so does O_NONBLOCK: no read of it can wait either.
            if (LinuxFile.GetKind(handle, out FileKind kind, out ulong device) == 0)
            {
                RefuseKind(path, kind);
                errno = LinuxFile.ClearNonBlocking(handle);
                if (errno != 0)
                    throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError, $"Cannot open image file '{path}': {LinuxFile.Describe(errno)}", path);
            }
            if (role is { } r)
                ImageLocks.Acquire(handle, path, r, device);
            return handle;
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    private static void RefuseKind(string path, FileKind kind)
    {
        switch (kind)
        {
            case FileKind.Folder:
                Throw.Block(ErrorIds.ImageIsFolder, BlockErrorCategory.InvalidArgument, $"'{path}' is a folder, not an image file.", path);
                break;
            case FileKind.Fifo:
                Throw.Block(ErrorIds.ImageIsFifo, BlockErrorCategory.InvalidArgument,
                    $"'{path}' is a FIFO (named pipe), not an image file: only regular files and block devices can be opened.", path);
                break;
            case FileKind.Socket:
                Throw.Block(ErrorIds.ImageIsSocket, BlockErrorCategory.InvalidArgument,
                    $"'{path}' is a socket, not an image file: only regular files and block devices can be opened.", path);
                break;
            case FileKind.CharacterDevice:
                Throw.Block(ErrorIds.ImageIsCharacterDevice, BlockErrorCategory.InvalidArgument,
                    $"'{path}' is a character device, not an image file: only regular files and block devices can be opened.", path);
                break;
        }
    }

    private static BlockException OpenFailed(string path, bool write, bool create, int errno) => errno switch
    {
        LinuxFile.EMFILE or LinuxFile.ENFILE => TooManyOpenFiles(path, errno),
        LinuxFile.ENOENT or LinuxFile.ENOTDIR when create => new BlockException(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound,
            $"The folder of image '{path}' does not exist.", path),
        LinuxFile.ENOENT or LinuxFile.ENOTDIR => NotFound(path),
        LinuxFile.EEXIST => AlreadyExists(path),
        LinuxFile.EISDIR => new BlockException(ErrorIds.ImageIsFolder, BlockErrorCategory.InvalidArgument, $"'{path}' is a folder, not an image file.", path),
        LinuxFile.EACCES or LinuxFile.EPERM or LinuxFile.EROFS => new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.PermissionDenied,
            create
                ? $"Cannot create image '{path}': {LinuxFile.Describe(errno)}"
                : $"Image file '{path}' cannot be opened {(write ? "for writing" : "for reading")}: {LinuxFile.Describe(errno)}", path),
        _ => new BlockException(ErrorIds.ImageIOFailed, create ? BlockErrorCategory.WriteError : BlockErrorCategory.ReadError,
            create ? $"Cannot create image '{path}': {LinuxFile.Describe(errno)}" : $"Cannot open image file '{path}': {LinuxFile.Describe(errno)}", path),
    };

    /// <summary>
    /// Out of file descriptors (EMFILE: this process's limit; ENFILE: the system's): a resource limit, not a lock held by
    /// someone else, so a runbook that retries on ImageInUse does not loop on it.
    /// </summary>
    private static BlockException TooManyOpenFiles(string path, int errno)
    {
        string limit = errno == LinuxFile.ENFILE
            ? "the system's limit on open files is reached"
            : LinuxFile.OpenFileLimit() is (ulong soft, ulong hard)
                ? $"this process has reached its limit of {soft} open files (hard limit {hard}; ulimit -n)"
                : "this process has reached its limit on open files (ulimit -n)";
        return new BlockException(ErrorIds.TooManyOpenFiles, BlockErrorCategory.LimitsExceeded,
            $"Cannot open image file '{path}': {LinuxFile.Describe(errno)}: {limit}. Close nodes or raise the limit.", path);
    }

    private static BlockException NotFound(string path)
        => new(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"Image file '{path}' does not exist.", path);

    private static BlockException AlreadyExists(string path)
        => new(ErrorIds.ImageAlreadyExists, BlockErrorCategory.ResourceExists,
            $"Cannot create image '{path}': a {(Directory.Exists(path) ? "folder" : "file")} with that name already exists.", path);

    private static void CheckIsFileElsewhere(string path)
    {
        if (Directory.Exists(path))
            Throw.Block(ErrorIds.ImageIsFolder, BlockErrorCategory.InvalidArgument, $"'{path}' is a folder, not an image file.", path);
        if (!File.Exists(path))
            throw NotFound(path);
    }

    private static void WarnNoImageLocks()
    {
        if (!OperatingSystem.IsWindows())
            EngineWarnings.PostOnce("image-locks:platform",
                $"QEMU's image locks (OFD locks) are not available on {System.Runtime.InteropServices.RuntimeInformation.OSDescription}: images are locked only against other users of this module (flock), not against QEMU.");
    }
}
