using System.Diagnostics.CodeAnalysis;
using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>Cold-path throwers for the qcow2 driver; every message names the image file.</summary>
internal static class Qcow2Errors
{
    [DoesNotReturn]
    public static void Corrupt(string path, string what)
        => throw new BlockException(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData,
            $"qcow2 image '{path}' is corrupt: {what}.", path);

    public static BlockException CorruptException(string path, string what, Exception? inner = null)
        => new(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData, $"qcow2 image '{path}' is corrupt: {what}.", path, inner);

    [DoesNotReturn]
    public static void Unsupported(string path, string feature)
        => throw new BlockException(ErrorIds.UnsupportedImageFeature, BlockErrorCategory.NotImplemented,
            $"qcow2 image '{path}' uses a feature that is not supported: {feature}.", path);

    [DoesNotReturn]
    public static void ReadOnly(string path)
        => throw new BlockException(ErrorIds.NodeReadOnly, BlockErrorCategory.PermissionDenied,
            $"qcow2 image '{path}' is open read-only and cannot be written.", path);

    [DoesNotReturn]
    public static void TooLarge(string path, string what)
        => throw new BlockException(ErrorIds.ImageTooLarge, BlockErrorCategory.InvalidOperation,
            $"qcow2 image '{path}' cannot grow further: {what}.", path);

    /// <summary>A qcow2 image on a block device has no free cluster left: ENOSPC, the error a full file system gives.</summary>
    [DoesNotReturn]
    public static void NoSpace(string path, long deviceSize)
        => throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
            $"I/O error on image '{path}' during write: No space left on device (the qcow2 image fills its block device of {deviceSize} bytes; grow the device, then write again).",
            path, new IOException("No space left on device", 28));
}
