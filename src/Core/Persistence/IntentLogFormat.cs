using System.Buffers.Binary;
using System.IO.Hashing;
using System.Text;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.IO;

namespace BitmapBackup.Core.Persistence;

/*
 * The bytes of a write-intent log "<image>.intent" (docs/write-intent-log.md), big-endian as qcow2:
 *
 *   block 0            header: log id, region size, where the intent blocks and the two checkpoint slots lie, and
 *                      the identity of the image file the log belongs to (device, inode, birth time)
 *   blocks 1..n        intent blocks: one bit per region of the disk, 32384 regions per 4 KiB block
 *   slot A, slot B     checkpoints; odd generations go to A, even ones to B; the newest valid one wins
 *
 * Every block and slot carries the log id and ends with the XxHash128 of everything before it, so a torn write, a
 * block of an older log at the same path or a block from another image never passes for a valid one. XxHash128 is
 * not cryptographic, on purpose: the threat is a torn or stale write, not an adversary who can write the file.
 * Intent blocks and slots also carry a generation: a block says which checkpoint was the newest durable one when it
 * was written, so a block newer than every valid checkpoint (a checkpoint the disk lost) is refused too.
 */

/// <summary>Where things lie in a write-intent log; fixed when the log file is created.</summary>
public sealed record IntentLogLayout(
    byte[] LogId,
    long RegionSize,
    int IntentBlocks,
    long SlotCapacity,
    FileIdentity? Image,
    string ImageName)
{
    public const int BlockSize = 4096;
    public const int RegionsPerBlock = (BlockSize - IntentLogFormat.BlockHeaderSize - IntentLogFormat.ChecksumSize) * 8;

    public long IntentOffset => BlockSize;

    public long SlotOffset(int slot) => BlockSize + ((long)IntentBlocks * BlockSize) + (slot * SlotCapacity);

    /// <summary>The slot a generation is written to: odd generations in slot 0 (A), even ones in slot 1 (B).</summary>
    public static int SlotOf(long generation) => (int)((generation + 1) & 1);

    public long FileLength => SlotOffset(2);

    public long BlockOffset(int block) => IntentOffset + ((long)block * BlockSize);

    /// <summary>Intent blocks for a disk of <paramref name="nodeSize"/> bytes.</summary>
    public static int BlocksFor(long nodeSize, long regionSize)
    {
        long regions = RegionsFor(nodeSize, regionSize);
        return (int)Math.Max(1, (regions + RegionsPerBlock - 1) / RegionsPerBlock);
    }

    public static long RegionsFor(long nodeSize, long regionSize) => (nodeSize + regionSize - 1) / regionSize;
}

/// <summary>Encoding and checking of the header, intent blocks and checkpoint slots of a write-intent log.</summary>
public static class IntentLogFormat
{
    public const ulong HeaderMagic = 0x4242_494E_5445_4E54; // "BBINTENT"
    public const uint Version = 1;
    public const uint BlockMagic = 0x494E_5442; // "INTB"
    public const uint SlotMagic = 0x434B_5054; // "CKPT"
    public const int BlockHeaderSize = 32;
    public const int ChecksumSize = 16;
    public const int SlotHeaderSize = 56;
    public const int EntryHeaderSize = 40;
    private const int MaxImageNameBytes = 512;

    private const uint StateOpen = 1;
    private const uint StateClean = 2;
    private const uint FlagRecording = 1;
    private const uint FlagInconsistent = 2;
    private const uint FlagRecovered = 4;
    private const uint EncodingNone = 0;
    private const uint EncodingBits = 1;
    private const uint EncodingRuns = 2;
    private const uint IdentityInode = 1;
    private const uint IdentityBirth = 2;

    #region Header

