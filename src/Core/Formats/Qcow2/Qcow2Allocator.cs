using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Hands out host clusters and takes them back, keeping refcounts exact (no lazy refcounts).
///
/// Allocation scans for a cluster with refcount 0 from a hint (the lowest cluster that may be free) up to the
/// end of the used area, then appends. A cluster is never taken if it holds metadata
/// (<see cref="Qcow2MetadataRegions"/>), whatever its refcount says.
///
/// Freeing is deferred: <see cref="QueueFree"/> only records the decrement, and <see cref="ApplyFrees"/> applies
/// it when the image flushes, after the L2/L1 entries that dropped the references are on disk. Until then the
/// cluster keeps its refcount, so it cannot be handed out again while an on-disk table may still point at it.
///
/// Compressed data is packed (<see cref="AllocateBytes"/>): several compressed clusters share a host cluster, whose
/// refcount is the number of compressed clusters touching it.
///
/// Refcount blocks are created inside the range they describe (the block counts itself); when the refcount table
/// is too small it is replaced by a larger one at the end of the file (<see cref="GrowTable"/>).
/// </summary>
internal sealed class Qcow2Allocator
{
    /// <summary>Refcounts may claim a few clusters past the end of the file (a crash between refcount and data writes).</summary>
    private const long TolerancePastEnd = 64;

    private readonly Qcow2File _file;
    private readonly Qcow2Refcounts _refcounts;
    private readonly Qcow2MetadataRegions _regions;
    private readonly Qcow2Header _header;
    private readonly int _clusterBits;
    private readonly Dictionary<long, ulong> _pendingFrees = new();
    private long _freeHint;
    private long _endCluster;
    private long _freeByteOffset; // next free byte of the host cluster compressed data is packed into; 0: none
    private long _limitCluster = long.MaxValue; // first cluster past the end of a block device: nothing is allocated there

    private Qcow2Allocator(Qcow2File file, Qcow2Refcounts refcounts, Qcow2MetadataRegions regions, Qcow2Header header)
    {
        _file = file;
        _refcounts = refcounts;
        _regions = regions;
        _header = header;
        _clusterBits = refcounts.ClusterBits;
    }

    /// <summary>First byte past every cluster in use or handed out.</summary>
    public long EndOffset => _endCluster << _clusterBits;

    public bool HasPendingFrees => _pendingFrees.Count > 0;

    /// <summary>
    /// Set up for writing: find the last cluster the refcounts claim, reading each distinct refcount block once
    /// (their total size is bounded by the file). Refcounts claiming clusters far past the end of the file are
    /// refused: appending there would mean a huge sparse jump, and no valid image has them.
    /// </summary>
    public static Qcow2Allocator Create(Qcow2File file, Qcow2Refcounts refcounts, Qcow2MetadataRegions regions, Qcow2Header header)
    {
        var allocator = new Qcow2Allocator(file, refcounts, regions, header);
        int cb = refcounts.ClusterBits;
        long fileClusters = (file.Length + (1L << cb) - 1) >> cb;
        long lastUsed = -1;
        var lastInBlock = new Dictionary<long, long>();
        var block = new byte[1 << cb];
        for (long i = 0; i < refcounts.Table.Count; i++)
        {
            long offset = refcounts.Table.BlockOffset(i);
            if (offset == 0)
                continue;
            if (!lastInBlock.TryGetValue(offset, out long last))
            {
                file.Read(offset, block);
                last = LastNonZeroEntry(block, refcounts.RefcountOrder);
                lastInBlock[offset] = last;
            }
            if (last >= 0)
                lastUsed = (i * refcounts.EntriesPerBlock) + last;
        }
        if (lastUsed >= fileClusters + TolerancePastEnd)
            Qcow2Errors.Corrupt(file.Path, $"refcounts mark cluster {lastUsed} as used, far past the end of the file ({fileClusters} clusters); run 'qemu-img check -r all'");
        if (file.Device is null)
        {
            allocator._endCluster = Math.Max(fileClusters, lastUsed + 1);
        }
        else
        {
            // On a block device the "file" is as long as the device whatever the image uses: the image ends after its
            // last used cluster, new clusters go after it, and none past the device's end (ENOSPC, as QEMU meets it).
            allocator._endCluster = lastUsed + 1;
            allocator._limitCluster = file.Length >> cb;
        }
        return allocator;
    }

