using System.Collections.Concurrent;

namespace BitmapBackup.Core.IO;

/// <summary>
/// What in this process holds an image open (a node, by name), so that a lock conflict with it is not blamed on
/// "another process": QEMU's image locks are per open file, and a second open in the same process conflicts too.
/// </summary>
internal static class ImageHolders
{
    private static readonly ConcurrentDictionary<string, string> s_holders = new(StringComparer.Ordinal);

    /// <summary>Record that <paramref name="holder"/> ("node 'vm'") holds the image at the full path <paramref name="path"/>.</summary>
    public static void Add(string path, string holder) => s_holders[path] = holder;

    /// <summary>Forget the holder of <paramref name="path"/>, if it is still <paramref name="holder"/>.</summary>
    public static void Remove(string path, string holder) => s_holders.TryRemove(new KeyValuePair<string, string>(path, holder));

    /// <summary>What holds <paramref name="path"/> in this process, or null.</summary>
    public static string? Of(string path) => s_holders.TryGetValue(Path.GetFullPath(path), out string? holder) ? holder : null;
}
