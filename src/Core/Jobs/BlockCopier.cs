using System.Buffers;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Testing;

namespace BitmapBackup.Core.Jobs;

/*
 * The copy engine of one backup, after QEMU's block-copy and copy-before-write.
 *
 * The copy bitmap (one bit per job cluster) is the only record of what is still to copy. A copy first
 * *claims* a run of set bits: under the lock it clears them and records the run as in flight; then, outside
 * the lock, it reads the source and writes the target; then it *releases* the run: on success the bytes
 * count as done, on failure the bits are set again so the run is retried (or, for an "always" bitmap, merged
 * back). Two kinds of copier claim runs:
 *   - background workers walk the bitmap from a cursor, in chunks of at most MaxChunk bytes;
 *   - copy-before-write: a guest write about to land on [offset, offset+length) first waits until no
 *     in-flight run overlaps its clusters, then claims and copies every set bit among them, and only then
 *     lets the write through.
 * Invariant: a cluster is either set in the bitmap, in flight, or copied; and the source data of a set or
 * in-flight cluster is still the data at the point in time, because every guest write to it waits in
 * BeforeWrite until its old data has been copied. So the target ends up equal to the source at the instant
 * the bitmap was initialised (under the node's write gate), whatever is written meanwhile.
 *
 * Costs: a claim is O(log n) in the bitmap plus the in-flight list (bounded by the worker count plus
 * concurrent guest writes); memory is one pooled buffer per copy in flight.
 */

/// <summary>Which side of a copy failed.</summary>
internal sealed class CopyFailedException(bool sourceSide, BlockException inner)
    : Exception(inner.Message, inner)
{
    public bool SourceSide { get; } = sourceSide;
    public BlockException Error { get; } = inner;
}

/// <summary>How the copier writes what it reads.</summary>
/// <param name="SkipUnallocated">Clusters no image of the source's chain holds are not copied (a new target reads zeros there).</param>
/// <param name="ZeroesAsZeroClusters">Data that reads as zeros is written as zeros (zero clusters), not as data.</param>
/// <param name="Compress">Data is written compressed where the target can.</param>
/// <param name="ZeroFrom">From this offset on the target already reads zeros wherever it is not written (a new target
/// past the end of its backing image): zeros there are not written at all, so a grown disk costs nothing.</param>
/// <param name="Digests">The manifest that gets the digest of every cluster copied, or null.</param>
internal sealed record CopyPolicy(
    bool SkipUnallocated,
    bool ZeroesAsZeroClusters,
    bool Compress,
    long ZeroFrom = long.MaxValue,
    Digests.DigestManifestWriter? Digests = null);

internal sealed class BlockCopier : IWriteInterceptor
{
    public const int MaxChunk = 1 << 20;

    /// <summary>
    /// Every this many bytes written, the target's writeback is started (sync_file_range), so the disk writes while the
    /// copy goes on and the commit's fdatasync waits only for the last of it (as QEMU's target sees its data written
    /// back during the job). 8 MiB: small against a disk's write rate, large against the call's cost.
    /// </summary>
    private const long WritebackEvery = 8L << 20;

    private long _sinceWriteback;

    /// <summary>Runs of a raw source up to this size are read without asking where its holes are (see <see cref="Copy"/>).</summary>
    private const long ProbeFreeRun = 256 * 1024;

    // Fixed at construction.
    private readonly BlockNode _source;
    private readonly IBlockImage _target;
    private readonly CopyPolicy _policy;
    private readonly int _clusterShift;
    private readonly long _size;

    // Protected by _lock.
    private readonly object _lock = new();
    private readonly HierarchicalBitmap _toCopy;
    private readonly List<(long First, long End)> _inFlight = new();
    private long _cursor;
    private long _bytesDone;
    private bool _detached;
    private BlockException? _cbwFailure;

    public BlockCopier(BlockNode source, IBlockImage target, long clusterSize, HierarchicalBitmap toCopy, CopyPolicy policy)
    {
        _source = source;
        _target = target;
        _policy = policy;
        ClusterSize = clusterSize;
        _clusterShift = System.Numerics.BitOperations.Log2((ulong)clusterSize);
        _size = source.Size;
        _toCopy = toCopy;
        long total = toCopy.Count * clusterSize;
        if (toCopy.Length > 0 && toCopy.Get(toCopy.Length - 1))
            total -= toCopy.Length * clusterSize - _size; // the last cluster ends at the node's end
        BytesTotal = total;
    }

    public long ClusterSize { get; }

    /// <summary>Bytes to copy at the start (the last cluster counted to the node's end).</summary>
    public long BytesTotal { get; }

    public long BytesDone { get { lock (_lock) return Math.Min(_bytesDone, BytesTotal); } }

    /// <summary>
    /// Bytes read from the source's files so far, background copies and copy-before-write alike: its data, and what a
    /// backing file supplies. Holes, zero clusters and unallocated clusters of an image without a backing file read as
    /// zeros without touching a disk and are not counted.
    /// </summary>
    public long BytesRead => Interlocked.Read(ref _bytesRead);

