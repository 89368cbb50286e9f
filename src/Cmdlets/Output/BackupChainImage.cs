using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>One image of a backup chain (Get-BackupChain), base first.</summary>
public sealed class BackupChainImage
{
    internal BackupChainImage(ChainImage image)
    {
        Depth = image.Depth;
        Path = image.Path;
        Format = image.Format;
        Size = image.Size;
        ClusterSize = image.ClusterSize == 0 ? null : image.ClusterSize;
        BackingFile = image.BackingFile;
        DataBytes = image.DataBytes;
        ZeroBytes = image.ZeroBytes;
        FileSize = image.FileSize;
    }

    /// <summary>0 for the base image, counting up to the top.</summary>
    public int Depth { get; }

    public string Path { get; }

    public ImageFormat Format { get; }

    /// <summary>Virtual size in bytes.</summary>
    public long Size { get; }

    public int? ClusterSize { get; }

    public string? BackingFile { get; }

    /// <summary>Bytes of the disk this image stores data for (its own allocation, not its backing's).</summary>
    public long DataBytes { get; }

    /// <summary>Bytes this image marks as zeros without data (zero clusters, holes of a raw base).</summary>
    public long ZeroBytes { get; }

    /// <summary>Length of the image file.</summary>
    public long FileSize { get; }

    public override string ToString() => Path;
}
