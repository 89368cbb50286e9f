using System.Buffers;
using System.Buffers.Binary;
using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Formats.Qcow2;

public sealed partial class Qcow2Image
{
    #region Writes

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        lock (_sync)
        {
            CheckWritable();
            PrepareForWrite();
            try
            {
                WriteCore(offset, data);
            }
            catch (BlockException e) when (e.ErrorId == ErrorIds.ImageCorrupt)
            {
                throw MarkCorrupt(e);
            }
        }
    }

    public void WriteZeroes(long offset, long length)
    {
        lock (_sync)
        {
            CheckWritable();
            PrepareForWrite();
            try
            {
                WriteZeroesCore(offset, length);
            }
            catch (BlockException e) when (e.ErrorId == ErrorIds.ImageCorrupt)
            {
                throw MarkCorrupt(e);
            }
        }
    }

    /// <summary>
    /// Corruption found by a write (QEMU's qcow2_signal_corruption): what earlier, valid writes left in memory is
    /// written back, the header gets the corrupt bit (incompatible bit 1) so that neither QEMU nor this engine writes
    /// the image again until 'qemu-img check -r all' repairs it, and the image turns read-only. The refused write
    /// itself changed nothing (every write path validates before it mutates). Caller holds _sync.
    /// </summary>
    private BlockException MarkCorrupt(BlockException cause)
    {
        if (!_markedCorrupt && _allocator is not null)
        {
            try
            {
                FlushMetadata();
                Span<byte> field = stackalloc byte[sizeof(ulong)];
                ulong features = _header.IncompatibleFeatures | (ulong)Qcow2IncompatibleFeatures.Corrupt;
                BinaryPrimitives.WriteUInt64BigEndian(field, features);
                _file.Write(Qcow2Header.IncompatibleFeaturesOffset, field);
                _file.SyncNow();
                _header.IncompatibleFeatures = features;
            }
            catch (BlockException)
            {
                // the disk fails too: the image is read-only from here on all the same
            }
            _markedCorrupt = true;
        }
        return new BlockException(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData,
            $"{cause.Message} The write was refused and changed nothing; the image is now marked corrupt, as QEMU marks it, and read-only: " +
            "read what can be read (reads of the damaged clusters fail), then repair it with 'qemu-img check -r all'.", cause.Target, cause);
    }

    /// <summary>Start the file's writeback without waiting (a hint; the metadata still goes at <see cref="Flush"/>).</summary>
    public void StartWriteback() => _file.StartWriteback();

    public void Flush()
    {
        lock (_sync)
        {
            CheckOpen();
            if (_allocator is null || _markedCorrupt)
                return; // nothing to write: read-only, or marked corrupt (written back when it was marked)
            FlushMetadata();
            _file.SyncNow();
        }
    }

    /// <summary>
    /// Treat this image as scratch until <see cref="Flush"/>: a backup's '.partial' file, discarded after a crash,
    /// needs no crash order between its metadata stages, only one sync at its commit.
    /// </summary>
    public void DeferOrderingUntilFlush()
    {
        lock (_sync)
            _file.DeferOrdering = true;
    }

    private void WriteCore(long offset, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
        {
            long gc = offset >> _clusterBits;
            int inCluster = (int)(offset & (_clusterSize - 1));
            int n = Math.Min(_clusterSize - inCluster, data.Length);
            WriteCluster(gc, inCluster, data[..n]);
            offset += n;
            data = data[n..];
        }
    }

    private void WriteZeroesCore(long offset, long length)
    {
        long end = offset + length;
        while (offset < end)
        {
            long gc = offset >> _clusterBits;
            long clusterStart = gc << _clusterBits;
            long clusterEnd = Math.Min(clusterStart + _clusterSize, Size);
            long segmentEnd = Math.Min(end, clusterEnd);
            if (offset == clusterStart && segmentEnd == clusterEnd)
                ZeroCluster(gc);
            else if (!ReadsAsZeros(gc, offset))
                WriteCluster(gc, (int)(offset - clusterStart), Zeros().AsSpan(0, (int)(segmentEnd - offset)));
            offset = segmentEnd;
        }
    }

    /// <summary>
    /// Write <paramref name="data"/> into guest cluster <paramref name="gc"/> at <paramref name="inCluster"/>:
    /// in place when this image owns the cluster alone, else into a new cluster holding the old contents
    /// (copy-on-write) with the new bytes on top.
    ///
    /// Validate, then mutate: the old entry is checked and the old contents read before anything is allocated, so
    /// a refusal (ImageCorrupt) changes no byte and no refcount. The new cluster is written before the L2 entry
    /// points at it; if that write fails the cluster is given back at once (nothing on disk references it), so a
    /// failed write leaves no leak.
    /// </summary>
    private void WriteCluster(long gc, int inCluster, ReadOnlySpan<byte> data)
    {
        Qcow2L2Entry entry = GetEntry(gc);
        Qcow2ClusterKind kind = Classify(entry, gc);
        long l2Offset;
        int l2Index = (int)(gc & (_l2Entries - 1));
        if (kind == Qcow2ClusterKind.Normal && IsL2Exclusive(gc >> _l2Bits))
        {
            l2Offset = _l1.L2Offset(gc >> _l2Bits);
            if (IsExclusive(entry, l2Offset, l2Index, gc))
            {
                _file.Write(entry.HostOffset + inCluster, data);
                return;
            }
        }
        CheckReplaceable(entry, kind, gc);

        long clusterStart = gc << _clusterBits;
        int visible = (int)Math.Min(_clusterSize, Size - clusterStart); // bytes of the cluster inside the disk
        bool whole = inCluster == 0 && data.Length == _clusterSize;
        if (!whole && ReadsAsZerosWhole(gc, kind))
        {
            WriteIntoZeroCluster(gc, inCluster, data, entry, kind, l2Index);
            return;
        }
        byte[]? buffer = whole ? null : ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            ReadOnlySpan<byte> contents = data;
            if (buffer is not null)
            {
                Span<byte> cluster = buffer.AsSpan(0, _clusterSize);
                if (inCluster == 0 && data.Length >= visible)
                    cluster.Clear();
                else
                    ReadClusterContents(gc, entry, kind, cluster, visible);
                data.CopyTo(cluster[inCluster..]);
                cluster[Math.Max(visible, inCluster + data.Length)..].Clear(); // past the end of the disk: zeros
                contents = cluster;
            }
            l2Offset = EnsureL2(gc >> _l2Bits);
            long host = _allocator!.AllocateCluster();
            try
            {
                _file.Write(host, contents);
            }
            catch
            {
                _allocator.ReleaseUnreferenced(host, _clusterSize);
                throw;
            }
            SetL2Entry(l2Offset, l2Index, Qcow2L2Entry.ForData(host));
            FreeEntry(entry, kind);
        }
        finally
        {
            if (buffer is not null)
                ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Whether the whole guest cluster reads as zeros now (a zero cluster, or unallocated with nothing below it).</summary>
    private bool ReadsAsZerosWhole(long gc, Qcow2ClusterKind kind)
        => kind == Qcow2ClusterKind.Zero
           || (kind == Qcow2ClusterKind.Unallocated && (_backing is null || (gc << _clusterBits) >= _backing.Size));

    /// <summary>
    /// A partial write into a cluster that reads as zeros (QEMU's handle_alloc_space): only the bytes given are written.
    /// A new host cluster past the end of the file reads as zeros around them already (a hole); one reused inside the
    /// file gets its head and tail zeroed first. Random 4 KiB writes into an empty image so write 4 KiB, not 64.
    /// </summary>
    private void WriteIntoZeroCluster(long gc, int inCluster, ReadOnlySpan<byte> data, Qcow2L2Entry entry, Qcow2ClusterKind kind, int l2Index)
    {
        long l2Offset = EnsureL2(gc >> _l2Bits);
        long host = _allocator!.AllocateCluster();
        try
        {
            if (host < _file.Length)
            {
                _file.Write(host, Zeros().AsSpan(0, inCluster));
                _file.Write(host + inCluster + data.Length, Zeros().AsSpan(0, _clusterSize - inCluster - data.Length));
            }
            _file.Write(host + inCluster, data);
        }
        catch
        {
            _allocator.ReleaseUnreferenced(host, _clusterSize);
            throw;
        }
        SetL2Entry(l2Offset, l2Index, Qcow2L2Entry.ForData(host));
        FreeEntry(entry, kind);
    }

    /// <summary>Whether the L2 table of L1 entry <paramref name="l1Index"/> may be written in place (it exists and only this image uses it).</summary>
    private bool IsL2Exclusive(long l1Index)
    {
        if (l1Index >= _l1.Count || _l1.L2Offset(l1Index) == 0)
            return false;
        return _l1.IsCopied(l1Index) || _refcounts.Get(_l1.L2Offset(l1Index) >> _clusterBits) == 1;
    }

    /// <summary>
    /// Make guest cluster <paramref name="gc"/> read as zeros. v3: the zero flag, old host cluster freed.
    /// v2 has no zero flag: deallocate when nothing shows through from a backing image, else write zeros.
    /// </summary>
    private void ZeroCluster(long gc)
    {
        Qcow2L2Entry entry = GetEntry(gc);
        Qcow2ClusterKind kind = Classify(entry, gc);
        bool backingShows = _backing is not null && (gc << _clusterBits) < _backing.Size;
        Qcow2L2Entry target;
        if (_header.Version >= 3)
        {
            if (kind == Qcow2ClusterKind.Zero && entry.HostOffset == 0)
                return;
            target = Qcow2L2Entry.ZeroPlain;
        }
        else if (!backingShows)
        {
            if (kind == Qcow2ClusterKind.Unallocated)
                return;
            target = Qcow2L2Entry.Unallocated;
        }
        else
        {
            long clusterStart = gc << _clusterBits;
            WriteCluster(gc, 0, Zeros().AsSpan(0, (int)Math.Min(_clusterSize, Size - clusterStart)));
            return;
        }
        CheckReplaceable(entry, kind, gc);
        long l2Offset = EnsureL2(gc >> _l2Bits);
        int l2Index = (int)(gc & (_l2Entries - 1));
        SetL2Entry(l2Offset, l2Index, target);
        FreeEntry(entry, kind);
    }

    /// <summary>True when the cluster already reads as zeros from <paramref name="from"/> on, in this image and below.</summary>
    private bool ReadsAsZeros(long gc, long from)
    {
        Qcow2ClusterKind kind = Classify(GetEntry(gc), gc);
        return kind == Qcow2ClusterKind.Zero
            || (kind == Qcow2ClusterKind.Unallocated && (_backing is null || from >= _backing.Size));
    }

    /// <summary>The current contents of a guest cluster, as it reads now.</summary>
    private void ReadClusterContents(long gc, Qcow2L2Entry entry, Qcow2ClusterKind kind, Span<byte> cluster, int visible)
    {
        switch (kind)
        {
            case Qcow2ClusterKind.Normal:
                _file.Read(entry.HostOffset, cluster);
                break;
            case Qcow2ClusterKind.Compressed:
                Decompressed(entry).CopyTo(cluster);
                break;
            case Qcow2ClusterKind.Zero:
                cluster.Clear();
                break;
            default:
                ReadBacking(gc << _clusterBits, cluster[..visible]);
                cluster[visible..].Clear();
                break;
        }
    }

    /// <summary>
    /// Whether a normal cluster may be written in place: its refcount is 1 (COPIED says so, and the refcount agrees).
    /// A cluster that is also metadata is corruption. A missing COPIED flag with refcount 1 is repaired.
    /// </summary>
    private bool IsExclusive(Qcow2L2Entry entry, long l2Offset, int l2Index, long gc)
    {
        long cluster = entry.HostOffset >> _clusterBits;
        if (_regions.Describe(cluster) is { } what)
            Qcow2Errors.Corrupt(Path, $"guest cluster {gc} maps to host offset {entry.HostOffset}, which holds {what}");
        ulong refcount = _refcounts.Get(cluster);
        if (refcount == 0)
            Qcow2Errors.Corrupt(Path, $"guest cluster {gc} maps to host offset {entry.HostOffset}, whose refcount is 0; run 'qemu-img check -r all'");
        if (refcount > 1)
            return false;
        if (!entry.IsCopied)
            SetL2Entry(l2Offset, l2Index, new Qcow2L2Entry(entry.Raw | Qcow2L2Entry.CopiedFlag));
        return true;
    }

    /// <summary>
    /// Check that the host clusters behind an entry about to be replaced can be released: aligned, inside the file's
    /// addressable range, not metadata, and counted by their refcounts. Called before anything changes, so that a
    /// corrupt entry refuses the write without a byte written (QEMU: "validate, then mutate").
    /// </summary>
    private void CheckReplaceable(Qcow2L2Entry entry, Qcow2ClusterKind kind, long gc)
    {
        if (HostRange(entry, kind) is not (long offset, long length))
            return;
        for (long c = offset >> _clusterBits; c <= (offset + length - 1) >> _clusterBits; c++)
        {
            if (_regions.Describe(c) is { } what)
                Qcow2Errors.Corrupt(Path, $"guest cluster {gc} keeps data at host offset {offset}, which overlaps {what}");
        }
        if (_allocator!.UnreferencedCluster(offset, length) is long bad)
            Qcow2Errors.Corrupt(Path, $"guest cluster {gc} keeps data in cluster {bad} (offset {bad << _clusterBits}), whose refcount is 0; run 'qemu-img check -r all'");
    }

    /// <summary>The host bytes an entry holds (normal, preallocated zero or compressed), or null; throws ImageCorrupt for an impossible one.</summary>
    private (long Offset, long Length)? HostRange(Qcow2L2Entry entry, Qcow2ClusterKind kind)
    {
        switch (kind)
        {
            case Qcow2ClusterKind.Normal:
                return (entry.HostOffset, _clusterSize);
            case Qcow2ClusterKind.Zero when entry.HostOffset != 0:
                if ((entry.HostOffset & (_clusterSize - 1)) != 0)
                    Qcow2Errors.Corrupt(Path, $"a zero cluster keeps host offset {entry.HostOffset}, which is not cluster aligned");
                return (entry.HostOffset, _clusterSize);
            case Qcow2ClusterKind.Compressed:
                (long offset, long length) = entry.GetCompressedSectors(_clusterBits);
                if (offset + length > Qcow2Limits.MaxHostOffset)
                    Qcow2Errors.Corrupt(Path, $"a compressed cluster at offset {offset} is past the largest host offset");
                return (offset, length);
            default:
                return null;
        }
    }

    /// <summary>
    /// Drop this image's reference to the host clusters behind an entry that was just replaced (checked beforehand by
    /// <see cref="CheckReplaceable"/>). Freeing is deferred until the tables that dropped it are on disk.
    /// </summary>
    private void FreeEntry(Qcow2L2Entry entry, Qcow2ClusterKind kind)
    {
        if (HostRange(entry, kind) is (long offset, long length))
            FreeData(offset, length);
    }

    private void FreeData(long offset, long length)
    {
        for (long c = offset >> _clusterBits; c <= (offset + length - 1) >> _clusterBits; c++)
        {
            if (_regions.Describe(c) is { } what)
                Qcow2Errors.Corrupt(Path, $"guest data at host offset {offset} overlaps {what}");
        }
        _allocator!.QueueFree(offset, length);
    }

    /// <summary>
    /// The L2 table for L1 entry <paramref name="l1Index"/>, owned by this image alone: allocated (zeroed) when
    /// missing, copied when shared. The new table is written before the L1 entry (flush order).
    /// </summary>
    private long EnsureL2(long l1Index)
    {
        ulong l1Entry = _l1[l1Index];
        long offset = (long)(l1Entry & Qcow2L2Entry.OffsetMask);
        byte[] contents;
        if (offset == 0)
        {
            contents = new byte[_clusterSize];
        }
        else
        {
            if ((l1Entry & Qcow2L2Entry.CopiedFlag) != 0)
                return offset;
            ulong refcount = _refcounts.Get(offset >> _clusterBits);
            if (refcount == 0)
                Qcow2Errors.Corrupt(Path, $"the L2 table at offset {offset} has refcount 0; run 'qemu-img check -r all'");
            if (refcount == 1)
            {
                _l1.Set(l1Index, l1Entry | Qcow2L2Entry.CopiedFlag);
                return offset;
            }
            contents = (byte[])LoadL2(offset).Data.Clone();
            for (int i = 0; i < _l2Entries; i++)
            {
                Span<byte> e = contents.AsSpan(i * sizeof(ulong), sizeof(ulong));
                BinaryPrimitives.WriteUInt64BigEndian(e, BinaryPrimitives.ReadUInt64BigEndian(e) & ~Qcow2L2Entry.CopiedFlag);
            }
        }
        long host = _allocator!.AllocateCluster();
        MakeRoomForL2();
        _l2Cache.Add(host, contents, dirty: true);
        _regions.AddL2Table(host >> _clusterBits);
        _l1.Set(l1Index, (ulong)host | Qcow2L2Entry.CopiedFlag);
        if (offset != 0)
            _allocator.QueueFree(offset, _clusterSize);
        return host;
    }

    #endregion

    #region Resize

    public void Resize(long newSize)
    {
        lock (_sync)
        {
            CheckWritable();
            if (newSize < 0)
                Throw.Block(ErrorIds.InvalidImageSize, BlockErrorCategory.InvalidArgument, $"Size {newSize} for image '{Path}' is negative.", Path);
            long oldSize = Size;
            if (newSize == oldSize)
                return;
            PrepareForWrite();
            try
            {
                if (newSize > oldSize)
                    Grow(oldSize, newSize);
                else
                    Shrink(newSize);
            }
            catch (BlockException e) when (e.ErrorId == ErrorIds.ImageCorrupt)
            {
                throw MarkCorrupt(e);
            }
        }
    }

    /// <summary>
    /// Grow: a larger L1 table when needed, then zeros where old bytes could show through (the tail of the old
    /// last cluster, and the backing image where it is larger than the old size), then the new size in the header.
    /// </summary>
    private void Grow(long oldSize, long newSize)
    {
        long l1Needed = L1EntriesFor(newSize, _clusterBits);
        if (l1Needed * sizeof(ulong) > Qcow2Limits.MaxL1Bytes)
            Throw.Block(ErrorIds.InvalidImageSize, BlockErrorCategory.InvalidArgument,
                $"Size {newSize} is too large for qcow2 image '{Path}' with {_clusterSize}-byte clusters (the L1 table would exceed {Qcow2Limits.MaxL1Bytes >> 20} MiB).", Path);
        if (l1Needed > _l1.Count)
            GrowL1((int)l1Needed);
        Volatile.Write(ref _size, newSize);
        try
        {
            long tailEnd = Math.Min((oldSize + _clusterSize - 1) & ~(long)(_clusterSize - 1), newSize);
            long lastCluster = oldSize >> _clusterBits;
            if (tailEnd > oldSize && Classify(GetEntry(lastCluster), lastCluster) is Qcow2ClusterKind.Normal or Qcow2ClusterKind.Compressed)
                WriteZeroesCore(oldSize, tailEnd - oldSize);
            if (_backing is not null && _backing.Size > oldSize)
                WriteZeroesCore(oldSize, Math.Min(newSize, _backing.Size) - oldSize);
            FlushMetadata();
            WriteHeaderSize(newSize);
        }
        catch
        {
            Volatile.Write(ref _size, oldSize);
            throw;
        }
    }

    /// <summary>
    /// Shrink: drop every entry past the new end (the caller has checked none holds data it cares about), free the
    /// L2 tables wholly past it, then write the new size. The L1 table keeps its size, as QEMU does.
    /// </summary>
    private void Shrink(long newSize)
    {
        long newClusters = (newSize + _clusterSize - 1) >> _clusterBits;
        long oldClusters = (Size + _clusterSize - 1) >> _clusterBits;
        for (long gc = newClusters; gc < oldClusters;)
        {
            long l1Index = gc >> _l2Bits;
            if (l1Index >= _l1.Count || _l1.L2Offset(l1Index) == 0)
            {
                gc = (l1Index + 1) << _l2Bits;
                continue;
            }
            Qcow2L2Entry old = GetEntry(gc);
            Qcow2ClusterKind kind = Classify(old, gc);
            if (kind != Qcow2ClusterKind.Unallocated)
            {
                CheckReplaceable(old, kind, gc);
                long l2Offset = EnsureL2(l1Index);
                int l2Index = (int)(gc & (_l2Entries - 1));
                Qcow2L2Entry entry = GetL2Entry(l2Offset, l2Index);
                SetL2Entry(l2Offset, l2Index, Qcow2L2Entry.Unallocated);
                FreeEntry(entry, kind);
            }
            gc++;
        }
        for (long l1Index = (newClusters + _l2Entries - 1) >> _l2Bits; l1Index < _l1.Count; l1Index++)
        {
            long l2Offset = _l1.L2Offset(l1Index);
            if (l2Offset == 0)
                continue;
            bool exclusive = _l1.IsCopied(l1Index) || _refcounts.Get(l2Offset >> _clusterBits) == 1;
            _l1.Set(l1Index, 0);
            if (exclusive)
            {
                _l2Cache.Remove(l2Offset); // never written again: nothing on disk will point at it
                _regions.RemoveL2Table(l2Offset >> _clusterBits);
            }
            _allocator!.QueueFree(l2Offset, _clusterSize);
        }
        long oldSize = Size;
        Volatile.Write(ref _size, newSize);
        try
        {
            FlushMetadata();
            WriteHeaderSize(newSize);
        }
        catch
        {
            Volatile.Write(ref _size, oldSize);
            throw;
        }
    }

    /// <summary>
    /// Move the L1 table to a larger one at the end of the file: tables durable; new table written; fsync;
    /// header switched with one 12-byte write (l1_size, l1_table_offset); fsync; old table freed.
    /// </summary>
    private void GrowL1(int newCount)
    {
        FlushMetadata();
        long bytes = (long)newCount * sizeof(ulong);
        long clusters = (bytes + _clusterSize - 1) >> _clusterBits;
        long offset = _allocator!.AllocateContiguous(clusters);
        _refcounts.Flush();
        Qcow2L1Table table = _l1.Resized(offset, newCount);
        _file.Write(offset, table.ToBytes(newCount, (int)(clusters << _clusterBits)));
        _file.Sync();
        Span<byte> fields = stackalloc byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(fields, (uint)newCount);
        BinaryPrimitives.WriteUInt64BigEndian(fields[4..], (ulong)offset);
        _file.Write(Qcow2Header.L1SizeOffset, fields);
        _file.Sync();

        Qcow2L1Table old = _l1;
        long oldClusters = ((long)old.Count * sizeof(ulong) + _clusterSize - 1) >> _clusterBits;
        _l1 = table;
        _header.L1Size = (uint)newCount;
        _header.L1TableOffset = (ulong)offset;
        _regions.SetFixed(Qcow2MetadataRegions.L1Name, offset, bytes);
        if (old.Count > 0)
            _allocator.QueueFree(old.Offset, oldClusters << _clusterBits);
        FlushMetadata();
    }

    private void WriteHeaderSize(long size)
    {
        Span<byte> field = stackalloc byte[sizeof(ulong)];
        BinaryPrimitives.WriteUInt64BigEndian(field, (ulong)size);
        _file.Write(Qcow2Header.SizeOffset, field);
        _file.Sync();
        _header.Size = (ulong)size;
    }

    internal static long L1EntriesFor(long size, int clusterBits)
    {
        long clusters = (size + (1L << clusterBits) - 1) >> clusterBits;
        long perTable = 1L << (clusterBits - 3);
        return (clusters + perTable - 1) / perTable;
    }

    #endregion

    #region Metadata write-back

    /// <summary>
    /// Write back all cached metadata in crash-safe order (see the type's remarks): refcounts (blocks, then table
    /// entries), L2 tables, L1 entries, each followed by an fsync; then the deferred refcount decrements.
    /// </summary>
    private void FlushMetadata()
    {
        if (_allocator is null)
            return;
        _refcounts.Flush();
        foreach (CachedCluster table in _l2Cache.Entries)
        {
            if (!table.Dirty)
                continue;
            _file.Write(table.Offset, table.Data);
            table.Dirty = false;
            _l2WrittenSinceSync = true;
        }
        if (_l2WrittenSinceSync)
        {
            _file.Sync();
            _l2WrittenSinceSync = false;
        }
        if (_l1.IsDirty)
        {
            _l1.WriteDirty(_file);
            _file.Sync();
        }
        if (_allocator.HasPendingFrees)
        {
            _allocator.ApplyFrees();
            _refcounts.Flush();
        }
    }

    /// <summary>
    /// Before the first change (and again after <see cref="Qcow2BitmapStore.Store"/> cleared in_use flags): every
    /// persistent bitmap not yet marked in_use is marked now, in place (QEMU then loads it as inconsistent, exactly
    /// as after a crash), and the auto-clear bits we do not maintain are cleared, as the spec requires of a
    /// writer. Durable before any data is written. When the engine opened the image with its
    /// <see cref="Qcow2BitmapStore"/>, the store has already marked every bitmap in use and only the auto-clear
    /// bits are left to do; the marking here is the safety net for every other writer (direct driver use).
    /// </summary>
    private void PrepareForWrite()
    {
        if (_preparedForWrite)
            return;
        bool changed = false;
        var bitmaps = new List<Qcow2BitmapDirectoryEntry>(_bitmaps.Count);
        Span<byte> field = stackalloc byte[sizeof(uint)];
        foreach (Qcow2BitmapDirectoryEntry bitmap in _bitmaps)
        {
            if (bitmap.InUse)
            {
                bitmaps.Add(bitmap);
                continue;
            }
            uint flags = bitmap.Flags | Qcow2BitmapDirectoryEntry.InUseFlag;
            BinaryPrimitives.WriteUInt32BigEndian(field, flags);
            _file.Write(bitmap.EntryOffset + Qcow2BitmapDirectoryEntry.FlagsOffset, field);
            bitmaps.Add(bitmap with { Flags = flags });
            changed = true;
        }
        _bitmaps = bitmaps;
        ulong keep = _header.AutoclearFeatures & (ulong)Qcow2AutoclearFeatures.Bitmaps;
        if (_header.Version >= 3 && _header.AutoclearFeatures != keep)
        {
            Span<byte> autoclear = stackalloc byte[sizeof(ulong)];
            BinaryPrimitives.WriteUInt64BigEndian(autoclear, keep);
            _file.Write(Qcow2Header.AutoclearFeaturesOffset, autoclear);
            _header.AutoclearFeatures = keep;
            changed = true;
        }
        if (changed)
            _file.Sync();
        _preparedForWrite = true;
    }

    private void CheckWritable()
    {
        CheckOpen();
        if (_markedCorrupt)
            Qcow2Errors.Corrupt(Path, "it was marked corrupt when a write found damaged metadata, and is read-only since; repair it with 'qemu-img check -r all'");
        if (_allocator is null)
            Qcow2Errors.ReadOnly(Path);
    }

    private byte[] Zeros() => _zeroCluster ??= new byte[_clusterSize];

    #endregion
}
