namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// A small write-back LRU cache of one-cluster metadata tables (L2 tables or refcount blocks), keyed by host
/// offset. Entries are loaded and written by the owner; the cache only tracks recency and dirtiness.
///
/// Rule for callers: a <see cref="CachedCluster"/> reference is valid only until the next load into the same
/// cache (which may evict it). Look an entry up, change it, mark it dirty, and let go.
/// </summary>
internal sealed class Qcow2ClusterCache
{
    private readonly Dictionary<long, LinkedListNode<CachedCluster>> _map = new();
    private readonly LinkedList<CachedCluster> _lru = new(); // most recent first

    public Qcow2ClusterCache(int clusterSize)
    {
        ClusterSize = clusterSize;
        Capacity = (int)Math.Max(Qcow2Limits.MinCachedTables, Qcow2Limits.CacheBudgetBytes / clusterSize);
    }

    public int ClusterSize { get; }

    /// <summary>Most tables held at once.</summary>
    public int Capacity { get; set; }

    public int Count => _map.Count;

    public bool IsFull => _map.Count >= Capacity;

    public IEnumerable<CachedCluster> Entries => _lru;

    public CachedCluster? TryGet(long offset)
    {
        if (!_map.TryGetValue(offset, out LinkedListNode<CachedCluster>? node))
            return null;
        if (node != _lru.First)
        {
            _lru.Remove(node);
            _lru.AddFirst(node);
        }
        return node.Value;
    }

    /// <summary>Add an entry; the caller has made room (see <see cref="LeastRecentlyUsed"/>).</summary>
    public CachedCluster Add(long offset, byte[] data, bool dirty)
    {
        var entry = new CachedCluster(offset, data) { Dirty = dirty };
        _map.Add(offset, _lru.AddFirst(entry));
        return entry;
    }

    /// <summary>The entry to evict next, or null when empty.</summary>
    public CachedCluster? LeastRecentlyUsed => _lru.Last?.Value;

    public void Remove(long offset)
    {
        if (_map.Remove(offset, out LinkedListNode<CachedCluster>? node))
            _lru.Remove(node);
    }
}

/// <summary>One cached metadata cluster.</summary>
internal sealed class CachedCluster(long offset, byte[] data)
{
    public long Offset { get; } = offset;

    public byte[] Data { get; } = data;

    /// <summary>Changed in memory and not yet written to the file.</summary>
    public bool Dirty { get; set; }
}