    public static byte[] EncodeHeader(IntentLogLayout layout)
    {
        byte[] b = new byte[IntentLogLayout.BlockSize];
        Span<byte> s = b;
        BinaryPrimitives.WriteUInt64BigEndian(s, HeaderMagic);
        BinaryPrimitives.WriteUInt32BigEndian(s[8..], Version);
        BinaryPrimitives.WriteUInt32BigEndian(s[12..], IntentLogLayout.BlockSize);
        layout.LogId.CopyTo(s[16..]);
        BinaryPrimitives.WriteInt64BigEndian(s[32..], layout.RegionSize);
        BinaryPrimitives.WriteInt64BigEndian(s[40..], layout.IntentOffset);
        BinaryPrimitives.WriteInt32BigEndian(s[48..], layout.IntentBlocks);
        BinaryPrimitives.WriteInt32BigEndian(s[52..], IntentLogLayout.RegionsPerBlock);
        BinaryPrimitives.WriteInt64BigEndian(s[56..], layout.SlotCapacity);
        BinaryPrimitives.WriteInt64BigEndian(s[64..], layout.SlotOffset(0));
        BinaryPrimitives.WriteInt64BigEndian(s[72..], layout.SlotOffset(1));
        if (layout.Image is { } id)
        {
            BinaryPrimitives.WriteUInt64BigEndian(s[80..], id.Device);
            BinaryPrimitives.WriteUInt64BigEndian(s[88..], id.Inode);
            BinaryPrimitives.WriteInt64BigEndian(s[96..], id.BirthSeconds);
            BinaryPrimitives.WriteUInt32BigEndian(s[104..], id.BirthNanoseconds);
            BinaryPrimitives.WriteUInt32BigEndian(s[108..], IdentityInode | (id.BirthSeconds != 0 || id.BirthNanoseconds != 0 ? IdentityBirth : 0));
        }
        byte[] name = Encoding.UTF8.GetBytes(layout.ImageName);
        int n = Math.Min(name.Length, MaxImageNameBytes);
        BinaryPrimitives.WriteUInt16BigEndian(s[112..], (ushort)n);
        name.AsSpan(0, n).CopyTo(s[114..]);
        Seal(b);
        return b;
    }

    /// <summary>The layout a header describes, or null with the reason it cannot be trusted.</summary>
    public static IntentLogLayout? DecodeHeader(ReadOnlySpan<byte> b, long fileLength, out string? problem)
    {
        problem = null;
        if (b.Length < IntentLogLayout.BlockSize || BinaryPrimitives.ReadUInt64BigEndian(b) != HeaderMagic)
            return Fail(out problem, "it does not start with the header of a write-intent log");
        if (!IsSealed(b[..IntentLogLayout.BlockSize]))
            return Fail(out problem, "its header does not match its checksum (torn or damaged)");
        uint version = BinaryPrimitives.ReadUInt32BigEndian(b[8..]);
        if (version != Version)
            return Fail(out problem, $"it is version {version} of the format; this module reads version {Version}");
        long regionSize = BinaryPrimitives.ReadInt64BigEndian(b[32..]);
        int blocks = BinaryPrimitives.ReadInt32BigEndian(b[48..]);
        long capacity = BinaryPrimitives.ReadInt64BigEndian(b[56..]);
        if (BinaryPrimitives.ReadUInt32BigEndian(b[12..]) != IntentLogLayout.BlockSize
            || BinaryPrimitives.ReadInt32BigEndian(b[52..]) != IntentLogLayout.RegionsPerBlock
            || regionSize < 4096 || (regionSize & (regionSize - 1)) != 0
            || blocks < 1 || capacity < IntentLogLayout.BlockSize || capacity % IntentLogLayout.BlockSize != 0
            || BinaryPrimitives.ReadInt64BigEndian(b[40..]) != IntentLogLayout.BlockSize)
            return Fail(out problem, "its header describes an impossible layout");
        uint identityFlags = BinaryPrimitives.ReadUInt32BigEndian(b[108..]);
        FileIdentity? identity = (identityFlags & IdentityInode) == 0 ? null : new FileIdentity(
            BinaryPrimitives.ReadUInt64BigEndian(b[80..]), BinaryPrimitives.ReadUInt64BigEndian(b[88..]),
            BinaryPrimitives.ReadInt64BigEndian(b[96..]), BinaryPrimitives.ReadUInt32BigEndian(b[104..]));
        int nameLength = Math.Min((int)BinaryPrimitives.ReadUInt16BigEndian(b[112..]), MaxImageNameBytes);
        var layout = new IntentLogLayout(b.Slice(16, 16).ToArray(), regionSize, blocks, capacity, identity, Encoding.UTF8.GetString(b.Slice(114, nameLength)));
        if (BinaryPrimitives.ReadInt64BigEndian(b[64..]) != layout.SlotOffset(0) || BinaryPrimitives.ReadInt64BigEndian(b[72..]) != layout.SlotOffset(1))
            return Fail(out problem, "its header describes an impossible layout");
        if (fileLength < layout.FileLength)
            return Fail(out problem, $"it is {fileLength} bytes long, shorter than the {layout.FileLength} bytes its header describes");
        return layout;
    }

