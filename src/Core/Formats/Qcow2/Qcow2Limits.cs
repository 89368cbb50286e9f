namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Bounds on qcow2 structures. The spec allows more than QEMU opens; we accept what QEMU accepts, so every
/// table we load is bounded both by these limits and by the length of the file it claims to live in.
/// </summary>
internal static class Qcow2Limits
{
    /// <summary>Smallest cluster: 512 bytes.</summary>
    public const int MinClusterBits = 9;

    /// <summary>Largest cluster QEMU opens: 2 MiB.</summary>
    public const int MaxClusterBits = 21;

    /// <summary>QEMU's limit on the active L1 table (QCOW_MAX_L1_SIZE): 32 MiB, i.e. 4 Mi entries.</summary>
    public const long MaxL1Bytes = 32L << 20;

    /// <summary>QEMU's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE): 8 MiB.</summary>
    public const long MaxRefcountTableBytes = 8L << 20;

    /// <summary>Longest backing file name the spec allows, in bytes.</summary>
    public const int MaxBackingFileNameLength = 1023;

    /// <summary>QEMU keeps the backing format in a 16-byte buffer with a terminating NUL.</summary>
    public const int MaxBackingFormatLength = 15;

    /// <summary>Widest refcount: 64 bits (refcount_order 6).</summary>
    public const int MaxRefcountOrder = 6;

    /// <summary>QEMU_MAX_BITMAPS and the bitmap directory bound QEMU enforces.</summary>
    public const int MaxBitmaps = 65535;

    public const long MaxBitmapDirectoryBytes = 1024L * MaxBitmaps;

    public const int MaxBitmapNameLength = 1023;

    /// <summary>Granularity QEMU stores: 2^9 (512 bytes) to 2^31 (2 GiB) bytes per bit.</summary>
    public const int MinBitmapGranularityBits = 9;

    public const int MaxBitmapGranularityBits = 31;

    /// <summary>QEMU's BME_MAX_TABLE_SIZE: entries in one bitmap table.</summary>
    public const long MaxBitmapTableEntries = 0x8000000;

    /// <summary>QEMU's BME_MAX_PHYS_SIZE: bytes of data clusters one bitmap table may describe (512 MiB).</summary>
    public const long MaxBitmapDataBytes = 0x20000000;

    /// <summary>Memory for each metadata cache (L2 tables, refcount blocks), in bytes; at least <see cref="MinCachedTables"/> tables.</summary>
    public const long CacheBudgetBytes = 4L << 20;

    public const int MinCachedTables = 4;

    /// <summary>Highest host offset an L1/L2 entry can hold (bits 9-55).</summary>
    public const long MaxHostOffset = 1L << 56;
}
