using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/// <summary>
/// Opens and creates image files with the engine's locking rule: a writer holds the file exclusively
/// (a second writer or reader fails), readers share it with other readers. On Linux .NET implements this
/// with flock, which also applies between two opens in the same process.
/// </summary>
internal static class ImageFiles
{
    public static SafeFileHandle Open(string path, bool readOnly)
    {
        if (Directory.Exists(path))
            Throw.Block(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"'{path}' is a folder, not an image file.", path);
        if (!File.Exists(path))
            Throw.Block(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"Image file '{path}' does not exist.", path);
        try
        {
            return readOnly
                ? File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read)
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
    }

    /// <summary>Create a new file, failing if it exists; the handle is held exclusively.</summary>
    public static SafeFileHandle CreateNew(string path)
    {
        string? dir = System.IO.Path.GetDirectoryName(path);
        if (!string.IsNullOrEmpty(dir) && !Directory.Exists(dir))
            Throw.Block(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"The folder '{dir}' for image '{path}' does not exist.", path);
        try
        {
            return File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException) when (File.Exists(path) || Directory.Exists(path))
        {
            throw new BlockException(ErrorIds.ImageAlreadyExists, BlockErrorCategory.ResourceExists,
                $"Cannot create image '{path}': a {(Directory.Exists(path) ? "folder" : "file")} with that name already exists.", path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot create image '{path}': {e.Message}", path, e);
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
}