    #endregion

    #region Intent blocks

    /// <summary>Intent block <paramref name="index"/>: the regions of <paramref name="bits"/> it covers.</summary>
    public static void EncodeBlock(Span<byte> block, IntentLogLayout layout, int index, long generation, ReadOnlySpan<ulong> bits)
    {
        block.Clear();
        BinaryPrimitives.WriteUInt32BigEndian(block, BlockMagic);
        BinaryPrimitives.WriteInt32BigEndian(block[4..], index);
        BinaryPrimitives.WriteInt64BigEndian(block[8..], generation);
        layout.LogId.CopyTo(block[16..]);
        Span<byte> payload = block.Slice(BlockHeaderSize, IntentLogLayout.RegionsPerBlock / 8);
        long firstWord = (long)index * IntentLogLayout.RegionsPerBlock / 64;
        for (int i = 0; i < payload.Length / 8; i++)
        {
            long w = firstWord + i;
            if (w < bits.Length)
                BinaryPrimitives.WriteUInt64LittleEndian(payload[(i * 8)..], bits[(int)w]); // bit j of the block = region j: QEMU's bit order
        }
        Seal(block);
    }

    /// <summary>Check block <paramref name="index"/> and OR its regions into <paramref name="bits"/>; the reason when it is not valid.</summary>
    public static string? DecodeBlock(ReadOnlySpan<byte> block, IntentLogLayout layout, int index, long newestGeneration, ulong[] bits)
    {
        if (BinaryPrimitives.ReadUInt32BigEndian(block) != BlockMagic || !IsSealed(block))
            return $"intent block {index} does not match its checksum (a torn write)";
        if (!block.Slice(16, 16).SequenceEqual(layout.LogId) || BinaryPrimitives.ReadInt32BigEndian(block[4..]) != index)
            return $"intent block {index} belongs to another log (a stale block)";
        long generation = BinaryPrimitives.ReadInt64BigEndian(block[8..]);
        if (generation > newestGeneration)
            return $"intent block {index} was written after checkpoint {generation}, newer than every valid checkpoint (the disk lost a checkpoint it had acknowledged)";
        ReadOnlySpan<byte> payload = block.Slice(BlockHeaderSize, IntentLogLayout.RegionsPerBlock / 8);
        long firstWord = (long)index * IntentLogLayout.RegionsPerBlock / 64;
        for (int i = 0; i < payload.Length / 8; i++)
        {
            ulong word = BinaryPrimitives.ReadUInt64LittleEndian(payload[(i * 8)..]);
            long w = firstWord + i;
            if (word == 0)
                continue;
            if (w >= bits.Length)
                return $"intent block {index} marks regions past the end of the disk";
            bits[w] |= word;
        }
        return null;
    }

    #endregion

    #region Checkpoint slots

    /// <summary>Bytes a checkpoint of these bitmaps can take at most (every bitmap's bits written out in full).</summary>
    public static long MaxSlotBytes(long nodeSize, IEnumerable<(string Name, long Granularity)> bitmaps)
    {
        long total = SlotHeaderSize + ChecksumSize;
        foreach ((string name, long granularity) in bitmaps)
            total += EntryHeaderSize + Align8(Encoding.UTF8.GetByteCount(name)) + Align8(HierarchicalBitmap.SerializedSize(DirtyBitmap.BitsFor(nodeSize, granularity)));
        return total;
    }

