using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Where the records of the header extension area lie in cluster 0, so that one record can be changed in place
/// without rewriting (and risking) the others. Offsets are file offsets. The area runs from the end of the
/// header to the backing file name, or to the end of cluster 0 without one; it ends at the end record (type 0).
/// </summary>
internal sealed class Qcow2HeaderExtensionArea
{
    public const int RecordHeaderSize = 8;

    /// <summary>Bytes a bitmaps record takes: type, length and the 24-byte payload (already a multiple of 8).</summary>
    public const int BitmapsRecordSize = RecordHeaderSize + Qcow2BitmapsExtension.Size;

    /// <summary>First byte past the area: the backing file name's offset, or the cluster size.</summary>
    public int Limit { get; private init; }

    /// <summary>Offset of the end record; when <see cref="HasEndRecord"/> is false, where the records stop.</summary>
    public int EndRecord { get; private init; }

    public bool HasEndRecord { get; private init; }

    /// <summary>Offset of the bitmaps record, or -1.</summary>
    public int BitmapsRecord { get; private init; } = -1;

    /// <summary>Offset of the record after the bitmaps record (or of the end record).</summary>
    public int AfterBitmapsRecord { get; private init; } = -1;

    /// <summary>
    /// Find the records in <paramref name="cluster0"/> (the first bytes of the file, at least up to
    /// <paramref name="limit"/>). Throws ImageCorrupt where <see cref="Qcow2HeaderExtensions.ReadFrom"/> would, and
    /// when there are two bitmaps records (which one to update would be a guess).
    /// </summary>
    public static Qcow2HeaderExtensionArea Find(ReadOnlySpan<byte> cluster0, int headerLength, int limit, string path)
    {
        int pos = headerLength;
        int bitmaps = -1, afterBitmaps = -1;
        while (pos < limit)
        {
            if (limit - pos < RecordHeaderSize)
                Qcow2Errors.Corrupt(path, $"header extension at byte {pos - headerLength} of the extension area is truncated");
            uint type = BinaryPrimitives.ReadUInt32BigEndian(cluster0[pos..]);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(cluster0[(pos + 4)..]);
            if (type == Qcow2HeaderExtensions.EndType)
                return new Qcow2HeaderExtensionArea { Limit = limit, EndRecord = pos, HasEndRecord = true, BitmapsRecord = bitmaps, AfterBitmapsRecord = afterBitmaps == -1 && bitmaps >= 0 ? pos : afterBitmaps };
            if (length > limit - pos - RecordHeaderSize)
                Qcow2Errors.Corrupt(path, $"header extension 0x{type:x8} is {length} bytes long but only {limit - pos - RecordHeaderSize} bytes remain before the end of the extension area");
            int next = (int)Math.Min(pos + RecordHeaderSize + ((length + 7L) & ~7L), limit);
            if (bitmaps >= 0 && afterBitmaps == -1)
                afterBitmaps = pos;
            if (type == Qcow2HeaderExtensions.BitmapsType)
            {
                if (bitmaps >= 0)
                    Qcow2Errors.Corrupt(path, "the header has two bitmaps extensions");
                if (length != Qcow2BitmapsExtension.Size)
                    Qcow2Errors.Corrupt(path, $"the bitmaps extension is {length} bytes long (expected {Qcow2BitmapsExtension.Size})");
                bitmaps = pos;
            }
            pos = next;
        }
        return new Qcow2HeaderExtensionArea { Limit = limit, EndRecord = pos, HasEndRecord = false, BitmapsRecord = bitmaps, AfterBitmapsRecord = afterBitmaps == -1 && bitmaps >= 0 ? pos : afterBitmaps };
    }

    /// <summary>
    /// Where a new bitmaps record (in place of the end record, followed by a new end record) fits: no move needed
    /// (<paramref name="newBackingOffset"/> = -1), or after moving a backing file name of
    /// <paramref name="backingSize"/> bytes at <paramref name="backingOffset"/> to <paramref name="newBackingOffset"/>,
    /// a place in cluster 0 that does not overlap the old one (so the move is crash-safe). False when neither fits.
    /// </summary>
    public bool RoomForBitmapsRecord(long backingOffset, int backingSize, int clusterSize, out int newBackingOffset)
    {
        newBackingOffset = -1;
        int needed = EndRecord + BitmapsRecordSize + RecordHeaderSize;
        if (needed <= Limit)
            return true;
        if (backingOffset == 0)
            return false; // the area already runs to the end of cluster 0
        long candidate = Math.Max(needed, backingOffset + backingSize);
        if (candidate + backingSize > clusterSize)
            return false;
        newBackingOffset = (int)candidate;
        return true;
    }
}
