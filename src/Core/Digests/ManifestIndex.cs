using System.IO.Hashing;
using System.Text;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup.Core.Digests;

/// <summary>
/// Which manifest describes the last backup taken from a bitmap: one small file per (node image, bitmap) in the
/// state folder ("manifests/"), replaced by a rename after every backup that writes a manifest. It only points at
/// the manifest; the manifest's own header says what it belongs to, and is checked against the node when used.
/// </summary>
public static class ManifestIndex
{
    /// <summary>Remember that <paramref name="manifestPath"/> describes the last backup of the bitmap.</summary>
    public static void Record(string nodePath, string bitmapName, string manifestPath)
    {
        string file = EntryPath(nodePath, bitmapName);
        string temp = file + ".tmp";
        File.WriteAllText(temp, $"{nodePath}\n{bitmapName}\n{System.IO.Path.GetFullPath(manifestPath)}\n", Encoding.UTF8);
        File.Move(temp, file, overwrite: true);
    }

    /// <summary>The manifest last recorded for the bitmap, or null.</summary>
    public static string? Find(string nodePath, string bitmapName)
    {
        string file;
        try
        {
            file = EntryPath(nodePath, bitmapName);
            if (!File.Exists(file))
                return null;
            string[] lines = File.ReadAllLines(file, Encoding.UTF8);
            return lines.Length >= 3 && lines[0] == nodePath && lines[1] == bitmapName ? lines[2] : null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    private static string EntryPath(string nodePath, string bitmapName)
    {
        UInt128 key = XxHash128.HashToUInt128(Encoding.UTF8.GetBytes(nodePath + "\0" + bitmapName));
        return System.IO.Path.Combine(StateFolder.Folder("manifests"), $"{key:x32}.manifest");
    }
}
