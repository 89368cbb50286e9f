namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Reference counts of host clusters: the refcount table plus a write-back cache of refcount blocks, for any
/// refcount_order 0-6. Reads and updates go through the cache; <see cref="Flush"/> makes every change durable in
/// the order the format needs (blocks, fsync, table entries, fsync), so that an entry never points at a block
/// that is not on disk.
///
/// Dirty blocks here only ever hold increments, or decrements applied after the references were dropped on disk
/// (see <see cref="Qcow2Allocator.ApplyFrees"/>); so a dirty block may be written early, at eviction, without
/// breaking the crash rule "never reference a cluster whose refcount isn't on disk".
/// </summary>
internal sealed class Qcow2Refcounts
{
    private readonly Qcow2File _file;
    private readonly Qcow2MetadataRegions _regions;
    private readonly Qcow2ClusterCache _cache;
    private bool _writtenSinceSync;

    public Qcow2Refcounts(Qcow2File file, Qcow2RefcountTable table, Qcow2MetadataRegions regions, int clusterBits, int refcountOrder)
    {
        _file = file;
        Table = table;
        _regions = regions;
        ClusterBits = clusterBits;
        RefcountOrder = refcountOrder;
        EntriesPerBlock = Qcow2RefcountBlock.EntriesPerBlock(clusterBits, refcountOrder);
        MaxRefcount = Qcow2RefcountBlock.MaxRefcount(refcountOrder);
        _cache = new Qcow2ClusterCache(1 << clusterBits);
    }

    public Qcow2RefcountTable Table { get; set; }

    public int ClusterBits { get; }

    public int RefcountOrder { get; }

    public long EntriesPerBlock { get; }

    public ulong MaxRefcount { get; }

    internal Qcow2ClusterCache Cache => _cache;

    /// <summary>True when a refcount block exists for <paramref name="cluster"/>.</summary>
    public bool IsCovered(long cluster) => Table.BlockOffset(cluster / EntriesPerBlock) != 0;

    public ulong Get(long cluster)
    {
        long blockOffset = Table.BlockOffset(cluster / EntriesPerBlock);
        if (blockOffset == 0)
            return 0;
        return Qcow2RefcountBlock.Get(Load(blockOffset).Data, RefcountOrder, cluster % EntriesPerBlock);
    }

    /// <summary>Set a refcount; the cluster's block must exist (<see cref="IsCovered"/>).</summary>
    public void Set(long cluster, ulong value)
    {
        if (value > MaxRefcount)
            Qcow2Errors.Corrupt(_file.Path, $"the refcount of cluster {cluster} would exceed {MaxRefcount}, the largest a {1 << RefcountOrder}-bit refcount holds");
        long blockOffset = Table.BlockOffset(cluster / EntriesPerBlock);
        System.Diagnostics.Debug.Assert(blockOffset != 0, "refcount block must exist");
        CachedCluster block = Load(blockOffset);
        Qcow2RefcountBlock.Set(block.Data, RefcountOrder, cluster % EntriesPerBlock, value);
        block.Dirty = true;
    }

    /// <summary>Install a new block (in memory; written by <see cref="Flush"/>) and point the table at it.</summary>
    public void AddBlock(long tableIndex, long blockOffset, byte[] data, bool dirty)
    {
        MakeRoom();
        _cache.Add(blockOffset, data, dirty);
        _regions.AddRefcountBlock(blockOffset >> ClusterBits);
        if (Table.BlockOffset(tableIndex) != blockOffset)
            Table.SetBlockOffset(tableIndex, blockOffset);
    }

    /// <summary>Write dirty blocks, fsync, write changed table entries, fsync. Returns whether anything was synced.</summary>
    public bool Flush()
    {
        bool synced = false;
        foreach (CachedCluster block in _cache.Entries)
        {
            if (!block.Dirty)
                continue;
            _file.Write(block.Offset, block.Data);
            block.Dirty = false;
            _writtenSinceSync = true;
        }
        if (_writtenSinceSync)
        {
            _file.Sync();
            _writtenSinceSync = false;
            synced = true;
        }
        if (Table.IsDirty)
        {
            Table.WriteDirty(_file);
            _file.Sync();
            synced = true;
        }
        return synced;
    }

    private CachedCluster Load(long blockOffset)
    {
        if (_cache.TryGet(blockOffset) is { } hit)
            return hit;
        MakeRoom();
        var data = new byte[1 << ClusterBits];
        _file.Read(blockOffset, data);
        return _cache.Add(blockOffset, data, dirty: false);
    }

    private void MakeRoom()
    {
        while (_cache.IsFull && _cache.LeastRecentlyUsed is { } victim)
        {
            if (victim.Dirty)
            {
                _file.Write(victim.Offset, victim.Data);
                _writtenSinceSync = true;
            }
            _cache.Remove(victim.Offset);
        }
    }
}
