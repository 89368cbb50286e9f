namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Which host clusters hold metadata: the header cluster, the active L1 table, the refcount table, the bitmap
/// directory, every L2 table the active L1 table points to and every refcount block. QEMU's "overlap check" in
/// small: a data write or a newly allocated cluster must never land on one of these, whatever the refcounts of a
/// damaged image say. Memory is bounded by the tables, which are bounded by the file size.
/// </summary>
internal sealed class Qcow2MetadataRegions
{
    private readonly int _clusterBits;
    private readonly Dictionary<string, (long First, long Count)> _fixed = new(StringComparer.Ordinal);
    private readonly HashSet<long> _l2Tables = new();
    private readonly HashSet<long> _refcountBlocks = new();

    public Qcow2MetadataRegions(int clusterBits)
    {
        _clusterBits = clusterBits;
        SetFixed(HeaderName, 0, 1);
    }

    public const string HeaderName = "the image header";
    public const string L1Name = "the L1 table";
    public const string RefcountTableName = "the refcount table";
    public const string BitmapDirectoryName = "the bitmap directory";

    /// <summary>Record a contiguous structure of <paramref name="bytes"/> bytes at <paramref name="offset"/>.</summary>
    public void SetFixed(string name, long offset, long bytes)
    {
        long first = offset >> _clusterBits;
        long end = (offset + bytes + (1L << _clusterBits) - 1) >> _clusterBits;
        _fixed[name] = (first, Math.Max(0, end - first));
    }

    /// <summary>The fixed structure (header, L1, refcount table, bitmap directory) overlapping the clusters, or null.</summary>
    public string? FixedOverlap(long firstCluster, long count)
    {
        foreach ((string name, (long first, long n)) in _fixed)
        {
            if (n > 0 && firstCluster < first + n && first < firstCluster + count)
                return name;
        }
        return null;
    }

    public bool AddL2Table(long cluster) => _l2Tables.Add(cluster);

    public void RemoveL2Table(long cluster) => _l2Tables.Remove(cluster);

    public bool AddRefcountBlock(long cluster) => _refcountBlocks.Add(cluster);

    /// <summary>What metadata the cluster holds, or null when it holds none.</summary>
    public string? Describe(long cluster)
    {
        if (_l2Tables.Contains(cluster))
            return "an L2 table";
        if (_refcountBlocks.Contains(cluster))
            return "a refcount block";
        return FixedOverlap(cluster, 1);
    }
}
