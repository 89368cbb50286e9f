using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Digests;

/*
 * Update-DirtyBitmap: mark what the disk holds that its last backup does not, found by content.
 *
 * The node is read and every cluster's digest compared with the manifest of the bitmap's last backup
 * (ManifestScan). Writes made through the engine during the scan must not be lost, and the bitmap must not change
 * under the scan's feet, so the scan runs like a backup: the bitmap gets a successor (it is busy; the successor
 * records the writes made meanwhile), and at the end it takes its old bits (none, when it was inconsistent: they
 * cannot be trusted), the writes made during the scan and the clusters found changed. A write during the scan lands
 * either before the scan reads its cluster (the change is seen) or after (the successor has it), so nothing is missed.
 * An inconsistent bitmap comes out consistent and recording; a failed or cancelled scan gives the bitmap back as it
 * was (still inconsistent, if it was).
 *
 * A bitmap recovered from its write-intent log after a crash is consistent (a superset of what changed since its last
 * backup) but coarse. With the manifest of that last backup, the scan reads only the clusters it marks and clears
 * every bit whose clusters all still equal the backup: it narrows the bitmap, reading what it marks, not the disk.
 * Nothing outside its bits can have changed (it is a superset), so nothing else needs a read. Only the manifest the
 * bitmap's last backup recorded is trusted for this (clearing bits against an older backup's manifest would lose
 * changes made after it); with another one the scan reads the whole disk and only adds, as for any bitmap.
 */

/// <summary>What Update-DirtyBitmap did.</summary>
public sealed record BitmapContentUpdateResult(
    string Node,
    string Bitmap,
    string Manifest,
    bool WhatIf,
    bool WasInconsistent,
    long ClusterSize,
    ManifestScanResult Scan,
    bool Narrowed = false)
{
    /// <summary>Bytes of the clusters found different from the last backup.</summary>
    public long BytesDiffering => Scan.ClustersDiffering * ClusterSize;
}

public static class BitmapContentUpdate
{
    /// <summary>
    /// The manifest of the bitmap's last backup: <paramref name="manifestPath"/>, else what the manifest index
    /// recorded. Refused (one id each): none (DigestManifestNotFound), one of another node, size or granularity
    /// (DigestManifestMismatch).
    /// </summary>
    public static DigestManifest OpenManifest(BlockNode node, DirtyBitmap bitmap, string? manifestPath)
    {
        string? path = manifestPath ?? ManifestIndex.Find(node.Path, bitmap.Name!);
        if (path is null)
            Throw.Block(ErrorIds.DigestManifestNotFound, BlockErrorCategory.ObjectNotFound,
                $"No digest manifest is known for bitmap '{bitmap.Name}' of node '{node.Name}': no backup taken from it wrote one. Give its last backup's manifest with -Manifest ('<backup>{DigestManifest.Suffix}'), or take a full backup.", bitmap.Name);
        DigestManifest manifest = DigestManifest.Open(path);
        try
        {
            CheckMatches(manifest, node, bitmap);
            return manifest;
        }
        catch
        {
            manifest.Dispose();
            throw;
        }
    }

    /// <summary>Whether <paramref name="manifest"/> is the one the bitmap's last backup recorded (the only one a narrowing may trust).</summary>
    private static bool IsLastBackupOf(BlockNode node, DirtyBitmap bitmap, DigestManifest manifest)
        => ManifestIndex.Find(node.Path, bitmap.Name!) is { } recorded
           && string.Equals(Path.GetFullPath(recorded), Path.GetFullPath(manifest.Path), StringComparison.Ordinal);

    /// <summary>The manifest clusters that byte ranges touch.</summary>
    private static HierarchicalBitmap ClustersOf(IReadOnlyList<(long Offset, long Length)> ranges, long clusterSize, long clusters)
    {
        var result = new HierarchicalBitmap(clusters);
        foreach ((long offset, long length) in ranges)
        {
            long first = offset / clusterSize;
            long end = Math.Min(clusters, (offset + length + clusterSize - 1) / clusterSize);
            if (end > first)
                result.Set(first, end - first);
        }
        return result;
    }

    /// <summary>The manifest must describe this node at this size, for a bitmap of this granularity.</summary>
    public static void CheckMatches(DigestManifest manifest, BlockNode node, DirtyBitmap bitmap)
    {
        DigestManifestInfo info = manifest.Info;
        string? problem = null;
        if (!string.Equals(info.NodePath, node.Path, StringComparison.Ordinal))
            problem = $"it was made from image '{info.NodePath}', not from '{node.Path}'";
        else if (info.NodeSize != node.Size)
            problem = $"it describes a disk of {info.NodeSize} bytes, but node '{node.Name}' has {node.Size}";
        else if (info.BitmapGranularity != bitmap.Granularity)
            problem = $"it was made for a bitmap of granularity {info.BitmapGranularity}, but bitmap '{bitmap.Name}' has {bitmap.Granularity}";
        if (problem is not null)
            Throw.Block(ErrorIds.DigestManifestMismatch, BlockErrorCategory.InvalidArgument,
                $"Digest manifest '{manifest.Path}' does not belong to bitmap '{bitmap.Name}' of node '{node.Name}': {problem}.", manifest.Path);
    }

    /// <summary>
    /// Scan the node against the manifest and mark every cluster that differs (with <paramref name="whatIf"/>: only
    /// count them). BitmapBusy, BitmapReadOnly, the manifest's errors, ImageIOFailed.
    /// </summary>
    public static BitmapContentUpdateResult Run(BlockNode node, DirtyBitmap bitmap, string? manifestPath, bool whatIf = false,
        Action<long>? progress = null, CancellationToken cancel = default)
    {
        bitmap.Check(BitmapUse.RefuseBusy | BitmapUse.RefuseReadOnly);
        using DigestManifest manifest = OpenManifest(node, bitmap, manifestPath);
        bool wasInconsistent = bitmap.Inconsistent;
        bool narrow = bitmap.Recovered && !wasInconsistent && IsLastBackupOf(node, bitmap, manifest);
        long clusterSize = manifest.Info.ClusterSize;
        var changed = new HierarchicalBitmap(manifest.Info.ClusterCount);
        if (!whatIf)
            bitmap.CreateSuccessor(repair: true); // busy from here; the successor records what is written meanwhile
        HierarchicalBitmap? scanned = null;
        ManifestScanResult scan;
        try
        {
            if (narrow)
            {
                scanned = ClustersOf(bitmap.GetDirtyRanges(), clusterSize, manifest.Info.ClusterCount); // frozen now: writes go to the successor
                scan = ManifestScan.Compare(ManifestScan.Of(node), manifest, scanned.Runs().ToArray(), cluster => changed.Set(cluster, 1), progress, cancel);
            }
            else
            {
                scan = ManifestScan.Compare(ManifestScan.Of(node), manifest, cluster => changed.Set(cluster, 1), progress, cancel);
            }
        }
        catch
        {
            if (!whatIf)
                bitmap.Reclaim(); // as it was, inconsistent included
            throw;
        }
        if (!whatIf)
        {
            if (narrow)
                bitmap.CompleteNarrowing(scanned!, changed, clusterSize);
            else
                bitmap.CompleteScan(changed, clusterSize);
        }
        return new BitmapContentUpdateResult(node.Name, bitmap.Name!, manifest.Path, whatIf, wasInconsistent, clusterSize, scan, narrow);
    }
}
