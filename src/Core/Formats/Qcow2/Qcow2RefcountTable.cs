using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The refcount table held in memory (spec "Host cluster management"): entry i is the host offset of the refcount
/// block for clusters [i * E, (i + 1) * E), E = entries per block, or 0 when that block does not exist (all those
/// refcounts are 0). Changed entries are written back by sector after the blocks they point to are on disk.
/// </summary>
internal sealed class Qcow2RefcountTable
{
    private const int EntriesPerSector = 512 / sizeof(ulong);
    private const ulong OffsetMask = ~0x1FFUL; // bits 9-63
    private readonly ulong[] _entries;
    private readonly SortedSet<int> _dirtySectors = new();

    public Qcow2RefcountTable(long offset, int clusters, ulong[] entries)
    {
        Offset = offset;
        Clusters = clusters;
        _entries = entries;
    }

    public long Offset { get; }

    /// <summary>Clusters the table occupies in the file.</summary>
    public int Clusters { get; }

    public int Count => _entries.Length;

    public bool IsDirty => _dirtySectors.Count > 0;

    public long BlockOffset(long index) => index < _entries.Length ? (long)(_entries[index] & OffsetMask) : 0;

    public ulong RawEntry(long index) => _entries[index];

    public void SetBlockOffset(long index, long offset)
    {
        _entries[index] = (ulong)offset;
        _dirtySectors.Add((int)(index / EntriesPerSector));
    }

    public static Qcow2RefcountTable Load(Qcow2File file, long offset, int clusters, int clusterBits)
    {
        int count = (int)(((long)clusters << clusterBits) / sizeof(ulong));
        var bytes = new byte[count * sizeof(ulong)];
        file.Read(offset, bytes);
        var entries = new ulong[count];
        for (int i = 0; i < count; i++)
            entries[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * sizeof(ulong)));
        return new Qcow2RefcountTable(offset, clusters, entries);
    }

    /// <summary>The entries, copied into an array of <paramref name="count"/> (new entries 0), for a larger table.</summary>
    public ulong[] CopyEntries(int count)
    {
        var entries = new ulong[count];
        Array.Copy(_entries, entries, Math.Min(count, _entries.Length));
        return entries;
    }

    /// <summary>Entries as big-endian bytes, zero-padded to <paramref name="length"/>.</summary>
    public static byte[] Serialize(ulong[] entries, int length)
    {
        var bytes = new byte[length];
        for (int i = 0; i < entries.Length; i++)
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * sizeof(ulong)), entries[i]);
        return bytes;
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
