using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// A qcow2 image (versions 2 and 3) as a format driver, with its backing chain.
///
/// <para><b>Mapping.</b> A guest offset splits into an L1 index, an L2 index and an offset in the cluster
/// (<c>l2_entries = cluster_size / 8</c>). The L1 table is held in memory; L2 tables and refcount blocks go
/// through small write-back caches. Reads walk the chain: a cluster this image does not store comes from the
/// backing image (zeros past the backing image's end, or at the base of the chain).</para>
///
/// <para><b>Writes.</b> A cluster written for the first time (or shared, or compressed, or a zero cluster) gets a
/// new host cluster; a partial write first copies the old contents (copy-on-write from the backing image, the
/// compressed data, or zeros). Write-zeroes of whole clusters sets the v3 zero flag and frees the old host
/// cluster; partial clusters get zero bytes.</para>
///
/// <para><b>Crash safety.</b> Refcounts are exact (no lazy refcounts; the dirty bit stays clear). Metadata is
/// written back in this order at every flush: data clusters and refcount increments, fsync; refcount table
/// entries, fsync; L2 tables, fsync; L1 entries, fsync; then the refcount decrements of clusters that are no
/// longer referenced, fsync. A crash at any point leaves at worst leaked clusters, never a reference to a cluster
/// whose refcount is not on disk, and a freed cluster is not reused before the tables that dropped it are on disk.</para>
///
/// <para><b>Allocation map.</b> <see cref="GetAllocation"/> describes this image only, in the terms of
/// <c>qemu-img map --output=json</c> for the top image: Data where this image stores the cluster (normal or
/// compressed), Zero for zero clusters, Unallocated where reads fall through to the backing image (or read zeros
/// at the base). qemu-img map reports the whole chain: its entries with <c>depth</c> &gt; 0, or
/// <c>present: false</c>, are what this method calls Unallocated.</para>
///
/// <para><b>Threads.</b> One lock serializes all requests on an image; backing images have their own.</para>
///
/// <para><b>Untrusted files.</b> Every table is checked against the file length and QEMU's limits before it is
/// loaded, so memory use is bounded by the file size and the fixed caches; anything inconsistent is a
/// <see cref="Errors.BlockException"/> (<c>ImageCorrupt</c>) that says what is wrong.</para>
/// </summary>
public sealed partial class Qcow2Image : IBlockImage
{
    // Immutable after open.
    private readonly Qcow2File _file;
    private readonly Qcow2Header _header;
    private readonly Qcow2HeaderExtensions _extensions;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _l2Bits;
    private readonly int _l2Entries;
    private IBlockImage? _backing;
    private ImageFormat? _backingFormat;

    // Guarded by _sync.
    private readonly object _sync = new();
    private readonly Qcow2MetadataRegions _regions;
    private readonly Qcow2ClusterCache _l2Cache;
    private readonly Qcow2Refcounts _refcounts;
    private readonly Qcow2Allocator? _allocator; // null when read-only
    private Qcow2L1Table _l1;
    private IReadOnlyList<Qcow2BitmapDirectoryEntry> _bitmaps;
    private long _size;
    private bool _l2WrittenSinceSync;
    private bool _preparedForWrite;
    private bool _disposed;
    private ulong _decompressedEntry;
    private byte[]? _decompressed;
    private byte[]? _zeroCluster;

    private Qcow2Image(Qcow2File file, Qcow2Header header, Qcow2HeaderExtensions extensions, string? backingFile,
        IReadOnlyList<Qcow2BitmapDirectoryEntry> bitmaps, Qcow2MetadataRegions regions, Qcow2L1Table l1,
        Qcow2Refcounts refcounts, Qcow2Allocator? allocator)
    {
        _file = file;
        _header = header;
        _extensions = extensions;
        _clusterBits = (int)header.ClusterBits;
        _clusterSize = 1 << _clusterBits;
        _l2Bits = _clusterBits - 3;
        _l2Entries = 1 << _l2Bits;
        BackingFile = backingFile;
        _bitmaps = bitmaps;
        _bitmapsExtension = bitmaps.Count > 0 ? extensions.Bitmaps : null;
        _regions = regions;
        _l1 = l1;
        _refcounts = refcounts;
        _allocator = allocator;
        _l2Cache = new Qcow2ClusterCache(_clusterSize);
        _size = (long)(header.Size / 512 * 512); // QEMU reads the virtual size in whole sectors (bs->total_sectors)
    }

