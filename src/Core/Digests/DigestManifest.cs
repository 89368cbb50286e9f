using System.Buffers.Binary;
using System.IO.Hashing;
using System.Text;
using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Digests;

/*
 * A digest manifest: what a backup chain holds, one digest per job cluster of the node at the point in time of the
 * chain's latest backup (format: docs/digest-manifest.md). It lives beside that backup as "<backup>.digests".
 *
 * Layout: a 4 KiB header (big-endian fields, like the raw bitmap sidecar; its own XxHash128 in its last 16 bytes, so
 * a damaged header is refused, not trusted), then the digests, 16 bytes per cluster, cluster i at 4096 + 16 i.
 * A digest of 0 means "reads as zeros", so a new manifest starts as a sparse file and a full backup writes only the
 * clusters that hold data. The file's length must be exactly header + 16 × clusters: a torn file is refused.
 *
 * Reading is streamed (a window of digests at a time): memory does not grow with the disk.
 */

/// <summary>What a manifest says about itself: which node, bitmap and backup it belongs to.</summary>
public sealed record DigestManifestInfo(
    string NodePath,
    string BitmapName,
    long BitmapGranularity,
    long NodeSize,
    long ClusterSize,
    string BackupFile,
    DateTimeOffset PointInTime)
{
    /// <summary>Clusters the manifest has a digest for.</summary>
    public long ClusterCount => (NodeSize + ClusterSize - 1) / ClusterSize;
}

/// <summary>A manifest file opened for reading.</summary>
public sealed class DigestManifest : IDisposable
{
    public const string Suffix = ".digests";
    public const int HeaderSize = 4096;
    public const int DigestSize = 16;
    internal const ulong Magic = 0x4242_4447_5354_3031; // "BBDGST01"
    internal const uint Version = 1;
    internal const uint AlgorithmXxHash128 = 1;
    private const int MaxString = 2048;

    private readonly SafeFileHandle _handle;

    private DigestManifest(string path, SafeFileHandle handle, DigestManifestInfo info)
    {
        Path = path;
        _handle = handle;
        Info = info;
    }

    public string Path { get; }

    public DigestManifestInfo Info { get; }

    /// <summary>The manifest that describes the backup image at <paramref name="backupPath"/>.</summary>
    public static string PathFor(string backupPath) => backupPath + Suffix;

