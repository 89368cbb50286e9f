using System.Text;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;

namespace BitmapBackup.Core.Formats.Qcow2;

public sealed partial class Qcow2Image
{
    /// <summary>
    /// The backing file name recorded in the header of the qcow2 image at <paramref name="path"/>, read without
    /// taking locks and without opening the chain (the first cluster only), or null when the file is not a qcow2 image,
    /// has no backing file, cannot be read, or its header does not hold together. For scans that look for images which
    /// depend on a file (a chain merge must not delete an image another chain still reads).
    /// </summary>
    public static string? PeekBackingFileName(string path)
    {
        try
        {
            using Microsoft.Win32.SafeHandles.SafeFileHandle handle = ImageFiles.OpenUnlocked(path);
            Span<byte> header = stackalloc byte[Qcow2Header.V3Length];
            header.Clear();
            int n = RandomAccess.Read(handle, header, 0);
            if (n < Qcow2Header.V2Length || !IsQcow2(header))
                return null;
            Qcow2Header h = Qcow2Header.ReadFrom(header[..n]);
            if (h.BackingFileOffset == 0 || h.BackingFileSize == 0 || h.BackingFileSize > Qcow2Limits.MaxBackingFileNameLength
                || h.BackingFileOffset >= 1UL << Qcow2Limits.MaxClusterBits)
                return null;
            var name = new byte[h.BackingFileSize];
            if (RandomAccess.Read(handle, name, (long)h.BackingFileOffset) != name.Length)
                return null;
            string text = Encoding.UTF8.GetString(name);
            return text.Contains('\0', StringComparison.Ordinal) ? null : text;
        }
        catch (Exception e) when (e is BlockException or IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }
}
