namespace BitmapBackup.Core.Nodes;

/// <summary>How a range of a node is stored, in the terms of <c>qemu-img map</c>.</summary>
public enum AllocationState
{
    /// <summary>Data is stored for the range (it may still happen to be zeros).</summary>
    Data,
    /// <summary>The range reads as zeros without data stored (a hole, or a zero cluster).</summary>
    Zero,
    /// <summary>Nothing is stored in this image: reads come from the backing image.</summary>
    Unallocated,
}

/// <summary>A run of bytes of a node with one allocation state.</summary>
public readonly record struct AllocationExtent(long Offset, long Length, AllocationState State)
{
    public long End => Offset + Length;
}
