using System.Buffers;
using System.IO.Compression;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Reads a compressed cluster (spec "Compressed Clusters Descriptor"): raw deflate data (no zlib header) starting
/// at an arbitrary byte offset and ending somewhere in its last 512-byte sector; inflating stops once a whole
/// cluster has been produced. Anything else (bad stream, short output, offset past the end of the file) is corruption.
/// </summary>
internal static class Qcow2CompressedCluster
{
    public static void Decompress(Qcow2File file, Qcow2L2Entry entry, int clusterBits, Span<byte> cluster)
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
            using (var input = new MemoryStream(source, 0, length, writable: false))
            using (var inflater = new DeflateStream(input, CompressionMode.Decompress))
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
        catch (InvalidDataException e)
        {
            throw Qcow2Errors.CorruptException(file.Path, $"the compressed cluster at offset {offset} is not valid deflate data ({e.Message})", e);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(source);
        }
    }
}
