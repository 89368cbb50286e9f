using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup;

/// <summary>What Get-BlockImage and New-BlockImage write: an image file as <c>qemu-img info</c> describes it.</summary>
public sealed class BlockImageInfo
{
    internal BlockImageInfo(IBlockImage image, IReadOnlyList<StoredBitmap> bitmaps)
    {
        Path = image.Path;
        Format = image.Format;
        Size = image.Size;
        ClusterSize = image.ClusterSize == 0 ? null : image.ClusterSize;
        FileSize = new FileInfo(image.Path).Length;
        BackingFile = image.BackingFile;
        Bitmaps = bitmaps.Select(b => new StoredBitmapInfo(image.Path, b)).ToArray();
        if (image is Qcow2Image q)
        {
            Version = q.Version;
            BackingFormat = q.BackingFormat;
            BackingChain = q.BackingChain.Select(e => new BackingImageInfo(e.Path, e.Format, e.Size)).ToArray();
            Dirty = q.IsDirty;
            Corrupt = q.IsCorrupt;
            RefcountBits = q.RefcountBits;
            CompressionType = q.CompressionType.ToString();
            Snapshots = q.SnapshotCount;
        }
    }

    public string Path { get; }

    public ImageFormat Format { get; }

    /// <summary>Virtual size in bytes.</summary>
    public long Size { get; }

    /// <summary>The format's cluster size; empty for raw images.</summary>
    public int? ClusterSize { get; }

    /// <summary>Length of the image file in bytes.</summary>
    public long FileSize { get; }

    /// <summary>qcow2 version (2 or 3); empty for raw.</summary>
    public int? Version { get; }

    /// <summary>The backing file as recorded in the image.</summary>
    public string? BackingFile { get; }

    public ImageFormat? BackingFormat { get; }

    /// <summary>Every image below this one, nearest first.</summary>
    public BackingImageInfo[] BackingChain { get; } = [];

    /// <summary>The qcow2 dirty bit (refcounts may be stale: lazy refcounts).</summary>
    public bool Dirty { get; }

    /// <summary>The qcow2 corrupt bit: the image must be repaired (qemu-img check -r) before writing.</summary>
    public bool Corrupt { get; }

    public int? RefcountBits { get; }

    public string? CompressionType { get; }

    /// <summary>Internal snapshots (read-only support).</summary>
    public int Snapshots { get; }

    /// <summary>The persistent bitmaps stored in the image.</summary>
    public StoredBitmapInfo[] Bitmaps { get; }

    public override string ToString() => Path;
}

/// <summary>One image of a backing chain.</summary>
public sealed record BackingImageInfo(string Path, ImageFormat Format, long Size);
