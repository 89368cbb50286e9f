using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Chains;

/// <summary>Reading a backup chain as a whole: its images, and its content compared with another disk.</summary>
public static class BackupChain
{
    /// <summary>Every image from the base (depth 0) to the top, with what each stores itself.</summary>
    public static IReadOnlyList<ChainImage> Describe(IBlockImage top)
    {
        var layers = new List<IBlockImage>();
        for (IBlockImage? image = top; image is not null; image = (image as Qcow2Image)?.BackingImage)
            layers.Add(image);
        layers.Reverse();
        var result = new List<ChainImage>(layers.Count);
        for (int depth = 0; depth < layers.Count; depth++)
        {
            IBlockImage image = layers[depth];
            long data = 0, zero = 0;
            if (image.Size > 0)
            {
                foreach (AllocationExtent e in image.GetAllocation(0, image.Size))
                {
                    if (e.State == AllocationState.Data)
                        data += e.Length;
                    else if (e.State == AllocationState.Zero)
                        zero += e.Length;
                }
            }
            result.Add(new ChainImage(depth, image.Path, image.Format, image.Size, image.ClusterSize, image.BackingFile, data, zero, new FileInfo(image.Path).Length));
        }
        return result;
    }

    /// <summary>
    /// The first offset where two disks read differently, or null when they read the same (as qemu-img compare
    /// without -s: the extra part of the larger one must read as zeros). Ranges that both disks report as zeros (holes,
    /// zero clusters, unallocated through the whole chain) are compared without a read, so a sparse 1 TiB disk costs
    /// what its data costs; elsewhere both are read in 1 MiB pieces (a side that reads as zeros there is not read).
    /// </summary>
    public static long? FirstDifference(Digests.ScanSource a, Digests.ScanSource b, Action<long>? progress = null, CancellationToken cancel = default)
    {
        const int Chunk = 1 << 20;
        const long Window = 1L << 30;
        byte[] bufA = new byte[Chunk];
        byte[] bufB = new byte[Chunk];
        long end = Math.Max(a.Size, b.Size);
        for (long window = 0; window < end; window += Window)
        {
            long windowEnd = Math.Min(end, window + Window);
            List<(long Start, long End, bool Zero)> zerosA = ZeroMap(a, window, windowEnd);
            List<(long Start, long End, bool Zero)> zerosB = ZeroMap(b, window, windowEnd);
            int ia = 0, ib = 0;
            for (long pos = window; pos < windowEnd;)
            {
                while (zerosA[ia].End <= pos)
                    ia++;
                while (zerosB[ib].End <= pos)
                    ib++;
                long segmentEnd = Math.Min(zerosA[ia].End, zerosB[ib].End);
                bool zeroA = zerosA[ia].Zero, zeroB = zerosB[ib].Zero;
                for (long p = pos; p < segmentEnd && !(zeroA && zeroB); p += Chunk)
                {
                    cancel.ThrowIfCancellationRequested();
                    int n = (int)Math.Min(Chunk, segmentEnd - p);
                    Span<byte> sa = bufA.AsSpan(0, n), sb = bufB.AsSpan(0, n);
                    if (zeroA) sa.Clear(); else a.Read(p, sa);
                    if (zeroB) sb.Clear(); else b.Read(p, sb);
                    int diff = sa.CommonPrefixLength(sb);
                    if (diff < n)
                        return p + diff;
                }
                pos = segmentEnd;
                progress?.Invoke(pos);
            }
        }
        return null;
    }

    /// <summary>[start, end) of a disk as runs that read as zeros or may not; past its size it reads as zeros.</summary>
    private static List<(long Start, long End, bool Zero)> ZeroMap(Digests.ScanSource disk, long start, long end)
    {
        var runs = new List<(long Start, long End, bool Zero)>();
        void Add(long s, long e, bool zero)
        {
            if (e <= s)
                return;
            if (runs.Count > 0 && runs[^1].Zero == zero && runs[^1].End == s)
                runs[^1] = (runs[^1].Start, e, zero);
            else
                runs.Add((s, e, zero));
        }
        long inside = Math.Min(end, disk.Size);
        if (inside > start)
        {
            foreach (AllocationExtent e in disk.Allocation(start, inside - start))
                Add(e.Offset, e.End, e.State != AllocationState.Data);
        }
        Add(Math.Max(start, disk.Size), end, zero: true);
        return runs;
    }
}
