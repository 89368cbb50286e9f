using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.IO;
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
    /// <remarks>Probing reads the first bytes without taking a lock, so it never conflicts with a user of the
    /// image (here or in QEMU): the driver's open that follows takes the locks and refuses what conflicts.</remarks>
    /// <exception cref="BlockException">ImageNotFound, ImageIsFolder, ImageIsFifo, ImageIsSocket, ImageIsCharacterDevice, ImageIOFailed.</exception>
    public static ImageFormat Detect(string path)
    {
        Span<byte> first = stackalloc byte[ProbeLength];
        int n = 0;
        using (Microsoft.Win32.SafeHandles.SafeFileHandle handle = ImageFiles.OpenUnlocked(path))
        {
            try
            {
                while (n < first.Length)
                {
                    int read = RandomAccess.Read(handle, first[n..], n);
                    if (read == 0)
                        break;
                    n += read;
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError, $"Image file '{path}' cannot be read: {e.Message}", path, e);
            }
        }
        return Qcow2Image.IsQcow2(first[..n]) ? ImageFormat.Qcow2 : ImageFormat.Raw;
    }

    /// <summary>
    /// Open the image at <paramref name="path"/> with the driver for its detected format. With
    /// <paramref name="forceShare"/> (read-only only) the image and its backing chain are read without locks.
    /// </summary>
    public static IBlockImage Open(string path, bool readOnly, bool forceShare = false)
    {
        string fullPath = Path.GetFullPath(path);
        return Detect(fullPath) switch
        {
            ImageFormat.Qcow2 => Qcow2Image.Open(fullPath, readOnly, forceShare),
            _ => RawImage.Open(fullPath, readOnly, forceShare),
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