    #region Properties

    public ImageFormat Format => ImageFormat.Qcow2;

    public string Path => _file.Path;

    public long Size => Volatile.Read(ref _size);

    /// <summary>Same as <see cref="Size"/>: the virtual disk size in bytes.</summary>
    public long VirtualSize => Size;

    public int ClusterSize => _clusterSize;

    /// <summary>Read-only: opened so, or marked corrupt while open (<see cref="MarkCorrupt"/>).</summary>
    public bool ReadOnly => _allocator is null || _markedCorrupt;

    private bool _markedCorrupt;

    /// <summary>The backing file name exactly as recorded in the image (relative names are relative to the image's folder).</summary>
    public string? BackingFile { get; }

    /// <summary>The backing format name recorded in the image (header extension), or null when none is recorded.</summary>
    public string? BackingFormatName => _extensions.BackingFormat;

    /// <summary>The format the backing image was opened as (recorded, or probed when not recorded), or null without backing.</summary>
    public ImageFormat? BackingFormat => _backingFormat;

    /// <summary>The opened backing image (read-only), or null. Lets a caller tell what this image stores from what it inherits.</summary>
    public IBlockImage? BackingImage => _backing;

    /// <summary>Every image below this one, nearest first.</summary>
    public IReadOnlyList<BackingChainEntry> BackingChain
    {
        get
        {
            var entries = new List<BackingChainEntry>();
            for (IBlockImage? below = _backing; below is not null; below = (below as Qcow2Image)?._backing)
                entries.Add(new BackingChainEntry(below.Path, below.Format, below.Size));
            return entries;
        }
    }

    /// <summary>qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).</summary>
    public int Version => (int)_header.Version;

    /// <summary>Incompatible bit 0: refcounts may be stale (lazy refcounts, not closed cleanly).</summary>
    public bool IsDirty => (_header.IncompatibleFeatures & (ulong)Qcow2IncompatibleFeatures.Dirty) != 0;

    /// <summary>Incompatible bit 1: QEMU marked the image corrupt; it opens read-only only.</summary>
    public bool IsCorrupt => (_header.IncompatibleFeatures & (ulong)Qcow2IncompatibleFeatures.Corrupt) != 0;

    public bool LazyRefcounts => (_header.CompatibleFeatures & (ulong)Qcow2CompatibleFeatures.LazyRefcounts) != 0;

    public Qcow2IncompatibleFeatures IncompatibleFeatures => (Qcow2IncompatibleFeatures)_header.IncompatibleFeatures;

    public Qcow2CompatibleFeatures CompatibleFeatures => (Qcow2CompatibleFeatures)_header.CompatibleFeatures;

    public Qcow2AutoclearFeatures AutoclearFeatures => (Qcow2AutoclearFeatures)_header.AutoclearFeatures;

    /// <summary>log2 of the refcount width in bits (0-6).</summary>
    public int RefcountOrder => (int)_header.RefcountOrder;

    /// <summary>Refcount width in bits (1-64).</summary>
    public int RefcountBits => 1 << RefcountOrder;

    public Qcow2CompressionType CompressionType => (Qcow2CompressionType)_header.CompressionType;

    /// <summary>Internal snapshots in the image (their L1 tables are never read).</summary>
    public int SnapshotCount => (int)_header.SnapshotCount;

    /// <summary>
    /// The persistent bitmaps listed in the bitmap directory (only the directory is read). Empty when the image
    /// has no bitmaps extension, or when the extension is marked inconsistent (auto-clear bit 0 clear), as QEMU
    /// then ignores it too.
    /// </summary>
    public IReadOnlyList<Qcow2BitmapDirectoryEntry> Bitmaps
    {
        get
        {
            lock (_sync)
                return _bitmaps;
        }
    }

    #endregion