    /// <summary>
    /// Refuse, before anything changes, an allocation that would end past <paramref name="endCluster"/> on a block
    /// device: the device cannot grow, so the image is out of space (ENOSPC), as a file system that is full.
    /// </summary>
    private void CheckRoom(long endCluster)
    {
        if (endCluster <= _limitCluster)
            return;
        _limitCluster = _file.RefreshDeviceLength() >> _clusterBits; // grown meanwhile (lvextend)?
        if (endCluster > _limitCluster)
            Qcow2Errors.NoSpace(_file.Path, _file.Length);
    }

    private static long LastNonZeroEntry(ReadOnlySpan<byte> block, int order)
    {
        int lastByte = block.LastIndexOfAnyExcept((byte)0);
        if (lastByte < 0)
            return -1;
        if (order >= 3)
            return lastByte / (1 << (order - 3));
        int perByte = 8 >> order;
        int bits = 1 << order;
        int b = block[lastByte];
        for (int k = perByte - 1; k >= 0; k--)
        {
            if (((b >> (k * bits)) & ((1 << bits) - 1)) != 0)
                return ((long)lastByte * perByte) + k;
        }
        return -1;
    }

    /// <summary>Allocate one cluster (refcount set to 1 in memory) and return its host offset.</summary>
    public long AllocateCluster()
    {
        while (true)
        {
            long c = _freeHint < _endCluster ? _freeHint : _endCluster;
            if (!_refcounts.IsCovered(c))
            {
                EnsureBlock(c / _refcounts.EntriesPerBlock);
                continue; // the block may have been placed at c
            }
            if (_refcounts.Get(c) == 0 && _regions.Describe(c) is null)
            {
                CheckRoom(c + 1);
                _refcounts.Set(c, 1);
                _freeHint = c + 1;
                _endCluster = Math.Max(_endCluster, c + 1);
                return c << _clusterBits;
            }
            if (c >= _endCluster)
                _endCluster = c + 1; // only metadata or an already counted cluster can sit here; skip it
            _freeHint = c + 1;
        }
    }

    /// <summary>Allocate <paramref name="count"/> contiguous clusters at the end of the file.</summary>
    public long AllocateContiguous(long count)
    {
        while (true)
        {
            long start = _endCluster;
            bool covered = true;
            for (long ti = start / _refcounts.EntriesPerBlock; ti <= (start + count - 1) / _refcounts.EntriesPerBlock; ti++)
            {
                if (_refcounts.Table.BlockOffset(ti) == 0)
                {
                    EnsureBlock(ti);
                    covered = false;
                    break;
                }
            }
            if (!covered)
                continue;
            CheckRoom(start + count);
            for (long c = start; c < start + count; c++)
                _refcounts.Set(c, 1);
            _endCluster = start + count;
            return start << _clusterBits;
        }
    }

    /// <summary>
    /// Allocate <paramref name="size"/> bytes (1 to a cluster) for compressed data, as QEMU's qcow2_alloc_bytes:
    /// right after the previous compressed data when it fits in that host cluster, or when the cluster allocated
    /// next happens to follow it in the file (the spec lets compressed data run on into the next contiguous
    /// cluster); else at the start of a new cluster. Every host cluster the bytes touch gets one more reference
    /// (in memory: flushed before the L2 entry that points at them, like any allocation). A cluster whose refcount
    /// is at its maximum is not packed into.
    /// </summary>
    public long AllocateBytes(int size)
    {
        long clusterSize = 1L << _clusterBits;
        long mask = clusterSize - 1;
        if (size <= 0 || size > clusterSize)
            throw new ArgumentOutOfRangeException(nameof(size), size, "compressed data must be 1 byte to one cluster long");
        long offset = _freeByteOffset;
        if (offset != 0 && _refcounts.Get(offset >> _clusterBits) >= _refcounts.MaxRefcount)
            offset = 0;
        if (offset != 0 && clusterSize - (offset & mask) >= size)
        {
            Increment(offset >> _clusterBits);
        }
        else
        {
            long cluster = AllocateCluster(); // refcount 1: the new data's reference
            if (offset != 0 && ((offset + mask) & ~mask) == cluster)
                Increment(offset >> _clusterBits); // runs on from the current cluster into the new one
            else
                offset = cluster;
        }
        long next = offset + size;
        _freeByteOffset = (next & mask) == 0 ? 0 : next;
        return offset;
    }

    private void Increment(long cluster)
    {
        ulong refcount = _refcounts.Get(cluster);
        if (refcount == 0)
            Qcow2Errors.Corrupt(_file.Path, $"cluster {cluster} (offset {cluster << _clusterBits}) holds compressed data but its refcount is 0");
        _refcounts.Set(cluster, refcount + 1);
    }

