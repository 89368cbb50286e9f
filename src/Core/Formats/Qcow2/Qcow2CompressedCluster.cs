using System.Buffers;
using System.IO.Compression;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Reads a compressed cluster (spec "Compressed Clusters Descriptor"): raw deflate data (no zlib header) starting
/// at an arbitrary byte offset and ending somewhere in its last 512-byte sector; inflating stops once a whole
/// cluster has been produced. Anything else (bad stream, short output, offset past the end of the file) is corruption.
///
/// <para>Also deflates clusters for writing (<see cref="Compress"/>), in a form QEMU reads back.</para>
/// </summary>
internal static class Qcow2CompressedCluster
{
    /// <summary>
    /// The window QEMU inflates with (<c>inflateInit2(&amp;strm, -12)</c> in block/qcow2-threads.c, and it deflates
    /// with the same): no back-reference in a compressed cluster may reach further back than 4 KiB.
    /// </summary>
    public const int QemuWindowBytes = 1 << 12;

    /// <summary>
    /// Deflate <paramref name="cluster"/> into <paramref name="output"/> as raw deflate (RFC 1951, no zlib header),
    /// the "deflate" compression type. Returns the compressed length, or -1 when it would be longer than
    /// <paramref name="limit"/> bytes (the caller then stores the cluster uncompressed, as QEMU does when the
    /// compressed data would not be smaller than a cluster).
    ///
    /// <para>With .NET's native zlib (<see cref="Qcow2NativeDeflate"/>) the cluster is one stream deflated exactly as
    /// QEMU deflates it. Otherwise: System.IO.Compression deflates with a 32 KiB window and cannot be told otherwise,
    /// while QEMU inflates with a 4 KiB one. So the cluster is deflated in 4 KiB pieces, each by a fresh deflater that ends with a sync
    /// flush (an empty stored block, byte aligned) and the last one with the final block: concatenated they are one
    /// valid deflate stream whose back-references never leave their piece, i.e. never reach back 4 KiB. The cost is a
    /// block header per piece and no matches across pieces (a 4 KiB cluster is a single piece: no cost).</para>
    /// </summary>
    public static int Compress(ReadOnlySpan<byte> cluster, byte[] output, int limit)
    {
        if (Qcow2NativeDeflate.Available)
            return Qcow2NativeDeflate.Compress(cluster, output, limit); // one stream, QEMU's window: qemu-img's sizes
        var sink = new FixedSink(output, Math.Min(limit, output.Length));
        for (int pos = 0; pos < cluster.Length; pos += QemuWindowBytes)
        {
            int n = Math.Min(QemuWindowBytes, cluster.Length - pos);
            bool last = pos + n == cluster.Length;
            int end = -1;
            using (var deflater = new DeflateStream(sink, CompressionLevel.Optimal, leaveOpen: true))
            {
                deflater.Write(cluster.Slice(pos, n));
                if (!last)
                {
                    deflater.Flush(); // Z_SYNC_FLUSH: everything so far, byte aligned, stream not finished
                    end = sink.Written;
                    sink.Discarding = true; // the final block Dispose adds belongs to no stream we keep
                }
            }
            if (end >= 0)
            {
                sink.Written = end;
                sink.Discarding = false;
            }
            if (sink.Overflowed)
                return -1;
        }
        return sink.Written;
    }

    /// <summary>A write-only stream into a fixed buffer: writes past its end only set <see cref="Overflowed"/>.</summary>
    private sealed class FixedSink(byte[] target, int capacity) : Stream
    {
        private readonly byte[] _target = target;
        private readonly int _capacity = capacity;

        /// <summary>Bytes kept so far.</summary>
        public int Written { get; set; }

        public bool Overflowed { get; private set; }

        /// <summary>Drop what is written (not an overflow).</summary>
        public bool Discarding { get; set; }

        public override bool CanRead => false;

        public override bool CanSeek => false;

        public override bool CanWrite => true;

        public override long Length => throw new NotSupportedException();

        public override long Position
        {
            get => throw new NotSupportedException();
            set => throw new NotSupportedException();
        }

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (Discarding || Overflowed)
                return;
            if (buffer.Length > _capacity - Written)
            {
                Overflowed = true;
                return;
            }
            buffer.CopyTo(_target.AsSpan(Written));
            Written += buffer.Length;
        }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void WriteByte(byte value) => Write([value]);

        public override void Flush()
        {
        }

        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();
    }

    /// <summary>
    /// Zstd-compress a cluster as QEMU's qcow2_zstd_compress does (one frame, zstd's default level 3). Returns the
    /// compressed length, or -1 when it does not fit in <paramref name="limit"/> bytes.
    /// </summary>
    public static int CompressZstd(ReadOnlySpan<byte> cluster, byte[] output, int limit)
    {
        ZstdSharp.Compressor compressor = t_zstd ??= new ZstdSharp.Compressor(ZstdSharp.Compressor.DefaultCompressionLevel); // a context per thread: creating one costs more than a cluster
        return compressor.TryWrap(cluster, output.AsSpan(0, Math.Min(limit, output.Length)), out int written) ? written : -1;
    }

    [ThreadStatic]
    private static ZstdSharp.Compressor? t_zstd;

    public static void Decompress(Qcow2File file, Qcow2L2Entry entry, int clusterBits, Span<byte> cluster, Qcow2CompressionType type = Qcow2CompressionType.Deflate)
    {
        (long offset, int length) = entry.GetCompressedRange(clusterBits);
        if (offset >= Qcow2Limits.MaxHostOffset || offset >= file.Length)
            Qcow2Errors.Corrupt(file.Path, $"a compressed cluster starts at offset {offset}, past the end of the file ({file.Length} bytes)");
        length = (int)Math.Min(length, file.Length - offset);
        byte[] source = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            file.Read(offset, source.AsSpan(0, length));
            int done = 0;
            // The descriptor gives whole sectors, so the data may be followed by anything: read just one cluster out
            // of a stream (QEMU's qcow2_zstd_decompress streams until the cluster is full for the same reason).
            using (var input = new MemoryStream(source, 0, length, writable: false))
            using (Stream inflater = type == Qcow2CompressionType.Zstd
                ? new ZstdSharp.DecompressionStream(input, bufferSize: length, checkEndOfStream: false)
                : new DeflateStream(input, CompressionMode.Decompress))
            {
                while (done < cluster.Length)
                {
                    int n = inflater.Read(cluster[done..]);
                    if (n == 0)
                        break;
                    done += n;
                }
            }
            if (done < cluster.Length)
                Qcow2Errors.Corrupt(file.Path, $"the compressed cluster at offset {offset} inflates to {done} bytes instead of {cluster.Length}");
        }
        catch (Exception e) when (e is InvalidDataException or ZstdSharp.ZstdException)
        {
            throw Qcow2Errors.CorruptException(file.Path, $"the compressed cluster at offset {offset} is not valid {(type == Qcow2CompressionType.Zstd ? "zstd" : "deflate")} data ({e.Message})", e);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(source);
        }
    }
}
