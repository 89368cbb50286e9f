using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>What New-BlockImage writes: the image file it created.</summary>
public sealed class BlockImageInfo
{
    internal BlockImageInfo(string path, ImageFormat format, long size)
    {
        Path = path;
        Format = format;
        Size = size;
    }

    public string Path { get; }

    public ImageFormat Format { get; }

    /// <summary>Virtual size in bytes.</summary>
    public long Size { get; }

    public override string ToString() => Path;
}
