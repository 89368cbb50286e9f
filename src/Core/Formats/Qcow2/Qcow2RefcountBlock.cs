using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Entry access in a refcount block (spec "Host cluster management"): one cluster of
/// <c>cluster_size * 8 / refcount_bits</c> entries, <c>refcount_bits = 1 &lt;&lt; refcount_order</c>.
/// Widths of 8 bits and more are big-endian integers; narrower ones are packed into bytes starting at the
/// least significant bit (order 0: entry i is bit i % 8 of byte i / 8).
/// </summary>
internal static class Qcow2RefcountBlock
{
    /// <summary>Entries in one refcount block.</summary>
    public static long EntriesPerBlock(int clusterBits, int refcountOrder) => (1L << clusterBits) * 8 >> refcountOrder;

    /// <summary>Largest refcount an entry can hold.</summary>
    public static ulong MaxRefcount(int refcountOrder) => refcountOrder == 6 ? ulong.MaxValue : (1UL << (1 << refcountOrder)) - 1;

    public static ulong Get(ReadOnlySpan<byte> block, int refcountOrder, long index)
    {
        switch (refcountOrder)
        {
            case 3:
                return block[(int)index];
            case 4:
                return BinaryPrimitives.ReadUInt16BigEndian(block[(int)(index * 2)..]);
            case 5:
                return BinaryPrimitives.ReadUInt32BigEndian(block[(int)(index * 4)..]);
            case 6:
                return BinaryPrimitives.ReadUInt64BigEndian(block[(int)(index * 8)..]);
            default:
                int bits = 1 << refcountOrder;
                int perByte = 8 >> refcountOrder;
                int shift = (int)(index % perByte) * bits;
                return (uint)(block[(int)(index / perByte)] >> shift) & ((1u << bits) - 1);
        }
    }

    public static void Set(Span<byte> block, int refcountOrder, long index, ulong value)
    {
        switch (refcountOrder)
        {
            case 3:
                block[(int)index] = (byte)value;
                break;
            case 4:
                BinaryPrimitives.WriteUInt16BigEndian(block[(int)(index * 2)..], (ushort)value);
                break;
            case 5:
                BinaryPrimitives.WriteUInt32BigEndian(block[(int)(index * 4)..], (uint)value);
                break;
            case 6:
                BinaryPrimitives.WriteUInt64BigEndian(block[(int)(index * 8)..], value);
                break;
            default:
                int bits = 1 << refcountOrder;
                int perByte = 8 >> refcountOrder;
                int shift = (int)(index % perByte) * bits;
                int mask = ((1 << bits) - 1) << shift;
                ref byte b = ref block[(int)(index / perByte)];
                b = (byte)((b & ~mask) | (((int)value << shift) & mask));
                break;
        }
    }
}
