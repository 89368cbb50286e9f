namespace BitmapBackup;

/// <summary>A maximal run of dirty clusters of a bitmap, in bytes of the node (Get-DirtyBitmapRange).</summary>
public sealed class DirtyRange
{
    internal DirtyRange(string node, string bitmap, long offset, long length)
    {
        Node = node;
        Bitmap = bitmap;
        Offset = offset;
        Length = length;
    }

    public string Node { get; }

    public string Bitmap { get; }

    /// <summary>First byte of the range.</summary>
    public long Offset { get; }

    /// <summary>Length in bytes (the last range is clipped to the node's size).</summary>
    public long Length { get; }

    /// <summary>First byte after the range.</summary>
    public long End => Offset + Length;

    public override string ToString() => $"{Offset}+{Length}";
}
