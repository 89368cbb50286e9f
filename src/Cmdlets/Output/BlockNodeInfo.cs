using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>What Get-BlockNode and Open-BlockNode write: a snapshot of an open node.</summary>
public sealed class BlockNodeInfo
{
    internal BlockNodeInfo(BlockNode node)
    {
        Name = node.Name;
        Path = node.Path;
        Format = node.Format;
        Size = node.Size;
        ClusterSize = node.ClusterSize == 0 ? null : node.ClusterSize;
        ReadOnly = node.ReadOnly;
        Cache = node.Cache;
        BackingFile = node.Image.BackingFile;
        Bitmaps = node.Bitmaps.Select(b => b.Name!).ToArray();
        if (node.Image.Device is { } device)
        {
            LogicalSectorSize = device.LogicalSectorSize;
            PhysicalSectorSize = device.PhysicalSectorSize;
        }
        BitmapStore = (node.Store as StateFolderBitmapStore)?.Path;
    }

    /// <summary>The node name, unique in the session.</summary>
    public string Name { get; }

    /// <summary>Full path of the image file.</summary>
    public string Path { get; }

    public ImageFormat Format { get; }

    /// <summary>Virtual size in bytes.</summary>
    public long Size { get; }

    /// <summary>The format's allocation unit in bytes; empty for raw images.</summary>
    public int? ClusterSize { get; }

    public bool ReadOnly { get; }

    /// <summary>When the node's writes become durable (WriteBack or WriteThrough).</summary>
    public CacheMode Cache { get; }

    /// <summary>The backing file recorded in the image, or empty.</summary>
    public string? BackingFile { get; }

    /// <summary>Names of the node's dirty bitmaps.</summary>
    public string[] Bitmaps { get; }

    /// <summary>For a block device (or an image on one): the smallest unit it addresses in bytes (BLKSSZGET); empty for a file.</summary>
    public int? LogicalSectorSize { get; }

    /// <summary>For a block device (or an image on one): the unit it writes without read-modify-write (BLKPBSZGET); empty for a file.</summary>
    public int? PhysicalSectorSize { get; }

    /// <summary>The file in a bitmap state folder that keeps the node's persistent bitmaps, or empty (kept in the image or its sidecar).</summary>
    public string? BitmapStore { get; }

    /// <summary>The node name, so the object converts to a node reference anywhere a name is accepted.</summary>
    public override string ToString() => Name;
}
