using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The active L1 table held in memory (spec "Cluster mapping"): one entry per L2 table, bits 9-55 the L2 table's
/// host offset, bit 63 COPIED. Changed entries are written back by 512-byte sector on <see cref="WriteDirty"/>,
/// which the image calls only after the L2 tables they point to are on disk.
/// </summary>
internal sealed class Qcow2L1Table
{
    private const int EntriesPerSector = 512 / sizeof(ulong);
    private readonly ulong[] _entries;
    private readonly SortedSet<int> _dirtySectors = new();

    public Qcow2L1Table(long offset, ulong[] entries)
    {
        Offset = offset;
        _entries = entries;
    }

    /// <summary>File offset of the table (cluster aligned).</summary>
    public long Offset { get; }

    public int Count => _entries.Length;

    public bool IsDirty => _dirtySectors.Count > 0;

    public ulong this[long index] => _entries[index];

    /// <summary>Host offset of L2 table <paramref name="index"/>, or 0 when unallocated.</summary>
    public long L2Offset(long index) => (long)(_entries[index] & Qcow2L2Entry.OffsetMask);

    public bool IsCopied(long index) => (_entries[index] & Qcow2L2Entry.CopiedFlag) != 0;

    public void Set(long index, ulong value)
    {
        _entries[index] = value;
        _dirtySectors.Add((int)(index / EntriesPerSector));
    }

    public static Qcow2L1Table Load(Qcow2File file, long offset, int count)
    {
        var bytes = new byte[checked(count * sizeof(ulong))];
        file.Read(offset, bytes);
        var entries = new ulong[count];
        for (int i = 0; i < count; i++)
            entries[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * sizeof(ulong)));
        return new Qcow2L1Table(offset, entries);
    }

    /// <summary>The table's bytes, zero-padded to <paramref name="length"/>.</summary>
    public byte[] ToBytes(int count, int length)
    {
        var bytes = new byte[length];
        for (int i = 0; i < Math.Min(count, _entries.Length); i++)
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * sizeof(ulong)), _entries[i]);
        return bytes;
    }

    /// <summary>A copy with <paramref name="count"/> entries (new ones zero) placed at <paramref name="offset"/>.</summary>
    public Qcow2L1Table Resized(long offset, int count)
    {
        var entries = new ulong[count];
        Array.Copy(_entries, entries, Math.Min(count, _entries.Length));
        return new Qcow2L1Table(offset, entries);
    }

    /// <summary>Write the changed sectors (no fsync).</summary>
    public void WriteDirty(Qcow2File file)
    {
        Span<byte> sector = stackalloc byte[512];
        foreach (int s in _dirtySectors)
        {
            int first = s * EntriesPerSector;
            int n = Math.Min(EntriesPerSector, _entries.Length - first);
            for (int i = 0; i < n; i++)
                BinaryPrimitives.WriteUInt64BigEndian(sector[(i * sizeof(ulong))..], _entries[first + i]);
            file.Write(Offset + (first * (long)sizeof(ulong)), sector[..(n * sizeof(ulong))]);
        }
        _dirtySectors.Clear();
    }
}
