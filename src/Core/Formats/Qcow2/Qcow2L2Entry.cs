namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>What an L2 entry says about one guest cluster.</summary>
internal enum Qcow2ClusterKind
{
    /// <summary>Not stored in this image: read from the backing image, or zeros at the base.</summary>
    Unallocated,
    /// <summary>Stored uncompressed at <see cref="Qcow2L2Entry.HostOffset"/>.</summary>
    Normal,
    /// <summary>Reads as zeros (v3 zero flag); a host cluster may still be attached (preallocation).</summary>
    Zero,
    /// <summary>Stored deflated somewhere in the file; see <see cref="Qcow2L2Entry.GetCompressedRange"/>.</summary>
    Compressed,
}

/// <summary>
/// An L2 table entry (spec "Cluster mapping"), 64 bits, big-endian on disk:
/// <code>
/// bit 63      COPIED: refcount is exactly 1, so the cluster may be written in place
/// bit 62      compressed cluster
/// bits 0-61   descriptor. Standard: bit 0 zero flag (v3), bits 9-55 host offset.
///             Compressed (x = 62 - (cluster_bits - 8)): bits 0..x-1 host byte offset,
///             bits x..61 additional 512-byte sectors.
/// </code>
/// L1 entries share the layout of a standard descriptor (bits 9-55 offset, bit 63 COPIED).
/// </summary>
internal readonly record struct Qcow2L2Entry(ulong Raw)
{
    public const ulong CopiedFlag = 1UL << 63;
    public const ulong CompressedFlag = 1UL << 62;
    public const ulong ZeroFlag = 1UL;
    public const ulong OffsetMask = 0x00FF_FFFF_FFFF_FE00UL;

    /// <summary>Bits a standard (not compressed) L2 entry must leave clear: 1-8 and 56-61 (QEMU's L2E_STD_RESERVED_MASK).</summary>
    public const ulong StandardReservedMask = 0x3F00_0000_0000_01FEUL;
    public const int CompressedSectorSize = 512;

    public static Qcow2L2Entry Unallocated => default;

    /// <summary>A zero cluster without a host cluster.</summary>
    public static Qcow2L2Entry ZeroPlain => new(ZeroFlag);

    public static Qcow2L2Entry ForData(long hostOffset) => new((ulong)hostOffset | CopiedFlag);

    /// <summary>
    /// A compressed cluster descriptor for <paramref name="length"/> bytes of deflate data at host byte
    /// <paramref name="hostOffset"/>: the offset, and the number of 512-byte sectors the data touches beyond the
    /// one holding its first byte (QEMU's <c>nb_csectors</c>). COPIED is never set on compressed clusters.
    /// </summary>
    public static Qcow2L2Entry ForCompressed(long hostOffset, int length, int clusterBits)
    {
        int shift = CompressedOffsetBits(clusterBits);
        ulong sectors = (ulong)(((hostOffset + length - 1) / CompressedSectorSize) - (hostOffset / CompressedSectorSize));
        System.Diagnostics.Debug.Assert(length > 0 && hostOffset > 0 && hostOffset < 1L << shift, "compressed offset out of range");
        System.Diagnostics.Debug.Assert(sectors < 1UL << (clusterBits - 8), "compressed size out of range");
        return new(CompressedFlag | (sectors << shift) | (ulong)hostOffset);
    }

    /// <summary>Width of the host offset field of a compressed descriptor: x = 62 - (cluster_bits - 8).</summary>
    public static int CompressedOffsetBits(int clusterBits) => 62 - (clusterBits - 8);

    public bool IsCopied => (Raw & CopiedFlag) != 0;

    public bool IsCompressed => (Raw & CompressedFlag) != 0;

    /// <summary>Host offset of a standard (normal or zero-with-allocation) cluster; 0 when none.</summary>
    public long HostOffset => (long)(Raw & OffsetMask);

    /// <summary>
    /// The kind of the entry as QEMU classifies it. The zero flag only exists in v3; in a v2 image an entry with
    /// bit 0 set is reported as <see cref="Qcow2ClusterKind.Zero"/> too and the caller treats it as corrupt.
    /// </summary>
    public Qcow2ClusterKind Kind
    {
        get
        {
            if (IsCompressed)
                return Qcow2ClusterKind.Compressed;
            if ((Raw & ZeroFlag) != 0)
                return Qcow2ClusterKind.Zero;
            return HostOffset == 0 ? Qcow2ClusterKind.Unallocated : Qcow2ClusterKind.Normal;
        }
    }

    /// <summary>
    /// Where the compressed data lies: its byte offset and the bytes up to the end of its last 512-byte sector
    /// (decompression stops when a whole cluster is produced, so the tail may belong to the next cluster).
    /// </summary>
    public (long Offset, int Length) GetCompressedRange(int clusterBits)
    {
        int shift = 62 - (clusterBits - 8);
        ulong offset = Raw & ((1UL << shift) - 1);
        ulong sectors = ((Raw >> shift) & ((1UL << (clusterBits - 8)) - 1)) + 1;
        return ((long)offset, (int)(sectors * CompressedSectorSize - (offset % CompressedSectorSize)));
    }

    /// <summary>The whole sectors a compressed cluster occupies, as QEMU frees them: (offset rounded down to 512, length).</summary>
    public (long Offset, long Length) GetCompressedSectors(int clusterBits)
    {
        int shift = 62 - (clusterBits - 8);
        ulong offset = Raw & ((1UL << shift) - 1);
        ulong sectors = ((Raw >> shift) & ((1UL << (clusterBits - 8)) - 1)) + 1;
        return ((long)(offset & ~(ulong)(CompressedSectorSize - 1)), (long)sectors * CompressedSectorSize);
    }
}