    public static byte[] EncodeSlot(IntentCheckpoint checkpoint, IntentLogLayout layout)
    {
        var entries = new List<(byte[] Name, uint Flags, long Granularity, long BitCount, uint Encoding, byte[] Data)>();
        foreach (IntentCheckpointEntry e in checkpoint.Bitmaps)
        {
            uint flags = (e.Recording ? FlagRecording : 0) | (e.Inconsistent ? FlagInconsistent : 0) | (e.Recovered ? FlagRecovered : 0);
            long bitCount = DirtyBitmap.BitsFor(checkpoint.NodeSize, e.Granularity);
            (uint encoding, byte[] data) = e.Bits is { } bits ? EncodeBits(bits, bitCount) : (EncodingNone, []);
            entries.Add((Encoding.UTF8.GetBytes(e.Name), flags, e.Granularity, bitCount, encoding, data));
        }
        long length = SlotHeaderSize + entries.Sum(e => EntryHeaderSize + Align8(e.Name.Length) + Align8(e.Data.Length));
        byte[] slot = new byte[length + ChecksumSize];
        Span<byte> s = slot;
        BinaryPrimitives.WriteUInt32BigEndian(s, SlotMagic);
        BinaryPrimitives.WriteUInt32BigEndian(s[4..], checkpoint.Clean ? StateClean : StateOpen);
        BinaryPrimitives.WriteInt64BigEndian(s[8..], checkpoint.Generation);
        layout.LogId.CopyTo(s[16..]);
        BinaryPrimitives.WriteInt64BigEndian(s[32..], length);
        BinaryPrimitives.WriteInt64BigEndian(s[40..], checkpoint.NodeSize);
        BinaryPrimitives.WriteInt32BigEndian(s[48..], entries.Count);
        int pos = SlotHeaderSize;
        foreach (var e in entries)
        {
            int size = (int)(EntryHeaderSize + Align8(e.Name.Length) + Align8(e.Data.Length));
            Span<byte> x = s.Slice(pos, size);
            BinaryPrimitives.WriteInt32BigEndian(x, size);
            BinaryPrimitives.WriteUInt32BigEndian(x[4..], e.Flags);
            BinaryPrimitives.WriteInt64BigEndian(x[8..], e.Granularity);
            BinaryPrimitives.WriteInt64BigEndian(x[16..], e.BitCount);
            BinaryPrimitives.WriteInt64BigEndian(x[24..], e.Data.Length);
            BinaryPrimitives.WriteUInt32BigEndian(x[32..], e.Encoding);
            BinaryPrimitives.WriteInt32BigEndian(x[36..], e.Name.Length);
            e.Name.CopyTo(x[EntryHeaderSize..]);
            e.Data.CopyTo(x[(int)(EntryHeaderSize + Align8(e.Name.Length))..]);
            pos += size;
        }
        XxHash128.Hash(slot.AsSpan(0, (int)length), slot.AsSpan((int)length));
        return slot;
    }

    /// <summary>The bits as QEMU serializes them, or as (start, count) runs when that is smaller (a sparse bitmap).</summary>
    private static (uint Encoding, byte[] Data) EncodeBits(HierarchicalBitmap bits, long bitCount)
    {
        long raw = HierarchicalBitmap.SerializedSize(bitCount);
        var runs = new List<(long, long)>();
        foreach ((long start, long count) in bits.Runs())
        {
            runs.Add((start, count));
            if (runs.Count * 16L >= raw)
            {
                byte[] data = new byte[raw];
                bits.Serialize(data, 0, bitCount);
                return (EncodingBits, data);
            }
        }
        byte[] r = new byte[runs.Count * 16];
        for (int i = 0; i < runs.Count; i++)
        {
            BinaryPrimitives.WriteInt64BigEndian(r.AsSpan(i * 16), runs[i].Item1);
            BinaryPrimitives.WriteInt64BigEndian(r.AsSpan((i * 16) + 8), runs[i].Item2);
        }
        return (EncodingRuns, r);
    }

