using BitmapBackup.Core.Digests;

namespace BitmapBackup;

/// <summary>What Update-DirtyBitmap did: the node scanned against the manifest of the bitmap's last backup.</summary>
public sealed class BitmapUpdateResult
{
    internal BitmapUpdateResult(BitmapContentUpdateResult r)
    {
        Node = r.Node;
        Name = r.Bitmap;
        Manifest = r.Manifest;
        WhatIf = r.WhatIf;
        WasInconsistent = r.WasInconsistent;
        Narrowed = r.Narrowed;
        ClusterSize = r.ClusterSize;
        ClustersRead = r.Scan.Clusters;
        ClustersDiffering = r.Scan.ClustersDiffering;
        BytesDiffering = r.BytesDiffering;
        BytesRead = r.Scan.BytesRead;
        Duration = r.Scan.Duration;
        BytesPerSecond = (long)r.Scan.BytesPerSecond;
    }

    public string Node { get; }

    /// <summary>The bitmap updated.</summary>
    public string Name { get; }

    /// <summary>The digest manifest compared with.</summary>
    public string Manifest { get; }

    /// <summary>True when -WhatIf only counted what would be marked.</summary>
    public bool WhatIf { get; }

    /// <summary>Whether the bitmap was inconsistent before (it is consistent now, unless -WhatIf).</summary>
    public bool WasInconsistent { get; }

    /// <summary>
    /// True when the bitmap had been recovered from its write-intent log: only the clusters it marked were read, and the
    /// ones still equal to the last backup were cleared.
    /// </summary>
    public bool Narrowed { get; }

    /// <summary>Bytes per digest (the backup's job cluster).</summary>
    public long ClusterSize { get; }

    /// <summary>Clusters compared (holes and zero clusters are compared without being read): the whole disk, or the clusters a recovered bitmap marks.</summary>
    public long ClustersRead { get; }

    /// <summary>Clusters whose content differs from the last backup: marked dirty.</summary>
    public long ClustersDiffering { get; }

    public long BytesDiffering { get; }

    /// <summary>Data read from the node (holes are not read).</summary>
    public long BytesRead { get; }

    public TimeSpan Duration { get; }

    /// <summary>Data read per second.</summary>
    public long BytesPerSecond { get; }
}
