namespace BitmapBackup.Core.Nodes;

/// <summary>
/// A format driver: an opened image file seen as a flat array of bytes. Drivers do positional I/O only (no
/// shared file position), so callers may issue requests from several threads. Range checks are the caller's
/// (<see cref="BlockNode"/>) job; a driver may assume every request lies within <see cref="Size"/>.
/// </summary>
public interface IBlockImage : IDisposable
{
    ImageFormat Format { get; }

    /// <summary>Full path of the image file.</summary>
    string Path { get; }

    /// <summary>Virtual size in bytes.</summary>
    long Size { get; }

    /// <summary>Allocation unit in bytes, or 0 when the format has none (raw).</summary>
    int ClusterSize { get; }

    bool ReadOnly { get; }

    /// <summary>The backing file as recorded in the image, or null.</summary>
    string? BackingFile { get; }

    void Read(long offset, Span<byte> buffer);

    void Write(long offset, ReadOnlySpan<byte> data);

    /// <summary>Make the range read as zeros, deallocating where the format can.</summary>
    void WriteZeroes(long offset, long length);

    void Flush();

    /// <summary>Change the virtual size. Growing exposes zeros; the caller has checked a shrink is allowed.</summary>
    void Resize(long newSize);

    /// <summary>Allocation of [offset, offset+length) as contiguous extents in order, covering the whole range.</summary>
    IEnumerable<AllocationExtent> GetAllocation(long offset, long length);

    /// <summary>The block device the image is, or is stored on; null for an image in a file.</summary>
    IO.BlockDevice? Device => null;

    /// <summary>
    /// Discard the range: the format may drop its data (a raw device: BLKDISCARD where the device supports it). What
    /// it reads afterwards is the format's to say; by default the range is zeroed, deallocating where it can.
    /// </summary>
    void Discard(long offset, long length) => WriteZeroes(offset, length);

    /// <summary>
    /// Start writing what was written so far to the disk, without waiting, so that the next <see cref="Flush"/> waits
    /// less (a backup target's copy does this as it goes, overlapping the disk's work with its own). A hint only.
    /// </summary>
    void StartWriteback()
    {
    }
}
