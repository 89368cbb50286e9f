using System.IO.Hashing;

namespace BitmapBackup.Core.Digests;

/*
 * One digest per cluster of a disk, fed in disk order by whoever reads the disk (a backup's copy loop, a scan).
 *
 * The digest is XxHash128 of the cluster's bytes (the last cluster of a disk is as long as the disk leaves it).
 * Non-cryptographic on purpose: a digest only has to tell "this cluster is not what the last backup holds" from
 * accidental change (a guest write, a restore by another tool, dd), at tens of GB/s; nobody gains by forging a
 * collision against their own backup. A cluster that reads as zeros gets the digest 0 (ZeroDigest) without being
 * hashed, so holes cost nothing and a manifest file that is still sparse reads as "all zeros". The chance that a real
 * XxHash128 is 0 is 2^-128.
 *
 * Feeding: Data(offset, bytes) and Zeros(offset, length) in increasing, contiguous offsets from the first cluster's
 * start; every completed cluster is handed to the sink with its index. One hasher per reader (not thread-safe).
 */

/// <summary>Receives the digest of each completed cluster.</summary>
public delegate void ClusterDigestSink(long cluster, UInt128 digest);

/// <summary>Streams bytes of consecutive clusters into one digest per cluster.</summary>
public sealed class ClusterHasher
{
    /// <summary>The digest of a cluster that reads as zeros.</summary>
    public static readonly UInt128 ZeroDigest = UInt128.Zero;

    private static readonly byte[] s_zeros = new byte[64 * 1024];

    private readonly XxHash128 _hash = new();
    private readonly long _clusterSize;
    private readonly long _diskSize;
    private readonly ClusterDigestSink _sink;
    private long _cluster = -1;   // the cluster being fed, or -1 between clusters
    private long _fed;            // bytes of it fed so far
    private long _zerosPending;   // leading zeros not yet given to the hash (a cluster that stays zero is never hashed)

    public ClusterHasher(long clusterSize, long diskSize, ClusterDigestSink sink)
    {
        _clusterSize = clusterSize;
        _diskSize = diskSize;
        _sink = sink;
    }

    /// <summary>The digest of one whole cluster's bytes (the last cluster of a disk: as many bytes as it has).</summary>
    public static UInt128 Of(ReadOnlySpan<byte> cluster)
        => cluster.ContainsAnyExcept((byte)0) ? XxHash128.HashToUInt128(cluster) : ZeroDigest;

    /// <summary>Bytes read from the disk at <paramref name="offset"/>.</summary>
    public void Data(long offset, ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            int n = (int)Math.Min(bytes.Length, Begin(offset));
            ReadOnlySpan<byte> piece = bytes[..n];
            if (_zerosPending >= 0 && !piece.ContainsAnyExcept((byte)0))
            {
                _zerosPending += n; // still all zeros so far
            }
            else
            {
                FlushPendingZeros();
                _hash.Append(piece);
            }
            Advance(n);
            offset += n;
            bytes = bytes[n..];
        }
    }

    /// <summary><paramref name="length"/> bytes that read as zeros at <paramref name="offset"/> (a hole, a zero cluster).</summary>
    public void Zeros(long offset, long length)
    {
        while (length > 0)
        {
            long n = Math.Min(length, Begin(offset));
            if (_zerosPending >= 0)
            {
                _zerosPending += n;
            }
            else
            {
                for (long left = n; left > 0; left -= s_zeros.Length)
                    _hash.Append(s_zeros.AsSpan(0, (int)Math.Min(left, s_zeros.Length)));
            }
            Advance(n);
            offset += n;
            length -= n;
        }
    }

    /// <summary>Start the cluster holding <paramref name="offset"/> if none is open; the bytes left in it.</summary>
    private long Begin(long offset)
    {
        long cluster = offset / _clusterSize;
        if (_cluster < 0)
        {
            if (offset != cluster * _clusterSize)
                throw new ArgumentException($"Hashing must start at a cluster boundary, not at {offset}.", nameof(offset));
            _cluster = cluster;
            _fed = 0;
            _zerosPending = 0;
            _hash.Reset();
        }
        else if (cluster != _cluster || offset != (_cluster * _clusterSize) + _fed)
        {
            throw new ArgumentException($"Bytes at {offset} do not follow the {_fed} bytes fed of cluster {_cluster}.", nameof(offset));
        }
        return ClusterLength(_cluster) - _fed;
    }

    private long ClusterLength(long cluster) => Math.Min(_clusterSize, _diskSize - (cluster * _clusterSize));

    private void FlushPendingZeros()
    {
        for (long left = _zerosPending; left > 0; left -= s_zeros.Length)
            _hash.Append(s_zeros.AsSpan(0, (int)Math.Min(left, s_zeros.Length)));
        _zerosPending = -1; // from now on the cluster holds data
    }

    private void Advance(long n)
    {
        _fed += n;
        if (_fed < ClusterLength(_cluster))
            return;
        UInt128 digest = _zerosPending >= 0 ? ZeroDigest : _hash.GetCurrentHashAsUInt128();
        long done = _cluster;
        _cluster = -1;
        _sink(done, digest);
    }
}