    private long _bytesRead;

    /// <summary>Nothing left to copy and nothing in flight.</summary>
    public bool IsDone { get { lock (_lock) return _toCopy.Count == 0 && _inFlight.Count == 0; } }

    /// <summary>The first copy-before-write failure: the point in time is lost and the backup must fail.</summary>
    public BlockException? CopyBeforeWriteFailure { get { lock (_lock) return _cbwFailure; } }

    /// <summary>Copies of the clusters not copied yet (for the "always" bitmap mode on failure).</summary>
    public HierarchicalBitmap Remaining()
    {
        lock (_lock)
        {
            HierarchicalBitmap left = _toCopy.Clone();
            foreach ((long first, long end) in _inFlight)
                left.Set(first, end - first);
            return left;
        }
    }

    /// <summary>Stop copying before writes (the job is ending). Waits for copies in flight.</summary>
    public void Detach()
    {
        lock (_lock)
        {
            _detached = true;
            while (_inFlight.Count > 0)
                Monitor.Wait(_lock);
        }
    }

    #region Background copy

    /// <summary>Claim the next run of at most <paramref name="maxBytes"/>; false when nothing is left to claim now.</summary>
    public bool TryClaim(long maxBytes, out long first, out long count)
    {
        long maxClusters = Math.Max(1, maxBytes >> _clusterShift);
        lock (_lock)
        {
            if (!_toCopy.NextRun(_cursor, long.MaxValue, out first, out count) && !_toCopy.NextRun(0, long.MaxValue, out first, out count))
                return false;
            count = Math.Min(count, maxClusters);
            _toCopy.Reset(first, count);
            _inFlight.Add((first, first + count));
            _cursor = first + count;
            return true;
        }
    }

    /// <summary>Wait until a copy in flight ends or <paramref name="timeout"/> passes (nothing to claim meanwhile).</summary>
    public void WaitForChange(TimeSpan timeout)
    {
        lock (_lock)
        {
            if (_inFlight.Count > 0 && _toCopy.Count == 0)
                Monitor.Wait(_lock, timeout);
        }
    }

    /// <summary>Copy a claimed run and release it. Throws <see cref="CopyFailedException"/>; the run is then unclaimed.</summary>
    /// <returns>The bytes of data read (not zeros or holes): what a rate limit charges.</returns>
    public long CopyClaimed(long first, long count)
    {
        bool ok = false;
        try
        {
            long data = Copy(first, count);
            ok = true;
            return data;
        }
        finally
        {
            Release(first, count, ok);
        }
    }

    /// <summary>Give back a claimed run without copying it (the job was cancelled).</summary>
    public void Unclaim(long first, long count) => Release(first, count, copied: false);

    private void Release(long first, long count, bool copied)
    {
        lock (_lock)
        {
            _inFlight.Remove((first, first + count));
            if (copied)
                _bytesDone += Math.Min(count << _clusterShift, _size - (first << _clusterShift));
            else
                _toCopy.Set(first, count);
            Monitor.PulseAll(_lock);
        }
    }

    #endregion

    #region Copy-before-write

    public void BeforeWrite(BlockNode node, long offset, long length)
    {
        if (length <= 0)
            return;
        long first = offset >> _clusterShift;
        long end = Math.Min(((offset + length - 1) >> _clusterShift) + 1, _toCopy.Length);
        var claimed = new List<(long, long)>();
        lock (_lock)
        {
            if (_detached)
                return;
            while (Overlaps(first, end))
                Monitor.Wait(_lock);
            foreach ((long s, long c) in _toCopy.Runs(first, end))
                claimed.Add((s, c));
            foreach ((long s, long c) in claimed)
            {
                _toCopy.Reset(s, c);
                _inFlight.Add((s, s + c));
            }
        }
        foreach ((long s, long c) in claimed)
        {
            try
            {
                CopyClaimed(s, c);
            }
            catch (CopyFailedException e)
            {
                lock (_lock)
                    _cbwFailure ??= e.Error; // break the snapshot, not the guest write
            }
        }
    }

    private bool Overlaps(long first, long end)
    {
        foreach ((long f, long e) in _inFlight)
        {
            if (f < end && first < e)
                return true;
        }
        return false;
    }

    #endregion

    #region The copy itself

