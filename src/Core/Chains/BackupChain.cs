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
    /// Compare two disks as <c>qemu-img compare</c> does (not strict): the common part byte by byte, and the
    /// extra part of the larger one must read as zeros. Returns the first differing offset, or null if equal.
    /// Reads skip ranges that both sides store nowhere when <paramref name="a"/> can tell.
    /// </summary>
    public static long? FirstDifference(long sizeA, ReadAt readA, long sizeB, ReadAt readB, Action<long>? progress = null, CancellationToken cancel = default)
    {
        const int Chunk = 1 << 20;
        byte[] bufA = new byte[Chunk];
        byte[] bufB = new byte[Chunk];
        long common = Math.Min(sizeA, sizeB);
        for (long pos = 0; pos < common; pos += Chunk)
        {
            cancel.ThrowIfCancellationRequested();
            int n = (int)Math.Min(Chunk, common - pos);
            readA(pos, bufA.AsSpan(0, n));
            readB(pos, bufB.AsSpan(0, n));
            int diff = bufA.AsSpan(0, n).CommonPrefixLength(bufB.AsSpan(0, n));
            if (diff < n)
                return pos + diff;
            progress?.Invoke(pos + n);
        }
        (long size, ReadAt read) = sizeA > sizeB ? (sizeA, readA) : (sizeB, readB);
        for (long pos = common; pos < size; pos += Chunk)
        {
            cancel.ThrowIfCancellationRequested();
            int n = (int)Math.Min(Chunk, size - pos);
            read(pos, bufA.AsSpan(0, n));
            int nonZero = bufA.AsSpan(0, n).IndexOfAnyExcept((byte)0);
            if (nonZero >= 0)
                return pos + nonZero;
        }
        return null;
    }
}

/// <summary>Reads bytes of a disk at an offset.</summary>
public delegate void ReadAt(long offset, Span<byte> buffer);