    /// <summary>
    /// Record that one reference to each cluster of [offset, offset + length) was dropped. The caller has already
    /// removed the reference from its (in-memory) table.
    /// </summary>
    public void QueueFree(long offset, long length)
    {
        long first = offset >> _clusterBits;
        long last = (offset + length - 1) >> _clusterBits;
        for (long c = first; c <= last; c++)
        {
            ulong pending = _pendingFrees.GetValueOrDefault(c);
            ulong refcount = c < _endCluster ? _refcounts.Get(c) : 0;
            if (refcount <= pending)
                Qcow2Errors.Corrupt(_file.Path, $"cluster {c} (offset {c << _clusterBits}) is referenced but its refcount is {refcount}; run 'qemu-img check -r all'");
            _pendingFrees[c] = pending + 1;
        }
    }

    /// <summary>
    /// The first cluster of [offset, offset + length) whose refcount does not cover one more queued free (so
    /// <see cref="QueueFree"/> of the range would call the image corrupt), or null when the whole range can be freed.
    /// </summary>
    public long? UnreferencedCluster(long offset, long length)
    {
        for (long c = offset >> _clusterBits; c <= (offset + length - 1) >> _clusterBits; c++)
        {
            ulong refcount = c < _endCluster ? _refcounts.Get(c) : 0;
            if (refcount <= _pendingFrees.GetValueOrDefault(c))
                return c;
        }
        return null;
    }

    /// <summary>
    /// Give back at once a fresh allocation that nothing references (its data write failed): one reference fewer on
    /// each cluster of [offset, offset + length). Safe without waiting for a flush, since no table on disk or in
    /// memory points there; a refcount already written meanwhile is rewritten by the next flush.
    /// </summary>
    public void ReleaseUnreferenced(long offset, long length)
    {
        for (long c = offset >> _clusterBits; c <= (offset + length - 1) >> _clusterBits; c++)
        {
            ulong refcount = _refcounts.Get(c);
            if (refcount == 0)
                continue;
            _refcounts.Set(c, refcount - 1);
            if (refcount == 1)
            {
                _freeHint = Math.Min(_freeHint, c);
                if (_freeByteOffset != 0 && _freeByteOffset >> _clusterBits == c)
                    _freeByteOffset = 0;
            }
        }
    }

    /// <summary>
    /// Like <see cref="QueueFree"/> for one cluster, but a cluster whose refcount does not cover the reference (a
    /// damaged image) is left alone and false returned: the caller prefers a leak to a refcount underflow.
    /// </summary>
    public bool TryQueueFree(long cluster)
    {
        ulong pending = _pendingFrees.GetValueOrDefault(cluster);
        ulong refcount = cluster < _endCluster ? _refcounts.Get(cluster) : 0;
        if (refcount <= pending)
            return false;
        _pendingFrees[cluster] = pending + 1;
        return true;
    }

    /// <summary>Apply the queued decrements (in memory; the caller flushes the refcounts after).</summary>
    public void ApplyFrees()
    {
        foreach ((long c, ulong n) in _pendingFrees)
        {
            ulong refcount = _refcounts.Get(c) - n;
            _refcounts.Set(c, refcount);
            if (refcount == 0)
            {
                _freeHint = Math.Min(_freeHint, c);
                if (_freeByteOffset != 0 && _freeByteOffset >> _clusterBits == c)
                    _freeByteOffset = 0; // free now, and may be handed out for anything: pack elsewhere
            }
        }
        _pendingFrees.Clear();
    }

    /// <summary>Create the refcount block for table entry <paramref name="tableIndex"/>, growing the table if needed.</summary>
    private void EnsureBlock(long tableIndex)
    {
        if (tableIndex >= _refcounts.Table.Count)
        {
            GrowTable(tableIndex + 1);
            return;
        }
        if (_refcounts.Table.BlockOffset(tableIndex) != 0)
            return;
        long e = _refcounts.EntriesPerBlock;
        long first = tableIndex * e;
        // Every refcount in the range is 0 (there is no block), so the block may sit on any cluster of it that is
        // not metadata; it then counts itself.
        for (long c = first; c < first + e; c++)
        {
            if (_regions.Describe(c) is not null)
                continue;
            CheckRoom(c + 1);
            var data = new byte[1 << _clusterBits];
            Qcow2RefcountBlock.Set(data, _refcounts.RefcountOrder, c - first, 1);
            _refcounts.AddBlock(tableIndex, c << _clusterBits, data, dirty: true);
            _endCluster = Math.Max(_endCluster, c + 1);
            return;
        }
        Qcow2Errors.Corrupt(_file.Path, $"no room for refcount block {tableIndex}: every cluster it would describe holds metadata");
    }