    /// <summary>True when <paramref name="firstBytes"/> start with the qcow2 magic "QFI\xfb".</summary>
    public static bool IsQcow2(ReadOnlySpan<byte> firstBytes)
        => firstBytes.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(firstBytes) == Qcow2Header.Magic;

    #region Reads

    public void Read(long offset, Span<byte> buffer)
    {
        lock (_sync)
        {
            CheckOpen();
            List<ChainRange>? below = null;
            ReadOwn(offset, buffer, 0, ref below);
            if (below is not null)
                ReadChain(_backing, below, buffer);
        }
    }

    /// <summary>A part of a read that an image leaves to the images below it: guest offset, place in the caller's buffer, length.</summary>
    private readonly record struct ChainRange(long Offset, int BufferIndex, int Length);

    /// <summary>
    /// Read what this image stores in [offset, offset + buffer.Length) into <paramref name="buffer"/> (which sits at
    /// <paramref name="bufferIndex"/> in the caller's buffer), and add what it leaves to its backing image to
    /// <paramref name="below"/>. The caller holds <see cref="_sync"/>.
    /// </summary>
    private void ReadOwn(long offset, Span<byte> buffer, int bufferIndex, ref List<ChainRange>? below)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            long gc = offset >> _clusterBits;
            int inCluster = (int)(offset & (_clusterSize - 1));
            Qcow2L2Entry entry = GetEntry(gc);
            Qcow2ClusterKind kind = Classify(entry, gc);
            int left = buffer.Length - done;
            int n = Math.Min(_clusterSize - inCluster, left);
            if (kind != Qcow2ClusterKind.Compressed)
            {
                // Extend over following clusters of the same kind (data: contiguous in the file too).
                for (long next = gc + 1; n < left; next++)
                {
                    Qcow2L2Entry e = GetEntry(next);
                    if (Classify(e, next) != kind
                        || (kind == Qcow2ClusterKind.Normal && e.HostOffset != entry.HostOffset + ((next - gc) << _clusterBits)))
                        break;
                    n += Math.Min(_clusterSize, left - n);
                }
            }
            Span<byte> part = buffer.Slice(done, n);
            switch (kind)
            {
                case Qcow2ClusterKind.Normal:
                    _file.Read(entry.HostOffset + inCluster, part);
                    break;
                case Qcow2ClusterKind.Zero:
                    part.Clear();
                    break;
                case Qcow2ClusterKind.Compressed:
                    Decompressed(entry).AsSpan(inCluster, n).CopyTo(part);
                    break;
                default:
                    below ??= [];
                    if (below.Count > 0 && below[^1] is var last && last.Offset + last.Length == offset && last.BufferIndex + last.Length == bufferIndex + done)
                        below[^1] = last with { Length = last.Length + n };
                    else
                        below.Add(new ChainRange(offset, bufferIndex + done, n));
                    break;
            }
            offset += n;
            done += n;
        }
    }

    /// <summary>
    /// Fill <paramref name="ranges"/> of <paramref name="buffer"/> from the chain that starts at <paramref name="layer"/>,
    /// one image at a time, down to the base: each image reads what it stores and passes the rest further down; past
    /// an image's end, and below the base, the disk reads as zeros. A loop, not a recursion: chains have no fixed depth.
    /// </summary>
    private static void ReadChain(IBlockImage? layer, List<ChainRange> ranges, Span<byte> buffer)
    {
        while (ranges.Count > 0)
        {
            if (layer is null)
            {
                foreach (ChainRange r in ranges)
                    buffer.Slice(r.BufferIndex, r.Length).Clear();
                return;
            }
            long size = layer.Size;
            List<ChainRange>? next = null;
            var q = layer as Qcow2Image;
            if (q is not null)
                Monitor.Enter(q._sync);
            try
            {
                q?.CheckOpen();
                foreach (ChainRange r in ranges)
                {
                    int inside = (int)Math.Clamp(size - r.Offset, 0, r.Length);
                    Span<byte> part = buffer.Slice(r.BufferIndex, inside);
                    if (inside > 0)
                    {
                        if (q is not null)
                            q.ReadOwn(r.Offset, part, r.BufferIndex, ref next);
                        else
                            layer.Read(r.Offset, part);
                    }
                    buffer.Slice(r.BufferIndex + inside, r.Length - inside).Clear();
                }
            }
            finally
            {
                if (q is not null)
                    Monitor.Exit(q._sync);
            }
            if (next is null)
                return;
            ranges = next;
            layer = q?._backing;
        }
    }

    public IEnumerable<AllocationExtent> GetAllocation(long offset, long length)
    {
        var extents = new List<AllocationExtent>();
        lock (_sync)
        {
            CheckOpen();
            long end = offset + length;
            long pos = offset;
            while (pos < end)
            {
                long gc = pos >> _clusterBits;
                long l1Index = gc >> _l2Bits;
                AllocationState state;
                long runEnd;
                if (l1Index >= _l1.Count || _l1.L2Offset(l1Index) == 0)
                {
                    state = AllocationState.Unallocated;
                    runEnd = (l1Index + 1) << (_l2Bits + _clusterBits);
                }
                else
                {
                    state = Classify(GetEntry(gc), gc) switch
                    {
                        Qcow2ClusterKind.Normal or Qcow2ClusterKind.Compressed => AllocationState.Data,
                        Qcow2ClusterKind.Zero => AllocationState.Zero,
                        _ => AllocationState.Unallocated,
                    };
                    runEnd = (gc + 1) << _clusterBits;
                }
                runEnd = Math.Min(runEnd, end);
                if (extents.Count > 0 && extents[^1].State == state)
                    extents[^1] = extents[^1] with { Length = runEnd - extents[^1].Offset };
                else
                    extents.Add(new AllocationExtent(pos, runEnd - pos, state));
                pos = runEnd;
            }
        }
        return extents;
    }

    /// <summary>Read what the backing chain holds at <paramref name="offset"/>: zeros past its end or without one.</summary>
    private void ReadBacking(long offset, Span<byte> buffer)
        => ReadChain(_backing, [new ChainRange(offset, 0, buffer.Length)], buffer);

    /// <summary>The inflated contents of a compressed cluster (the last one is kept: sequential reads hit it).</summary>
    private byte[] Decompressed(Qcow2L2Entry entry)
    {
        _decompressed ??= new byte[_clusterSize];
        if (_decompressedEntry != entry.Raw)
        {
            _decompressedEntry = 0;
            Qcow2CompressedCluster.Decompress(_file, entry, _clusterBits, _decompressed, CompressionType);
            _decompressedEntry = entry.Raw;
        }
        return _decompressed;
    }

    #endregion

    #region Mapping

    /// <summary>The L2 entry for guest cluster <paramref name="guestCluster"/> (unallocated when its L2 table is).</summary>
    private Qcow2L2Entry GetEntry(long guestCluster)
    {
        long l1Index = guestCluster >> _l2Bits;
        if (l1Index >= _l1.Count)
            return Qcow2L2Entry.Unallocated;
        long l2Offset = _l1.L2Offset(l1Index);
        return l2Offset == 0 ? Qcow2L2Entry.Unallocated : GetL2Entry(l2Offset, (int)(guestCluster & (_l2Entries - 1)));
    }

    private Qcow2L2Entry GetL2Entry(long l2Offset, int index)
        => new(BinaryPrimitives.ReadUInt64BigEndian(LoadL2(l2Offset).Data.AsSpan(index * sizeof(ulong))));

    private void SetL2Entry(long l2Offset, int index, Qcow2L2Entry entry)
    {
        CachedCluster table = LoadL2(l2Offset);
        BinaryPrimitives.WriteUInt64BigEndian(table.Data.AsSpan(index * sizeof(ulong)), entry.Raw);
        table.Dirty = true;
        if (_decompressedEntry != 0 && entry.Raw != _decompressedEntry)
            _decompressedEntry = 0; // the cached compressed cluster may just have been freed
    }

    /// <summary>
    /// The kind of an entry, after checking it can be used, as QEMU 7.2 does before any read or write (where it fails
    /// the I/O with "Image is corrupt", ImageCorrupt here; such an entry never reads as zeros): no zero flag in v2, host
    /// offsets of data and of preallocated zero clusters cluster aligned, data inside the file. Like QEMU, reserved
    /// bits are ignored and data that overlaps metadata is read as it is (writes refuse it: CheckReplaceable, IsExclusive).
    /// </summary>
    private Qcow2ClusterKind Classify(Qcow2L2Entry entry, long guestCluster)
    {
        Qcow2ClusterKind kind = entry.Kind;
        if (kind == Qcow2ClusterKind.Zero && _header.Version < 3)
            Qcow2Errors.Corrupt(Path, $"guest cluster {guestCluster} is a zero cluster, which version 2 images cannot have");
        if (kind is Qcow2ClusterKind.Normal or Qcow2ClusterKind.Zero && entry.HostOffset != 0)
        {
            long host = entry.HostOffset;
            string what = kind == Qcow2ClusterKind.Zero ? "a zero cluster keeps host offset" : "maps to host offset";
            if ((host & (_clusterSize - 1)) != 0)
                Qcow2Errors.Corrupt(Path, $"guest cluster {guestCluster} {what} {host}, which is not cluster aligned");
            if (kind == Qcow2ClusterKind.Normal && host >= EndOffset)
                Qcow2Errors.Corrupt(Path, $"guest cluster {guestCluster} maps to host offset {host}, past the end of the file ({_file.Length} bytes)");
        }
        return kind;
    }

    /// <summary>End of the used part of the file, including clusters allocated but not yet written.</summary>
    private long EndOffset => _allocator?.EndOffset ?? ((_file.Length + _clusterSize - 1) & ~(long)(_clusterSize - 1));

    private CachedCluster LoadL2(long l2Offset)
    {
        if (_l2Cache.TryGet(l2Offset) is { } hit)
            return hit;
        MakeRoomForL2();
        var data = new byte[_clusterSize];
        _file.Read(l2Offset, data);
        return _l2Cache.Add(l2Offset, data, dirty: false);
    }

    /// <summary>Evict the least recently used L2 table if the cache is full; a dirty one is written after the refcounts it needs.</summary>
    private void MakeRoomForL2()
    {
        while (_l2Cache.IsFull && _l2Cache.LeastRecentlyUsed is { } victim)
        {
            if (victim.Dirty)
            {
                _refcounts.Flush();
                _file.Write(victim.Offset, victim.Data);
                _l2WrittenSinceSync = true;
            }
            _l2Cache.Remove(victim.Offset);
        }
    }

    #endregion

    private void CheckOpen() => ObjectDisposedException.ThrowIf(_disposed, this);

    /// <summary>Test hook: see every write and fsync of the image file (<see cref="Qcow2File.Observer"/>).</summary>
    internal void ObserveFile(Action<long, byte[]?>? observer)
    {
        lock (_sync)
            _file.Observer = observer;
    }

    /// <summary>Test hook: hold at most this many L2 tables and refcount blocks, to exercise eviction.</summary>
    internal void LimitCaches(int l2Tables, int refcountBlocks)
    {
        lock (_sync)
        {
            _l2Cache.Capacity = l2Tables;
            _refcounts.Cache.Capacity = refcountBlocks;
        }
    }

    public void Dispose()
    {
        lock (_sync)
        {
            if (_disposed)
                return;
            _disposed = true;
            try
            {
                if (_allocator is not null && !_markedCorrupt)
                {
                    FlushMetadata();
                    _file.SyncNow();
                }
            }
            catch (BlockException)
            {
                // Best effort: whoever needs the image durable calls Flush first and sees its error (a node's close,
                // a backup's commit). A failed write-back here leaves at worst leaked clusters, never a dangling entry.
            }
            finally
            {
                _file.Dispose();
            }
        }
        DisposeBackingChain();
    }

    /// <summary>Close every image below this one, nearest first, in a loop (a chain may be thousands deep).</summary>
    private void DisposeBackingChain()
    {
        IBlockImage? below = Interlocked.Exchange(ref _backing, null);
        while (below is not null)
        {
            IBlockImage? next = below is Qcow2Image q ? Interlocked.Exchange(ref q._backing, null) : null;
            below.Dispose();
            below = next;
        }
    }
}
