namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Bitmap table entries (spec "Bitmap table"): one u64 per cluster of bitmap data. Bits 9-55 are the data
/// cluster's offset; with offset 0, bit 0 says whether the cluster reads as all zeros (0) or all ones (1);
/// bits 1-8 and 56-63 are reserved. The bitmap data is the bitmap serialized in QEMU's order (bit N of the
/// bitmap is bit N%8 of byte N/8), cut into clusters; the unused tail of the last cluster is zero.
/// </summary>
internal static class Qcow2BitmapTable
{
    public const ulong OffsetMask = 0x00FF_FFFF_FFFF_FE00UL;
    public const ulong ReservedMask = 0xFF00_0000_0000_01FEUL;
    public const ulong AllOnesFlag = 1UL;

    /// <summary>Why a table entry is invalid (QEMU's check_table_entry), or null when it is valid.</summary>
    public static string? Problem(ulong entry, int clusterBits)
    {
        if ((entry & ReservedMask) != 0)
            return "reserved bits are set";
        ulong offset = entry & OffsetMask;
        if (offset != 0 && (entry & AllOnesFlag) != 0)
            return "bit 0 is set together with an offset";
        if ((offset & ((1UL << clusterBits) - 1)) != 0)
            return $"offset {offset} is not cluster aligned";
        return null;
    }

    /// <summary>Bits of a bitmap of a disk of <paramref name="diskSize"/> bytes.</summary>
    public static long BitsFor(long diskSize, int granularityBits) => (diskSize + (1L << granularityBits) - 1) >> granularityBits;

    /// <summary>Bytes of serialized data: ceil(bits / 8).</summary>
    public static long DataBytesFor(long diskSize, int granularityBits) => (BitsFor(diskSize, granularityBits) + 7) >> 3;

    /// <summary>Entries in the bitmap table: one per cluster of data.</summary>
    public static long EntriesFor(long diskSize, int granularityBits, int clusterBits)
        => (DataBytesFor(diskSize, granularityBits) + (1L << clusterBits) - 1) >> clusterBits;

    /// <summary>
    /// Why a bitmap of this granularity cannot be stored for a disk of this size (QEMU's
    /// check_constraints_on_bitmap), or null when it can.
    /// </summary>
    public static string? SizeProblem(long diskSize, int granularityBits, int clusterBits)
    {
        if (granularityBits < Qcow2Limits.MinBitmapGranularityBits)
            return $"the granularity is under the minimum ({1L << Qcow2Limits.MinBitmapGranularityBits} bytes)";
        if (granularityBits > Qcow2Limits.MaxBitmapGranularityBits)
            return $"the granularity exceeds the maximum ({1L << Qcow2Limits.MaxBitmapGranularityBits} bytes)";
        long bytes = DataBytesFor(diskSize, granularityBits);
        if (bytes > Qcow2Limits.MaxBitmapDataBytes || bytes > Qcow2Limits.MaxBitmapTableEntries << clusterBits)
            return $"too much space would be occupied by the bitmap ({bytes} bytes for a {diskSize}-byte disk, at most {Qcow2Limits.MaxBitmapDataBytes}); use a larger granularity";
        return null;
    }
}
