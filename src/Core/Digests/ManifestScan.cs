using System.Diagnostics;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Digests;

/*
 * Compare a disk with a manifest, cluster by cluster, in disk order: a window of clusters at a time (split among the
 * cores), its allocation first (holes and zero clusters are "zeros" without a read), its data read in large pieces and
 * hashed (ClusterHasher), its digests read from the manifest, and each cluster whose digest differs reported. Memory
 * is one read buffer per core and one window of digests (256 MiB of disk: 64 KiB of digests), whatever the disk's
 * size; the disk is read once. A scan may be limited to runs of clusters (a recovered bitmap's marked ones): only
 * those are read and compared.
 */

/// <summary>What a scan did.</summary>
public sealed record ManifestScanResult(long Clusters, long ClustersDiffering, long BytesRead, TimeSpan Duration)
{
    /// <summary>Data read per second (holes are not read).</summary>
    public double BytesPerSecond => Duration.TotalSeconds > 0 ? BytesRead / Duration.TotalSeconds : 0;
}

/// <summary>A disk as a scan reads it: its allocation and its bytes.</summary>
public sealed record ScanSource(long Size, Func<long, long, IEnumerable<AllocationExtent>> Allocation, ReadSpan Read);

/// <summary>Reads bytes of a disk at an offset.</summary>
public delegate void ReadSpan(long offset, Span<byte> buffer);

public static class ManifestScan
{
    private const int ReadChunk = 4 << 20;

    /// <summary>The node as it reads now: allocation through its backing chain.</summary>
    public static ScanSource Of(BlockNode node) => new(node.Size, (o, l) => node.GetChainAllocation(o, l), node.Read);

    /// <summary>An image (a backup chain's top, say) with its chain.</summary>
    public static ScanSource Of(IBlockImage image) => new(image.Size, (o, l) => ChainAllocation.Of(image, o, l), image.Read);

    /// <summary>
    /// Hash every cluster of <paramref name="source"/> and compare it with <paramref name="manifest"/>;
    /// <paramref name="differs"/> gets each cluster that differs, in order. <paramref name="progress"/> gets the bytes
    /// scanned. Each window of clusters is split among the cores (reading and hashing overlap that way, so the scan
    /// runs at about the speed of a plain read).
    /// </summary>
    public static ManifestScanResult Compare(ScanSource source, DigestManifest manifest, Action<long> differs,
        Action<long>? progress = null, CancellationToken cancel = default)
        => Compare(source, manifest, [(0, manifest.Info.ClusterCount)], differs, progress, cancel);

    /// <summary>
    /// Compare only the clusters of <paramref name="runs"/> (first cluster, count; in order, not overlapping). The
    /// result counts the clusters compared; <paramref name="progress"/> gets the bytes compared so far.
    /// </summary>
    public static ManifestScanResult Compare(ScanSource source, DigestManifest manifest, IReadOnlyList<(long First, long Count)> runs, Action<long> differs,
        Action<long>? progress = null, CancellationToken cancel = default)
    {
        var clock = Stopwatch.StartNew();
        long clusterSize = manifest.Info.ClusterSize;
        long size = source.Size;
        long clusters = manifest.Info.ClusterCount;
        long compared = 0;
        int window = (int)Math.Max(64, (256L << 20) / clusterSize); // 256 MiB of disk
        int parts = Math.Clamp(Environment.ProcessorCount, 1, 4);
        var expected = new UInt128[window];
        var actual = new UInt128[window];
        long differing = 0, bytesRead = 0;
        byte[][] buffers = Enumerable.Range(0, parts).Select(_ => System.Buffers.ArrayPool<byte>.Shared.Rent(ReadChunk)).ToArray();
        void CompareWindow(long windowStart, int count)
        {
            cancel.ThrowIfCancellationRequested();
            int per = (count + parts - 1) / parts;
            Parallel.For(0, parts, new ParallelOptions { MaxDegreeOfParallelism = parts, CancellationToken = cancel }, part =>
            {
                long from = windowStart + ((long)part * per);
                long to = Math.Min(windowStart + count, from + per);
                if (from >= to)
                    return;
                long read = HashRange(source, clusterSize, from, to, actual.AsSpan((int)(from - windowStart)), buffers[part]);
                Interlocked.Add(ref bytesRead, read);
            });
            manifest.ReadDigests(windowStart, expected.AsSpan(0, count));
            for (int i = 0; i < count; i++)
            {
                if (actual[i] != expected[i])
                {
                    differing++;
                    differs(windowStart + i);
                }
            }
            compared += count;
            progress?.Invoke(Math.Min(compared * clusterSize, size));
        }

        try
        {
            foreach ((long runFirst, long runCount) in runs)
            {
                long runEnd = Math.Min(runFirst + runCount, clusters);
                for (long windowStart = runFirst; windowStart < runEnd; windowStart += window)
                    CompareWindow(windowStart, (int)Math.Min(window, runEnd - windowStart));
            }
        }
        catch (AggregateException e) when (e.InnerExceptions.Count == 1)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(e.InnerExceptions[0]);
            throw;
        }
        finally
        {
            foreach (byte[] b in buffers)
                System.Buffers.ArrayPool<byte>.Shared.Return(b);
        }
        return new ManifestScanResult(compared, differing, bytesRead, clock.Elapsed);
    }

    /// <summary>Digests of clusters [from, to) into <paramref name="digests"/>; returns the bytes read (holes are not).</summary>
    private static long HashRange(ScanSource source, long clusterSize, long from, long to, Span<UInt128> digests, byte[] buffer)
    {
        long size = source.Size;
        long start = from * clusterSize;
        long end = Math.Min(to * clusterSize, size);
        UInt128[] results = new UInt128[to - from];
        var hasher = new ClusterHasher(clusterSize, size, (cluster, digest) => results[cluster - from] = digest);
        long bytesRead = 0;
        foreach (AllocationExtent e in source.Allocation(start, end - start))
        {
            if (e.State != AllocationState.Data)
            {
                hasher.Zeros(e.Offset, e.Length);
                continue;
            }
            for (long pos = e.Offset; pos < e.End;)
            {
                Span<byte> chunk = buffer.AsSpan(0, (int)Math.Min(ReadChunk, e.End - pos));
                source.Read(pos, chunk);
                hasher.Data(pos, chunk);
                bytesRead += chunk.Length;
                pos += chunk.Length;
            }
        }
        results.CopyTo(digests);
        return bytesRead;
    }
}
