using System.Buffers;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Compressed cluster writes (QEMU's <c>compress: true</c>, qcow2_co_pwritev_compressed).
///
/// <para>Only whole clusters are compressed: a cluster fully covered by the write, or the last cluster of the
/// disk when the write runs to the disk's end (its tail past the end is compressed as zeros, as QEMU pads it).
/// Anything else, and a cluster whose deflated form would not be smaller than a cluster, is written as a normal
/// cluster. The data is raw deflate (compression type 0) that QEMU inflates with its 4 KiB window
/// (<see cref="Qcow2CompressedCluster.Compress"/>), or one zstd frame (compression type 1,
/// <see cref="Qcow2CompressedCluster.CompressZstd"/>), as the image's header says.</para>
///
/// <para>Placement follows QEMU's qcow2_alloc_bytes (<see cref="Qcow2Allocator.AllocateBytes"/>): compressed
/// clusters are packed one after another at byte granularity; the descriptor records the offset and the 512-byte
/// sectors touched; COPIED is never set; each host cluster's refcount counts the compressed clusters touching it.</para>
///
/// <para>QEMU refuses to compress over an allocated cluster; here the cluster gets new space and its old host
/// space is released, in the driver's crash order: data written, refcount increments flushed, L2, L1, and only
/// then the decrements of the old space.</para>
/// </summary>
public sealed partial class Qcow2Image : ICompressedWriter
{
    public void WriteCompressed(long offset, ReadOnlySpan<byte> data)
    {
        lock (_sync)
        {
            CheckWritable();
            if (CompressionType is not (Qcow2CompressionType.Deflate or Qcow2CompressionType.Zstd))
                Qcow2Errors.Unsupported(Path, $"compressed writes with compression type {CompressionType}");
            if ((_header.IncompatibleFeatures & (ulong)(Qcow2IncompatibleFeatures.ExtendedL2 | Qcow2IncompatibleFeatures.ExternalDataFile)) != 0)
                Qcow2Errors.Unsupported(Path, "compressed writes with extended L2 entries or an external data file");
            if (offset < 0 || offset > Size - data.Length)
                Throw.OffsetOutOfRange(Path, offset, data.Length, Size);
            PrepareForWrite();
        }
        byte[]? padded = null, output = null;
        try
        {
            while (!data.IsEmpty)
            {
                long gc = offset >> _clusterBits;
                int inCluster = (int)(offset & (_clusterSize - 1));
                int n = Math.Min(_clusterSize - inCluster, data.Length);
                ReadOnlySpan<byte> piece = data[..n];
                // Deflate outside the lock (it is the slow part), so that parallel copies compress in parallel.
                int length = -1;
                if (inCluster == 0 && (n == _clusterSize || offset + n == Size))
                {
                    output ??= ArrayPool<byte>.Shared.Rent(_clusterSize);
                    length = Deflate(piece, output, ref padded);
                }
                lock (_sync)
                {
                    CheckWritable();
                    bool whole = inCluster == 0 && (n == _clusterSize || offset + n == Size); // unless resized meanwhile
                    try
                    {
                        if (!whole || length < 0 || !TryWriteCompressedCluster(gc, output.AsSpan(0, length)))
                            WriteCluster(gc, inCluster, piece);
                    }
                    catch (BlockException e) when (e.ErrorId == ErrorIds.ImageCorrupt)
                    {
                        throw MarkCorrupt(e);
                    }
                }
                offset += n;
                data = data[n..];
            }
        }
        finally
        {
            if (padded is not null)
                ArrayPool<byte>.Shared.Return(padded);
            if (output is not null)
                ArrayPool<byte>.Shared.Return(output);
        }
    }

    /// <summary>
    /// Deflate one guest cluster (a partial last cluster padded with zeros, as QEMU pads it) into
    /// <paramref name="output"/>; -1 when the result would not be smaller than a cluster (QEMU's limit).
    /// </summary>
    private int Deflate(ReadOnlySpan<byte> data, byte[] output, ref byte[]? padded)
    {
        ReadOnlySpan<byte> input = data;
        if (data.Length < _clusterSize)
        {
            padded ??= ArrayPool<byte>.Shared.Rent(_clusterSize);
            data.CopyTo(padded);
            padded.AsSpan(data.Length, _clusterSize - data.Length).Clear();
            input = padded.AsSpan(0, _clusterSize);
        }
        return CompressionType == Qcow2CompressionType.Zstd
            ? Qcow2CompressedCluster.CompressZstd(input, output, _clusterSize - 1)
            : Qcow2CompressedCluster.Compress(input, output, _clusterSize - 1);
    }

    /// <summary>
    /// Store one guest cluster as the deflated <paramref name="compressed"/>, or return false (nothing changed) when
    /// the file has grown past what a compressed descriptor can address.
    /// </summary>
    private bool TryWriteCompressedCluster(long gc, ReadOnlySpan<byte> compressed)
    {
        // Compressed descriptors hold smaller offsets than standard ones (49 bits with 2 MiB clusters). Data may land
        // anywhere up to the end of the file plus the clusters this write allocates (data, L2 table, refcount block).
        long limit = Math.Min(1L << Qcow2L2Entry.CompressedOffsetBits(_clusterBits), Qcow2Limits.MaxHostOffset);
        if (_allocator!.EndOffset > limit - (4L * _clusterSize))
            return false;

        Qcow2L2Entry entry = GetEntry(gc);
        Qcow2ClusterKind kind = Classify(entry, gc);
        CheckReplaceable(entry, kind, gc); // validate, then mutate (see WriteCluster)
        long l2Offset = EnsureL2(gc >> _l2Bits);
        int l2Index = (int)(gc & (_l2Entries - 1));
        long host = _allocator.AllocateBytes(compressed.Length);
        try
        {
            _file.Write(host, compressed);
        }
        catch
        {
            _allocator.ReleaseUnreferenced(host, compressed.Length);
            throw;
        }
        _decompressedEntry = 0; // the new descriptor may equal a cached one whose space was freed and reused
        SetL2Entry(l2Offset, l2Index, Qcow2L2Entry.ForCompressed(host, compressed.Length, _clusterBits));
        FreeEntry(entry, kind);
        return true;
    }
}
