namespace BitmapBackup;

/// <summary>What Test-IncrementalBackup found: the chain's structure and its content against a reference.</summary>
public sealed class BackupVerification
{
    internal BackupVerification(string path, string reference, IReadOnlyList<string> problems, long leakedClusters, long? firstDifference, long bytesCompared, long? clustersDiffering = null)
    {
        ClustersDiffering = clustersDiffering;
        Path = path;
        Reference = reference;
        Problems = problems.ToArray();
        LeakedClusters = leakedClusters;
        FirstDifference = firstDifference;
        BytesCompared = bytesCompared;
    }

    /// <summary>The top image of the chain.</summary>
    public string Path { get; }

    /// <summary>The node or image compared with.</summary>
    public string Reference { get; }

    /// <summary>Structural problems found in the chain's images (corruption); empty when sound.</summary>
    public string[] Problems { get; }

    /// <summary>Clusters allocated but unused (harmless, as qemu-img check reports leaks).</summary>
    public long LeakedClusters { get; }

    /// <summary>Whether the chain's images are sound.</summary>
    public bool ChainValid => Problems.Length == 0;

    /// <summary>Whether the chain reads exactly like the reference (extra length of either must read as zeros).</summary>
    public bool Equal => FirstDifference is null && ChainValid;

    /// <summary>The first offset where content differs, or empty.</summary>
    public long? FirstDifference { get; }

    public long BytesCompared { get; }

    /// <summary>With -Manifest: how many clusters do not hash to their digest; empty otherwise.</summary>
    public long? ClustersDiffering { get; }

    /// <summary>Equal and sound.</summary>
    public bool Passed => Equal;
}