    /// <summary>Open and check a manifest: DigestManifestNotFound, ImageCorrupt (damaged or torn), ImageIOFailed.</summary>
    public static DigestManifest Open(string path)
    {
        string full = System.IO.Path.GetFullPath(path);
        SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(full, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new BlockException(ErrorIds.DigestManifestNotFound, BlockErrorCategory.ObjectNotFound,
                $"Digest manifest '{full}' does not exist.", full, e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError, $"Cannot read digest manifest '{full}': {e.Message}", full, e);
        }
        try
        {
            var header = new byte[HeaderSize];
            int n = Read(handle, full, header, 0);
            if (n < HeaderSize)
                Corrupt(full, "it is shorter than its header");
            DigestManifestInfo info = ParseHeader(full, header);
            long expected = HeaderSize + (info.ClusterCount * DigestSize);
            long length = RandomAccess.GetLength(handle);
            if (length != expected)
                Corrupt(full, $"it is {length} bytes long, but its {info.ClusterCount} digests need {expected}: it was not written whole");
            return new DigestManifest(full, handle, info);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Read the digests of clusters [first, first + digests.Length).</summary>
    public void ReadDigests(long first, Span<UInt128> digests)
    {
        if (first < 0 || first + digests.Length > Info.ClusterCount)
            throw new ArgumentOutOfRangeException(nameof(first));
        Span<byte> bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(digests);
        int n = Read(_handle, Path, bytes, HeaderSize + (first * DigestSize));
        if (n < bytes.Length)
            Corrupt(Path, "it ends inside its digests");
        if (BitConverter.IsLittleEndian)
        {
            for (int i = 0; i < digests.Length; i++)
                digests[i] = BinaryPrimitives.ReverseEndianness(digests[i]);
        }
    }

    /// <summary>
    /// Copy the digests of the first <paramref name="clusters"/> clusters (the file's bytes, as they are) into another
    /// manifest file at the same offsets, skipping what is a hole in this one (zeros there already).
    /// </summary>
    internal void CopyDigestsTo(SafeFileHandle target, long clusters)
    {
        long end = HeaderSize + (Math.Min(clusters, Info.ClusterCount) * DigestSize);
        byte[] buffer = System.Buffers.ArrayPool<byte>.Shared.Rent(1 << 20);
        try
        {
            for (long pos = HeaderSize; pos < end;)
            {
                if (!IO.LinuxFile.TryFindData(_handle, pos, end, out long dataStart, out long dataEnd))
                    (dataStart, dataEnd) = (pos, end); // no hole information: copy everything
                if (dataStart >= end)
                    break;
                for (long p = dataStart; p < dataEnd;)
                {
                    int n = Read(_handle, Path, buffer.AsSpan(0, (int)Math.Min(buffer.Length, dataEnd - p)), p);
                    if (n == 0)
                        Corrupt(Path, "it ends inside its digests");
                    RandomAccess.Write(target, buffer.AsSpan(0, n), p);
                    p += n;
                }
                pos = Math.Max(dataEnd, pos + 1);
            }
        }
        finally
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    public void Dispose() => _handle.Dispose();

    #region Header

    internal static byte[] FormatHeader(DigestManifestInfo info)
    {
        var h = new byte[HeaderSize];
        BinaryPrimitives.WriteUInt64BigEndian(h, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), Version);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(12), HeaderSize);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(16), AlgorithmXxHash128);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(20), checked((uint)info.ClusterSize));
        BinaryPrimitives.WriteInt64BigEndian(h.AsSpan(24), info.NodeSize);
        BinaryPrimitives.WriteInt64BigEndian(h.AsSpan(32), info.ClusterCount);
        BinaryPrimitives.WriteInt64BigEndian(h.AsSpan(40), info.BitmapGranularity);
        BinaryPrimitives.WriteInt64BigEndian(h.AsSpan(48), info.PointInTime.ToUnixTimeMilliseconds());
        int pos = 64;
        foreach (string s in new[] { info.NodePath, info.BitmapName, info.BackupFile })
        {
            byte[] bytes = Encoding.UTF8.GetBytes(s);
            if (bytes.Length > MaxString)
                throw new ArgumentException($"'{s}' is too long for a digest manifest header.");
            BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(pos), (ushort)bytes.Length);
            bytes.CopyTo(h.AsSpan(pos + 2));
            pos += 2 + bytes.Length;
        }
        if (pos > HeaderSize - DigestSize)
            throw new ArgumentException("The paths are too long for a digest manifest header.");
        BinaryPrimitives.WriteUInt128BigEndian(h.AsSpan(HeaderSize - DigestSize), XxHash128.HashToUInt128(h.AsSpan(0, HeaderSize - DigestSize)));
        return h;
    }

    private static DigestManifestInfo ParseHeader(string path, ReadOnlySpan<byte> h)
    {
        if (BinaryPrimitives.ReadUInt64BigEndian(h) != Magic)
            Corrupt(path, "it does not start with the digest manifest magic");
        if (BinaryPrimitives.ReadUInt128BigEndian(h[(HeaderSize - DigestSize)..]) != XxHash128.HashToUInt128(h[..(HeaderSize - DigestSize)]))
            Corrupt(path, "its header does not match its checksum");
        uint version = BinaryPrimitives.ReadUInt32BigEndian(h[8..]);
        if (version != Version || BinaryPrimitives.ReadUInt32BigEndian(h[12..]) != HeaderSize)
            Corrupt(path, $"version {version} is not supported");
        if (BinaryPrimitives.ReadUInt32BigEndian(h[16..]) != AlgorithmXxHash128)
            Corrupt(path, "its digest algorithm is not XxHash128");
        long clusterSize = BinaryPrimitives.ReadUInt32BigEndian(h[20..]);
        long nodeSize = BinaryPrimitives.ReadInt64BigEndian(h[24..]);
        long count = BinaryPrimitives.ReadInt64BigEndian(h[32..]);
        long granularity = BinaryPrimitives.ReadInt64BigEndian(h[40..]);
        long pointInTime = BinaryPrimitives.ReadInt64BigEndian(h[48..]);
        if (clusterSize < 512 || (clusterSize & (clusterSize - 1)) != 0 || nodeSize <= 0 || granularity <= 0
            || count != (nodeSize + clusterSize - 1) / clusterSize)
            Corrupt(path, "its sizes do not fit together");
        int pos = 64;
        var strings = new string[3];
        for (int i = 0; i < strings.Length; i++)
        {
            int length = BinaryPrimitives.ReadUInt16BigEndian(h[pos..]);
            if (length > MaxString || pos + 2 + length > HeaderSize - DigestSize)
                Corrupt(path, "a name in its header is cut off");
            strings[i] = Encoding.UTF8.GetString(h.Slice(pos + 2, length));
            pos += 2 + length;
        }
        return new DigestManifestInfo(strings[0], strings[1], granularity, nodeSize, clusterSize, strings[2],
            DateTimeOffset.FromUnixTimeMilliseconds(pointInTime));
    }

    #endregion

    private static int Read(SafeFileHandle handle, string path, Span<byte> buffer, long offset)
    {
        int done = 0;
        try
        {
            while (done < buffer.Length)
            {
                int n = RandomAccess.Read(handle, buffer[done..], offset + done);
                if (n == 0)
                    break;
                done += n;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError, $"Cannot read digest manifest '{path}': {e.Message}", path, e);
        }
        return done;
    }

    internal static void Corrupt(string path, string why)
        => Throw.Block(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData, $"Digest manifest '{path}' is damaged: {why}.", path);
}
