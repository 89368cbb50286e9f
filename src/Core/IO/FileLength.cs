using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/// <summary>
/// Sets the length of an image file (a raw image's size). A length the file system cannot hold (ext4 with 4 KiB
/// blocks: 16 TiB less one block; EFBIG, which .NET throws as an ArgumentOutOfRangeException) is refused with
/// ImageTooLargeForFileSystem, which names the file system and the largest length it accepts there, found by asking
/// it (sparse truncates on the same file, undone before the error is thrown). Other failures are ImageIOFailed.
/// </summary>
internal static class FileLength
{
    private const long Granularity = 512;

    /// <summary>Set the file's length; <paramref name="what"/> says what for ("create", "resize").</summary>
    /// <exception cref="BlockException">ImageTooLargeForFileSystem, ImageIOFailed.</exception>
    public static void Set(SafeFileHandle handle, string path, long length, string what)
    {
        long before = -1;
        try
        {
            before = RandomAccess.GetLength(handle);
            RandomAccess.SetLength(handle, length);
        }
        catch (ArgumentOutOfRangeException e) when (before >= 0)
        {
            long largest = LargestLength(handle, before, length);
            ImageFiles.Io(path, what, () => RandomAccess.SetLength(handle, before));
            string fileSystem = FileSystems.TypeOf(path) is { } type ? $"file system ({type})" : "file system";
            throw new BlockException(ErrorIds.ImageTooLargeForFileSystem, BlockErrorCategory.InvalidArgument,
                $"Image '{path}' cannot be {length} bytes ({SizeText(length)}) long: the {fileSystem} that holds it allows files of at most {largest} bytes ({SizeText(largest)}).",
                path, e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"I/O error on image '{path}' during {what}: {e.Message}", path, e);
        }
    }

    /// <summary>A size in the largest binary unit that keeps it at least 1 (with up to two decimals): "16 TiB", "1 PiB".</summary>
    private static string SizeText(long bytes)
    {
        string[] units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double value = bytes;
        int unit = 0;
        while (value >= 1024 && unit < units.Length - 1)
        {
            value /= 1024;
            unit++;
        }
        return unit == 0 ? $"{bytes} bytes" : $"{value.ToString("0.##", System.Globalization.CultureInfo.InvariantCulture)} {units[unit]}";
    }

    /// <summary>The largest length (a multiple of 512) the file system takes, between one it took and one it refused.</summary>
    private static long LargestLength(SafeFileHandle handle, long accepted, long refused)
    {
        long low = accepted / Granularity * Granularity;
        long high = refused;
        while (high - low > Granularity)
        {
            long middle = low + ((high - low) / 2 / Granularity * Granularity);
            if (middle <= low)
                break;
            try
            {
                RandomAccess.SetLength(handle, middle);
                low = middle;
            }
            catch (ArgumentOutOfRangeException)
            {
                high = middle;
            }
        }
        return low;
    }
}