    private long Copy(long first, long count)
    {
        long data = 0;
        long offset = first << _clusterShift;
        long end = Math.Min((first + count) << _clusterShift, _size);
        // The copy is the only read of the source: what it copies is hashed on the way (the point-in-time data).
        Digests.ClusterHasher? hasher = _policy.Digests is { } digests ? new(ClusterSize, _size, digests.Write) : null;
        if (end - offset <= ProbeFreeRun && _source.Image is Formats.Raw.RawImage)
        {
            // A short run of a raw file (the scattered clusters of an incremental): asking the file system where its
            // holes are costs two lseeks, more than reading them. Read it; what reads as zeros is written as zeros,
            // as a hole would be.
            long read = CopyData(offset, end - offset, hasher, zerosAsZeroes: true);
            Interlocked.Add(ref _bytesRead, read); // zeros count as the holes they most likely are: not read from a disk
            return read;
        }
        IReadOnlyList<AllocationExtent> extents;
        try
        {
            extents = _policy.SkipUnallocated ? _source.GetChainAllocation(offset, end - offset) : _source.GetAllocation(offset, end - offset);
        }
        catch (BlockException e)
        {
            throw new CopyFailedException(sourceSide: true, e);
        }
        foreach (AllocationExtent extent in extents)
        {
            switch (extent.State)
            {
                case AllocationState.Unallocated when _policy.SkipUnallocated:
                    DigestZeros(hasher, extent.Offset, extent.Length);
                    break;
                case AllocationState.Zero:
                    WriteZeroes(extent.Offset, extent.Length);
                    DigestZeros(hasher, extent.Offset, extent.Length);
                    break;
                default:
                    CopyData(extent.Offset, extent.Length, hasher);
                    data += extent.Length;
                    if (extent.State == AllocationState.Data || _source.Image.BackingFile is not null)
                        Interlocked.Add(ref _bytesRead, extent.Length);
                    break;
            }
        }
        return data;
    }

    /// <summary>Copy data; returns the bytes that were not zeros written as zeros.</summary>
    private long CopyData(long offset, long length, Digests.ClusterHasher? hasher, bool zerosAsZeroes = false)
    {
        long written = 0;
        // Whole job clusters per write (up to 2 MiB), so that a compressing target sees whole clusters.
        int chunk = (int)Math.Min(length, Math.Max(MaxChunk, ClusterSize));
        byte[] buffer = ArrayPool<byte>.Shared.Rent(chunk);
        try
        {
            for (long done = 0; done < length;)
            {
                int n = (int)Math.Min(length - done, chunk);
                Span<byte> data = buffer.AsSpan(0, n);
                try
                {
                    _source.Read(offset + done, data);
                }
                catch (BlockException e)
                {
                    throw new CopyFailedException(sourceSide: true, e);
                }
                if (hasher is not null)
                    Digest(hasher, offset + done, data);
                bool zeros = (zerosAsZeroes || _policy.ZeroesAsZeroClusters || offset + done + n > _policy.ZeroFrom) && !data.ContainsAnyExcept((byte)0);
                if (zeros)
                {
                    WriteZeroes(offset + done, n);
                }
                else
                {
                    WriteData(offset + done, data);
                    written += n;
                }
                done += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return written;
    }

    /// <summary>
    /// The digest manifest is written beside the target, on the target's file system: its failure (a full disk) is a
    /// failure of the target side, under -OnTargetError like a data write, and the run is copied again.
    /// </summary>
    private static void DigestZeros(Digests.ClusterHasher? hasher, long offset, long length)
    {
        try
        {
            hasher?.Zeros(offset, length);
        }
        catch (BlockException e)
        {
            throw new CopyFailedException(sourceSide: false, e);
        }
    }

    private static void Digest(Digests.ClusterHasher hasher, long offset, ReadOnlySpan<byte> data)
    {
        try
        {
            hasher.Data(offset, data);
        }
        catch (BlockException e)
        {
            throw new CopyFailedException(sourceSide: false, e);
        }
    }

    private void WriteData(long offset, ReadOnlySpan<byte> data)
    {
        try
        {
            FaultInjection.Check(_target.Path, FaultOperation.Write, offset, data.Length);
            if (_policy.Compress && _target is ICompressedWriter compressed)
                compressed.WriteCompressed(offset, data);
            else
                _target.Write(offset, data);
            if (Interlocked.Add(ref _sinceWriteback, data.Length) >= WritebackEvery && Interlocked.Exchange(ref _sinceWriteback, 0) >= WritebackEvery)
                _target.StartWriteback();
        }
        catch (BlockException e)
        {
            throw new CopyFailedException(sourceSide: false, e);
        }
    }

    private void WriteZeroes(long offset, long length)
    {
        length = Math.Min(length, Math.Max(0, _policy.ZeroFrom - offset)); // the target reads zeros past ZeroFrom already
        if (length <= 0)
            return;
        try
        {
            FaultInjection.Check(_target.Path, FaultOperation.Write, offset, length);
            _target.WriteZeroes(offset, length);
        }
        catch (BlockException e)
        {
            throw new CopyFailedException(sourceSide: false, e);
        }
    }

    #endregion
}

/// <summary>A target that can store compressed clusters (qcow2).</summary>
public interface ICompressedWriter
{
    /// <summary>Write whole clusters compressed where that saves space (the last cluster may be partial at the image end).</summary>
    void WriteCompressed(long offset, ReadOnlySpan<byte> data);
}
