using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Formats;

/// <summary>
/// Tells image formats apart by content, as QEMU's probing does for the formats we know: a file starting with the
/// qcow2 magic is qcow2, anything else is raw.
/// </summary>
public static class ImageProbe
{
    /// <summary>Bytes <see cref="Detect"/> looks at.</summary>
    public const int ProbeLength = 4;

    /// <summary>The format of the image file at <paramref name="path"/>.</summary>
    /// <remarks>Reading takes a shared lock, so an image open for writing (here or in another process using the
    /// engine's locks) cannot be probed: ImageInUse.</remarks>
    /// <exception cref="BlockException">ImageNotFound, ImageInUse, ImageIOFailed.</exception>
    public static ImageFormat Detect(string path)
    {
        if (!File.Exists(path))
            Throw.Block(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"Image file '{path}' does not exist.", path);
        Span<byte> first = stackalloc byte[ProbeLength];
        int n = 0;
        try
        {
            using Microsoft.Win32.SafeHandles.SafeFileHandle handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            while (n < first.Length)
            {
                int read = RandomAccess.Read(handle, first[n..], n);
                if (read == 0)
                    break;
                n += read;
            }
        }
        catch (UnauthorizedAccessException e)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.PermissionDenied, $"Image file '{path}' cannot be read: {e.Message}", path, e);
        }
        catch (IOException e) when (e is not FileNotFoundException and not DirectoryNotFoundException)
        {
            throw new BlockException(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Image file '{path}' cannot be probed: {e.Message}", path, e);
        }
        catch (IOException e)
        {
            throw new BlockException(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"Image file '{path}' does not exist.", path, e);
        }
        return Qcow2Image.IsQcow2(first[..n]) ? ImageFormat.Qcow2 : ImageFormat.Raw;
    }

    /// <summary>Open the image at <paramref name="path"/> with the driver for its detected format.</summary>
    public static IBlockImage Open(string path, bool readOnly)
    {
        string fullPath = Path.GetFullPath(path);
        return Detect(fullPath) switch
        {
            ImageFormat.Qcow2 => Qcow2Image.Open(fullPath, readOnly),
            _ => RawImage.Open(fullPath, readOnly),
        };
    }

    /// <summary>QEMU's name for a format ("raw", "qcow2").</summary>
    public static string FormatName(ImageFormat format) => format switch
    {
        ImageFormat.Qcow2 => "qcow2",
        _ => "raw",
    };

    /// <summary>The format QEMU calls <paramref name="name"/>, or null when it is not one we support.</summary>
    public static ImageFormat? ParseFormatName(string name) => name switch
    {
        "qcow2" => ImageFormat.Qcow2,
        "raw" => ImageFormat.Raw,
        _ => null,
    };
}