    /// <summary>
    /// Replace the refcount table by one with at least <paramref name="minEntries"/> entries, placed at the end of
    /// the file together with the refcount blocks that describe the new clusters. Order: current refcounts durable;
    /// new blocks and table written; fsync; header switched (one 12-byte write); fsync; old table freed.
    /// </summary>
    private void GrowTable(long minEntries)
    {
        int cb = _clusterBits;
        long e = _refcounts.EntriesPerBlock;
        Qcow2RefcountTable old = _refcounts.Table;
        _refcounts.Flush();

        long start = _endCluster;
        long blocks = 0, tableClusters = 1;
        List<long> newBlockIndexes;
        while (true)
        {
            long end = start + blocks + tableClusters;
            long needed = Math.Max(minEntries, (end + e - 1) / e);
            long wanted = Math.Max(needed, old.Count + (old.Count / 2) + 1);
            long newTableClusters = ((wanted * sizeof(ulong)) + (1L << cb) - 1) >> cb;
            if (newTableClusters << cb > Qcow2Limits.MaxRefcountTableBytes)
                Qcow2Errors.TooLarge(_file.Path, $"the refcount table would exceed {Qcow2Limits.MaxRefcountTableBytes >> 20} MiB");
            newBlockIndexes = new List<long>();
            for (long ti = start / e; ti <= (end - 1) / e; ti++)
            {
                if (old.BlockOffset(ti) == 0)
                    newBlockIndexes.Add(ti);
            }
            if (newBlockIndexes.Count == blocks && newTableClusters == tableClusters)
                break; // both only grow with the layout's end, so this is reached
            blocks = Math.Max(blocks, newBlockIndexes.Count);
            tableClusters = Math.Max(tableClusters, newTableClusters);
        }
        // Blocks at [start, start + blocks), table right after; reserve exactly what the layout computed.
        CheckRoom(start + blocks + tableClusters);
        long newCount = (tableClusters << cb) / sizeof(ulong); // use the whole clusters
        long tableStart = start + blocks;
        long layoutEnd = tableStart + tableClusters;
        ulong[] entries = old.CopyEntries((int)newCount);
        var newBlocks = new Dictionary<long, byte[]>();
        for (int k = 0; k < newBlockIndexes.Count; k++)
        {
            long ti = newBlockIndexes[k];
            newBlocks[ti] = new byte[1 << cb];
            entries[ti] = (ulong)((start + k) << cb);
        }
        for (long c = start; c < layoutEnd; c++)
        {
            long ti = c / e;
            if (newBlocks.TryGetValue(ti, out byte[]? data))
                Qcow2RefcountBlock.Set(data, _refcounts.RefcountOrder, c % e, 1);
            else
                _refcounts.Set(c, 1); // an existing block covers it
        }
        foreach ((long ti, byte[] data) in newBlocks)
            _file.Write((long)entries[ti], data);
        _file.Write(tableStart << cb, Qcow2RefcountTable.Serialize(entries, (int)(tableClusters << cb)));
        _refcounts.Flush(); // existing blocks that now count table clusters, plus fsync

        Span<byte> fields = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(fields, (ulong)(tableStart << cb));
        BinaryPrimitives.WriteUInt32BigEndian(fields[8..], (uint)tableClusters);
        _file.Sync();
        _file.Write(Qcow2Header.RefcountTableOffsetOffset, fields);
        _file.Sync();
        _header.RefcountTableOffset = (ulong)(tableStart << cb);
        _header.RefcountTableClusters = (uint)tableClusters;

        var table = new Qcow2RefcountTable(tableStart << cb, (int)tableClusters, entries);
        _refcounts.Table = table;
        _regions.SetFixed(Qcow2MetadataRegions.RefcountTableName, tableStart << cb, tableClusters << cb);
        foreach ((long ti, byte[] data) in newBlocks)
            _refcounts.AddBlock(ti, (long)entries[ti], data, dirty: false);
        _endCluster = Math.Max(_endCluster, layoutEnd);
        QueueFree(old.Offset, (long)old.Clusters << cb);
    }
}