    /// <summary>The checkpoint in a slot, or null with the reason (an empty slot, a torn one, one of another log).</summary>
    public static IntentCheckpoint? DecodeSlot(ReadOnlySpan<byte> slot, IntentLogLayout layout, out string? problem)
    {
        problem = null;
        if (slot.Length < SlotHeaderSize + ChecksumSize || BinaryPrimitives.ReadUInt32BigEndian(slot) != SlotMagic)
            return Fail<IntentCheckpoint>(out problem, "empty");
        long length = BinaryPrimitives.ReadInt64BigEndian(slot[32..]);
        if (length < SlotHeaderSize || length > slot.Length - ChecksumSize || length % 8 != 0)
            return Fail<IntentCheckpoint>(out problem, "its length is impossible (a torn write)");
        Span<byte> sum = stackalloc byte[ChecksumSize];
        XxHash128.Hash(slot[..(int)length], sum);
        if (!sum.SequenceEqual(slot.Slice((int)length, ChecksumSize)))
            return Fail<IntentCheckpoint>(out problem, "it does not match its checksum (a torn write)");
        if (!slot.Slice(16, 16).SequenceEqual(layout.LogId))
            return Fail<IntentCheckpoint>(out problem, "it belongs to another log (stale)");
        uint state = BinaryPrimitives.ReadUInt32BigEndian(slot[4..]);
        long generation = BinaryPrimitives.ReadInt64BigEndian(slot[8..]);
        long nodeSize = BinaryPrimitives.ReadInt64BigEndian(slot[40..]);
        int count = BinaryPrimitives.ReadInt32BigEndian(slot[48..]);
        if (state is not (StateOpen or StateClean) || generation < 1 || nodeSize <= 0 || count < 0)
            return Fail<IntentCheckpoint>(out problem, "its fields are impossible");
        var entries = new List<IntentCheckpointEntry>(count);
        int pos = SlotHeaderSize;
        for (int i = 0; i < count; i++)
        {
            if (pos > length - EntryHeaderSize)
                return Fail<IntentCheckpoint>(out problem, $"entry {i} is cut off");
            ReadOnlySpan<byte> x = slot[pos..(int)length];
            int size = BinaryPrimitives.ReadInt32BigEndian(x);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(x[4..]);
            long granularity = BinaryPrimitives.ReadInt64BigEndian(x[8..]);
            long bitCount = BinaryPrimitives.ReadInt64BigEndian(x[16..]);
            long dataSize = BinaryPrimitives.ReadInt64BigEndian(x[24..]);
            uint encoding = BinaryPrimitives.ReadUInt32BigEndian(x[32..]);
            int nameSize = BinaryPrimitives.ReadInt32BigEndian(x[36..]);
            if (nameSize <= 0 || nameSize > DirtyBitmapLimits.MaxNameBytes || dataSize < 0 || size < EntryHeaderSize
                || size > x.Length || EntryHeaderSize + Align8(nameSize) + Align8(dataSize) != size
                || granularity < DirtyBitmapLimits.MinGranularity || granularity > DirtyBitmapLimits.MaxGranularity || (granularity & (granularity - 1)) != 0
                || bitCount != DirtyBitmap.BitsFor(nodeSize, granularity))
                return Fail<IntentCheckpoint>(out problem, $"entry {i} is impossible");
            string name = Encoding.UTF8.GetString(x.Slice(EntryHeaderSize, nameSize));
            ReadOnlySpan<byte> data = x.Slice((int)(EntryHeaderSize + Align8(nameSize)), (int)dataSize);
            HierarchicalBitmap? bits = null;
            switch (encoding)
            {
                case EncodingNone when dataSize == 0:
                    break;
                case EncodingBits when dataSize == HierarchicalBitmap.SerializedSize(bitCount):
                    bits = new HierarchicalBitmap(bitCount);
                    bits.Deserialize(data, 0, bitCount);
                    break;
                case EncodingRuns when dataSize % 16 == 0:
                    bits = new HierarchicalBitmap(bitCount);
                    for (int r = 0; r < data.Length; r += 16)
                    {
                        long start = BinaryPrimitives.ReadInt64BigEndian(data[r..]);
                        long n = BinaryPrimitives.ReadInt64BigEndian(data[(r + 8)..]);
                        if (start < 0 || n <= 0 || n > bitCount - start)
                            return Fail<IntentCheckpoint>(out problem, $"entry {i} has a run past its end");
                        bits.Set(start, n);
                    }
                    break;
                default:
                    return Fail<IntentCheckpoint>(out problem, $"entry {i} has an impossible encoding");
            }
            bool inconsistent = (flags & FlagInconsistent) != 0;
            if (state == StateOpen && !inconsistent && bits is null)
                return Fail<IntentCheckpoint>(out problem, $"entry {i} has no bits");
            entries.Add(new IntentCheckpointEntry(name, granularity, (flags & FlagRecording) != 0, inconsistent, (flags & FlagRecovered) != 0, bits));
            pos += size;
        }
        return new IntentCheckpoint(generation, state == StateClean, nodeSize, entries);
    }

    #endregion

    /// <summary>Write the XxHash128 of the block's first bytes into its last 16.</summary>
    private static void Seal(Span<byte> block) => XxHash128.Hash(block[..^ChecksumSize], block[^ChecksumSize..]);

    private static bool IsSealed(ReadOnlySpan<byte> block)
    {
        Span<byte> sum = stackalloc byte[ChecksumSize];
        XxHash128.Hash(block[..^ChecksumSize], sum);
        return sum.SequenceEqual(block[^ChecksumSize..]);
    }

    private static long Align8(long n) => (n + 7) & ~7L;

    private static IntentLogLayout? Fail(out string? problem, string why)
    {
        problem = why;
        return null;
    }

    private static T? Fail<T>(out string? problem, string why) where T : class
    {
        problem = why;
        return null;
    }
}
