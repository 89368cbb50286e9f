using System.Security.Cryptography;
using System.Text;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;

namespace BitmapBackup.Core.Persistence;

/*
 * Persistent bitmaps of images that cannot hold them, in a bitmap state folder (docs/raw-bitmap-sidecar.md, "Bitmap state folder"): block
 * devices (a raw LVM volume, a zvol, a loop device) always, and raw files whose folder cannot take a sidecar
 * (read-only, or someone else's) or whose node was opened with -BitmapStore. One file per image,
 * <folder>/bitmaps/<key>-<hash>.bitmaps, named after the image's stable identity (ImageIdentity), never after the
 * path it was opened by; in the sidecar's format, with the identity and the disk's size recorded in it, and updated
 * by the sidecar's in-use protocol, so that a crash (kill -9) leaves every bitmap in use: inconsistent at the next open.
 *
 * What a load trusts:
 *   another device under the same name (/dev/loop3 attached to another file) has another key: it finds nothing;
 *   same key, an attribute differs (an LVM volume re-created under the same uuid-less name, an inode number reused
 *     by a new file): every bitmap loads inconsistent, with a warning, never silently reused;
 *   the disk shrank or grew: BlockNode applies the resize rules (StoredBitmap.DiskSize).
 * An image without a stable identity (a device with no by-id name, serial or partition table) loads nothing and
 * refuses persistent bitmaps: they could be attached to another device after a reboot.
 */

/// <summary>The bitmap state folder's store for one image.</summary>
public sealed class StateFolderBitmapStore : IBitmapStore
{
    /// <summary>The sub-folder of a state folder that holds bitmap files.</summary>
    public const string SubFolder = "bitmaps";

    private const string What = "Bitmap state file";
    private readonly Func<long> _diskSize;
    private readonly string _imagePath;

    /// <param name="folder">The state folder (-BitmapStore); <see cref="DefaultFolder"/> when null.</param>
    /// <param name="identity">The image's stable identity, or null when it has none (nothing loads, nothing can be stored).</param>
    /// <param name="imagePath">The path the image was opened by, for messages.</param>
    /// <param name="diskSize">The disk's size now, recorded with the bits.</param>
    public StateFolderBitmapStore(string? folder, ImageIdentity? identity, string imagePath, Func<long> diskSize)
    {
        Folder = System.IO.Path.GetFullPath(folder ?? DefaultFolder);
        Identity = identity;
        _imagePath = imagePath;
        _diskSize = diskSize;
        Path = identity is null ? null : System.IO.Path.Combine(Folder, SubFolder, FileNameFor(identity));
    }

    /// <summary>The default state folder: $XDG_STATE_HOME/BitmapBackup (~/.local/state/BitmapBackup), %LOCALAPPDATA%\BitmapBackup on Windows.</summary>
    public static string DefaultFolder => StateFolder.Path;

    /// <summary>The state folder (its "bitmaps" sub-folder holds the files).</summary>
    public string Folder { get; }

    /// <summary>The image's identity, or null when it has none.</summary>
    public ImageIdentity? Identity { get; }

    /// <summary>The file that keeps this image's bitmaps, or null without an identity.</summary>
    public string? Path { get; }

    /// <summary>
    /// The file name for an identity: the key with every character other than letters, digits, '.', '_' and '-' made
    /// '_' (readable in a listing), and 16 hex digits of its SHA-256 (two keys that read alike still differ).
    /// </summary>
    public static string FileNameFor(ImageIdentity identity)
    {
        var name = new StringBuilder();
        foreach (char c in identity.Key)
            name.Append(char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' ? c : '_');
        if (name.Length > 120)
            name.Length = 120;
        string hash = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(identity.Key)).AsSpan(0, 8));
        return $"{name}-{hash}.bitmaps";
    }

    public IReadOnlyList<StoredBitmap> Load()
    {
        if (Path is null || BitmapFile.Read(Path, What) is not { } contents)
            return [];
        if (contents.Identity is { } stored && !string.Equals(stored.Key, Identity!.Key, StringComparison.Ordinal))
            return []; // another image's file under a colliding name: not ours at all
        string? difference = contents.Identity is null ? "the file records no identity" : Identity!.DifferenceFrom(contents.Identity);
        if (difference is null)
            return contents.Bitmaps;
        EngineWarnings.PostOnce($"bitmap-state-identity:{Path}:{difference}",
            $"The persistent bitmaps of '{_imagePath}' in '{Path}' are loaded inconsistent: {difference}, so this may not be the disk they recorded. " +
            "Remove them (Remove-DirtyBitmap) and start a new chain with a full backup.");
        return contents.Bitmaps.Select(b => b with { InUse = true, Bits = null }).ToArray();
    }

    public void CheckCanStore(string name, long granularity, IReadOnlyList<DirtyBitmap> persistent)
    {
        if (Identity is null)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{name}' persistent for '{_imagePath}': the device has no stable identity (no /dev/disk/by-id name, device-mapper uuid, loop backing file, serial or partition table GUID), " +
                "so its bitmaps could be attached to another device after a reboot. Use a non-persistent bitmap, or Update-DirtyBitmap with a digest manifest after each restart.", name);
        if (persistent.Count >= BitmapFile.MaxBitmaps)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{name}' persistent in '{Path}': at most {BitmapFile.MaxBitmaps} bitmaps can be stored.", name);
    }

    public void MarkInUse(IReadOnlyList<DirtyBitmap> persistent) => Write(persistent, storeBits: false);

    public void Store(IReadOnlyList<DirtyBitmap> persistent)
    {
        if (Path is null)
            return;
        if (persistent.Count == 0)
        {
            if (File.Exists(Path))
                File.Delete(Path);
            return;
        }
        Write(persistent, storeBits: true);
    }

    /// <summary>Make the folder of <see cref="Path"/> (the bitmaps, and a crash-safe node's write-intent log beside them).</summary>
    public void EnsureFolder()
    {
        if (Path is null)
            return;
        string folder = System.IO.Path.GetDirectoryName(Path)!;
        try
        {
            Directory.CreateDirectory(folder);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"Cannot create the bitmap state folder '{folder}' for '{_imagePath}': {e.Message}", folder, e);
        }
    }

    private void Write(IReadOnlyList<DirtyBitmap> bitmaps, bool storeBits)
    {
        if (Path is null)
            return;
        EnsureFolder();
        BitmapFile.WriteAtomically(Path, BitmapFile.Build(bitmaps, storeBits, _diskSize(), Identity), What);
    }
}
