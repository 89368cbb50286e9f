using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Chains;

/*
 * Flattening: what a backup chain reads as of one of its images, copied into a new standalone qcow2 image (QEMU's
 * qemu-img convert of a chain, or block-stream into an image that then drops its backing file).
 *
 * Only what some layer stores is looked at: the union of the Data extents of the layers from the base up to the
 * image whose point in time is copied, widened to whole clusters of the new image. Everywhere else every layer falls
 * through to the layer below or reads zeros, so the chain reads zeros there, and so does the new image, which has no
 * backing file and allocates nothing there. Within the union the chain is read through the chosen image (so a zero
 * cluster of an upper layer hides the data below it), in pieces of 1 MiB, and only the clusters that hold a non-zero
 * byte are written: zeros stay unallocated. Costs: one read of each stored byte, one write per non-zero cluster, and
 * memory for one piece; the allocation maps cost a walk of each layer's L1/L2 tables.
 */

/// <summary>Copies what a chain reads as of one of its images into a new standalone qcow2 image.</summary>
internal static class ChainFlattener
{
    private const int PieceBytes = 1 << 20;

    /// <summary>
    /// The ranges to copy: the union of the Data extents of <paramref name="layers"/> (base first), clipped to
    /// <paramref name="size"/> and widened to <paramref name="clusterSize"/>, sorted and disjoint.
    /// </summary>
    public static IReadOnlyList<(long Offset, long Length)> Plan(IReadOnlyList<IBlockImage> layers, long size, int clusterSize)
    {
        var data = new List<(long Start, long End)>();
        foreach (IBlockImage layer in layers)
        {
            long limit = Math.Min(size, layer.Size);
            if (limit <= 0)
                continue;
            foreach (AllocationExtent e in layer.GetAllocation(0, limit))
            {
                if (e.State != AllocationState.Data)
                    continue;
                long start = e.Offset / clusterSize * clusterSize;
                long end = Math.Min(size, (e.End + clusterSize - 1) / clusterSize * clusterSize);
                if (end > start)
                    data.Add((start, end));
            }
        }
        data.Sort((a, b) => a.Start.CompareTo(b.Start));
        var merged = new List<(long Offset, long Length)>();
        long runStart = -1, runEnd = -1;
        foreach ((long start, long end) in data)
        {
            if (runStart >= 0 && start <= runEnd)
            {
                runEnd = Math.Max(runEnd, end);
                continue;
            }
            if (runStart >= 0)
                merged.Add((runStart, runEnd - runStart));
            runStart = start;
            runEnd = end;
        }
        if (runStart >= 0)
            merged.Add((runStart, runEnd - runStart));
        return merged;
    }

    /// <summary>
    /// Copy <paramref name="ranges"/> of <paramref name="source"/> (read through its backing chain) into
    /// <paramref name="target"/>, writing only the clusters that hold data. <paramref name="progress"/> gets the bytes
    /// done after each piece; the copy stops with <see cref="OperationCanceledException"/> when cancelled.
    /// </summary>
    public static void Copy(IBlockImage source, Qcow2Image target, IReadOnlyList<(long Offset, long Length)> ranges,
        RateLimiter limiter, CancellationToken cancel, Action<long> progress)
    {
        int clusterSize = target.ClusterSize;
        int pieceBytes = Math.Max(PieceBytes, clusterSize);
        byte[] buffer = new byte[pieceBytes];
        long done = 0;
        foreach ((long offset, long length) in ranges)
        {
            long end = offset + length;
            for (long pos = offset; pos < end; pos += pieceBytes)
            {
                cancel.ThrowIfCancellationRequested();
                int n = (int)Math.Min(pieceBytes, end - pos);
                limiter.Wait(n, cancel);
                cancel.ThrowIfCancellationRequested();
                Span<byte> piece = buffer.AsSpan(0, n);
                source.Read(pos, piece);
                WriteNonZeroClusters(target, pos, piece, clusterSize);
                done += n;
                progress(done);
            }
        }
    }

    /// <summary>Write the runs of clusters of <paramref name="piece"/> (at <paramref name="offset"/>) that are not all zeros.</summary>
    private static void WriteNonZeroClusters(Qcow2Image target, long offset, ReadOnlySpan<byte> piece, int clusterSize)
    {
        int runStart = -1;
        for (int at = 0; at < piece.Length; at += clusterSize)
        {
            int n = Math.Min(clusterSize, piece.Length - at);
            bool data = piece.Slice(at, n).ContainsAnyExcept((byte)0);
            if (data && runStart < 0)
            {
                runStart = at;
            }
            else if (!data && runStart >= 0)
            {
                target.Write(offset + runStart, piece[runStart..at]);
                runStart = -1;
            }
        }
        if (runStart >= 0)
            target.Write(offset + runStart, piece[runStart..]);
    }
}
