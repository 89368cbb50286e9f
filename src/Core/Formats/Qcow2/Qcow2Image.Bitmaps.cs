using System.Buffers.Binary;
using System.Numerics;
using System.Text;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup.Core.Formats.Qcow2;

/*
 * Persistent bitmaps in the bitmaps extension, as QEMU keeps them (block/qcow2-bitmap.c), for Qcow2BitmapStore.
 *
 * Layout written:
 *   - each bitmap has a bitmap table of exactly ceil(ceil(ceil(size / granularity) / 8) / cluster_size) entries
 *     (QEMU refuses to load a consistent bitmap whose table has any other size); a cluster of bitmap data that is
 *     all zeros is entry 0 and takes no space, any other gets a data cluster, as QEMU's store_bitmap_data does;
 *   - a bitmap recorded in use before its bits were ever stored (made persistent since the last store) gets a
 *     table of that size with every entry 0: QEMU's check_dir_entry needs a non-empty table at a real offset for
 *     every entry, in use or not, and qemu-img check counts its cluster;
 *   - an inconsistent bitmap keeps its directory entry and table as found (QEMU leaves them alone too), so
 *     qemu-img bitmap --remove can still drop it and free its clusters;
 *   - the directory lists the bitmaps in the order given (the engine's creation order: loaded ones first).
 *
 * Every change is copy-on-write: new data clusters, tables and directory are written to newly allocated clusters
 * and made durable with their refcounts; then the bitmaps header extension is switched (one write of its 24-byte
 * payload, or a new record written behind the end record before the end record becomes its header) and the
 * auto-clear bit set; then the clusters of the old directory and of tables no longer listed are freed. A crash at
 * any point leaves the old or the new directory, and at worst leaked clusters.
 */
public sealed partial class Qcow2Image
{
    private Qcow2BitmapStore? _bitmapStore;
    private Qcow2BitmapsExtension? _bitmapsExtension; // the extension in effect (auto-clear bit set), or null

    /// <summary>The store that keeps persistent bitmaps in this image's bitmaps extension.</summary>
    public Qcow2BitmapStore BitmapStore
    {
        get
        {
            if (_bitmapStore is null)
                Interlocked.CompareExchange(ref _bitmapStore, new Qcow2BitmapStore(this), null);
            return _bitmapStore;
        }
    }

    private const uint KnownBitmapFlags = Qcow2BitmapDirectoryEntry.InUseFlag | Qcow2BitmapDirectoryEntry.AutoFlag;

    #region Load

    /// <summary>Every bitmap of the directory with its bits (none for in-use ones), after checking all of it.</summary>
    internal IReadOnlyList<StoredBitmap> LoadStoredBitmaps()
    {
        lock (_sync)
        {
            CheckOpen();
            if (_bitmapsExtension is null)
                return [];
            List<Qcow2BitmapDirectoryEntry> entries = ReadBitmapDirectoryChecked();
            var claimed = new HashSet<long>();
            var result = new List<StoredBitmap>(entries.Count);
            foreach (Qcow2BitmapDirectoryEntry e in entries)
            {
                CheckBitmapEntry(e);
                ClaimBitmapTable(e, claimed);
                HierarchicalBitmap? bits = e.InUse ? null : LoadBitmapBits(e, claimed);
                result.Add(new StoredBitmap(e.Name, 1L << e.GranularityBits, e.InUse, e.Auto, bits));
            }
            return result;
        }
    }

    /// <summary>The directory as it is in the file, with QEMU's checks of bitmap_list_load.</summary>
    private List<Qcow2BitmapDirectoryEntry> ReadBitmapDirectoryChecked()
    {
        Qcow2BitmapsExtension ext = _bitmapsExtension!;
        if (ext.Reserved != 0)
            Qcow2Errors.Corrupt(Path, $"the reserved field of the bitmaps extension is {ext.Reserved}, not 0");
        // Count, size, alignment, place in the file and overlap were checked when the image was opened (or are ours).
        var directory = new byte[ext.DirectorySize];
        _file.Read((long)ext.DirectoryOffset, directory);
        List<Qcow2BitmapDirectoryEntry>? entries = Qcow2BitmapDirectoryEntry.ReadDirectory(
            directory, (long)ext.DirectoryOffset, (int)ext.BitmapCount, out string? problem, out int used);
        if (entries is null)
            Qcow2Errors.Corrupt(Path, problem!);
        if (used != directory.Length)
            Qcow2Errors.Corrupt(Path, $"the bitmap directory is {directory.Length} bytes long but its {ext.BitmapCount} entries take {used}");
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (Qcow2BitmapDirectoryEntry e in entries)
        {
            if (!names.Add(e.Name))
                Qcow2Errors.Corrupt(Path, $"the bitmap directory lists bitmap '{DirtyBitmapLimits.Shorten(e.Name)}' twice");
        }
        return entries;
    }

    /// <summary>QEMU's check_dir_entry, plus the exact table size QEMU's load_bitmap_data needs.</summary>
    private void CheckBitmapEntry(Qcow2BitmapDirectoryEntry e)
    {
        string who = $"bitmap '{DirtyBitmapLimits.Shorten(e.Name)}'";
        if (e.ExtraDataSize != 0)
            Qcow2Errors.Unsupported(Path, $"extra data ({e.ExtraDataSize} bytes) in the directory entry of {who}");
        if ((e.Flags & ~KnownBitmapFlags) != 0)
            Qcow2Errors.Corrupt(Path, $"{who} has reserved flags set (0x{e.Flags:x8})");
        if (e.Type != Qcow2BitmapDirectoryEntry.DirtyTrackingType)
            Qcow2Errors.Corrupt(Path, $"{who} has type {e.Type}; only dirty tracking bitmaps (type 1) exist");
        if (e.GranularityBits is < Qcow2Limits.MinBitmapGranularityBits or > Qcow2Limits.MaxBitmapGranularityBits)
            Qcow2Errors.Corrupt(Path, $"{who} has granularity 2^{e.GranularityBits} bytes (2^{Qcow2Limits.MinBitmapGranularityBits} to 2^{Qcow2Limits.MaxBitmapGranularityBits} allowed)");
        long maxEntries = Math.Min(Qcow2Limits.MaxBitmapTableEntries, Qcow2Limits.MaxBitmapDataBytes >> _clusterBits);
        if (e.TableSize == 0 || e.TableSize > maxEntries)
            Qcow2Errors.Corrupt(Path, $"{who} has a bitmap table of {e.TableSize} entries (1 to {maxEntries} allowed with {_clusterSize}-byte clusters)");
        if (e.TableOffset == 0 || (e.TableOffset & (_clusterSize - 1)) != 0)
            Qcow2Errors.Corrupt(Path, $"the bitmap table of {who} is at offset {e.TableOffset}, which is not a cluster-aligned offset past the header");
        if (!e.InUse)
        {
            long needed = Qcow2BitmapTable.EntriesFor(Size, e.GranularityBits, _clusterBits);
            if (e.TableSize != needed)
                Qcow2Errors.Corrupt(Path, $"{who} has a bitmap table of {e.TableSize} entries but a {Size}-byte disk needs {needed} at granularity {1L << e.GranularityBits}");
        }
    }

    /// <summary>The table's clusters lie inside the file and hold nothing else: no metadata, no other bitmap's table or data.</summary>
    private void ClaimBitmapTable(Qcow2BitmapDirectoryEntry e, HashSet<long> claimed)
    {
        string who = $"bitmap '{DirtyBitmapLimits.Shorten(e.Name)}'";
        long bytes = (long)e.TableSize * sizeof(ulong);
        if (e.TableOffset > EndOffset - bytes)
            Qcow2Errors.Corrupt(Path, $"the bitmap table of {who} at offset {e.TableOffset} ({bytes} bytes) runs past the end of the file ({_file.Length} bytes)");
        for (long c = e.TableOffset >> _clusterBits; c <= (e.TableOffset + bytes - 1) >> _clusterBits; c++)
        {
            if (_regions.Describe(c) is { } what)
                Qcow2Errors.Corrupt(Path, $"the bitmap table of {who} at offset {e.TableOffset} overlaps {what}");
            if (!claimed.Add(c))
                Qcow2Errors.Corrupt(Path, $"the bitmap table of {who} at offset {e.TableOffset} overlaps the table or data of another bitmap");
        }
    }

    /// <summary>Read a consistent bitmap's table and data clusters (checked as it goes) into a bitmap of the disk's size.</summary>
    private HierarchicalBitmap LoadBitmapBits(Qcow2BitmapDirectoryEntry e, HashSet<long> claimed)
    {
        string who = $"bitmap '{DirtyBitmapLimits.Shorten(e.Name)}'";
        long bitCount = Qcow2BitmapTable.BitsFor(Size, e.GranularityBits);
        var table = new byte[(long)e.TableSize * sizeof(ulong)];
        _file.Read(e.TableOffset, table);
        var bits = new HierarchicalBitmap(bitCount);
        var cluster = new byte[_clusterSize];
        long bitsPerCluster = (long)_clusterSize * 8;
        for (int i = 0; i < e.TableSize; i++)
        {
            ulong entry = BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i * sizeof(ulong)));
            if (Qcow2BitmapTable.Problem(entry, _clusterBits) is { } problem)
                Qcow2Errors.Corrupt(Path, $"entry {i} of the bitmap table of {who} is invalid: {problem}");
            long start = i * bitsPerCluster;
            long count = Math.Min(bitsPerCluster, bitCount - start);
            long offset = (long)(entry & Qcow2BitmapTable.OffsetMask);
            if (offset == 0)
            {
                if ((entry & Qcow2BitmapTable.AllOnesFlag) != 0)
                    bits.Set(start, count);
                continue;
            }
            if (offset > EndOffset - _clusterSize)
                Qcow2Errors.Corrupt(Path, $"entry {i} of the bitmap table of {who} points to offset {offset}, past the end of the file ({_file.Length} bytes)");
            long c = offset >> _clusterBits;
            if (_regions.Describe(c) is { } what)
                Qcow2Errors.Corrupt(Path, $"entry {i} of the bitmap table of {who} points to offset {offset}, which holds {what}");
            if (!claimed.Add(c))
                Qcow2Errors.Corrupt(Path, $"entry {i} of the bitmap table of {who} points to offset {offset}, which already holds a bitmap table or bitmap data");
            _file.Read(offset, cluster);
            bits.Deserialize(cluster, start, count);
        }
        return bits;
    }

    #endregion

    #region Checks before storing

    /// <summary>Why a new persistent bitmap cannot be stored here (QEMU's qcow2_co_can_store_new_dirty_bitmap), or null.</summary>
    internal string? CanStoreBitmapProblem(string name, long granularity, IReadOnlyList<DirtyBitmap> persistent)
    {
        if (granularity <= 0 || !BitOperations.IsPow2(granularity))
            return $"granularity {granularity} is not a power of two";
        int granularityBits = BitOperations.Log2((ulong)granularity);
        int nameBytes = Encoding.UTF8.GetByteCount(name);
        var names = new List<int>(persistent.Count + 1);
        foreach (DirtyBitmap b in persistent)
        {
            if (b.Name is { } other && !string.Equals(other, name, StringComparison.Ordinal))
                names.Add(Encoding.UTF8.GetByteCount(other));
        }
        names.Add(nameBytes);
        lock (_sync)
        {
            CheckOpen();
            if (_allocator is null)
                return "the image is open read-only";
            if (Version < 3)
                return "cannot store dirty bitmaps in qcow2 v2 files (upgrade the image with 'qemu-img amend -o compat=1.1')";
            return BitmapProblem(nameBytes, granularityBits) ?? DirectoryProblem(names) ?? HeaderRoomProblem();
        }
    }

    /// <summary>QEMU's limits on one bitmap: name length, granularity, bitmap size.</summary>
    private string? BitmapProblem(int nameBytes, int granularityBits)
    {
        if (NameProblem(nameBytes) is { } problem)
            return problem;
        if (Size == 0)
            return "the disk is empty, so the bitmap would have no bits to store";
        return Qcow2BitmapTable.SizeProblem(Size, granularityBits, _clusterBits);
    }

    private static string? NameProblem(int nameBytes)
    {
        if (nameBytes == 0)
            return "a stored bitmap needs a name";
        if (nameBytes > Qcow2Limits.MaxBitmapNameLength)
            return $"the name is {nameBytes} bytes long (at most {Qcow2Limits.MaxBitmapNameLength})";
        return null;
    }

    /// <summary>QEMU's limits on the directory: number of bitmaps, directory size.</summary>
    private static string? DirectoryProblem(IReadOnlyCollection<int> allNameBytes)
    {
        if (allNameBytes.Count > Qcow2Limits.MaxBitmaps)
            return $"the maximum number of persistent bitmaps ({Qcow2Limits.MaxBitmaps}) is already reached";
        long directory = allNameBytes.Sum(n => (long)Qcow2BitmapDirectoryEntry.SizeFor(n));
        if (directory > Qcow2Limits.MaxBitmapDirectoryBytes)
            return $"not enough space in the bitmap directory ({directory} bytes needed, at most {Qcow2Limits.MaxBitmapDirectoryBytes})";
        return null;
    }

    /// <summary>Whether a bitmaps record fits in cluster 0 (moving the backing file name if needed), or null when it does.</summary>
    private string? HeaderRoomProblem()
    {
        if (_extensions.Bitmaps is not null)
            return null; // a record exists (in effect or stale): it is updated in place
        Qcow2HeaderExtensionArea area = ReadExtensionArea(out _);
        if (area.BitmapsRecord >= 0 || area.RoomForBitmapsRecord((long)_header.BackingFileOffset, (int)_header.BackingFileSize, _clusterSize, out _))
            return null;
        return $"there is no room for the bitmaps header extension in the first {_clusterSize}-byte cluster (the header extensions and backing file name fill it)";
    }

    #endregion

    #region Store

    /// <summary>A persistent bitmap to list, as read from the engine before taking the image lock.</summary>
    private sealed record WantedBitmap(DirtyBitmap Bitmap, string Name, byte[] NameBytes, int GranularityBits, bool Recording, bool Inconsistent);

    /// <summary>
    /// Rewrite the directory to list exactly <paramref name="persistent"/>. With <paramref name="storeBits"/> every
    /// consistent bitmap is written with its bits and without in_use (Store); otherwise each is listed in use with its
    /// current table, or a table of zero entries when it has none yet (MarkInUse). Inconsistent bitmaps keep their
    /// entry. Entries of bitmaps not listed are dropped and their clusters freed. With nothing to list, the extension
    /// is removed.
    /// </summary>
    internal void WriteBitmaps(IReadOnlyList<DirtyBitmap> persistent, bool storeBits)
    {
        var wanted = new List<WantedBitmap>(persistent.Count);
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (DirtyBitmap b in persistent)
        {
            string name = b.Name ?? throw new ArgumentException("A persistent bitmap has a name.", nameof(persistent));
            if (!names.Add(name))
                throw new ArgumentException($"Bitmap '{name}' is listed twice.", nameof(persistent));
            long g = b.Granularity;
            int granularityBits = g > 0 && BitOperations.IsPow2(g) ? BitOperations.Log2((ulong)g) : -1;
            wanted.Add(new WantedBitmap(b, name, Encoding.UTF8.GetBytes(name), granularityBits, b.Recording, b.Inconsistent));
        }
        var allNames = wanted.Select(w => w.NameBytes.Length).ToArray();
        lock (_sync)
        {
            CheckWritable();
            if (wanted.Count > 0 && Version < 3)
                StoreRefused(wanted[0].Name, "cannot store dirty bitmaps in qcow2 v2 files");
            foreach (WantedBitmap w in wanted)
            {
                if (w.GranularityBits < 0)
                    StoreRefused(w.Name, $"granularity {w.Bitmap.Granularity} is not a power of two");
                // An inconsistent bitmap keeps its entry as it is: only its name has to fit.
                if ((w.Inconsistent ? NameProblem(w.NameBytes.Length) : BitmapProblem(w.NameBytes.Length, w.GranularityBits)) is { } problem)
                    StoreRefused(w.Name, problem);
            }
            if (wanted.Count > 0)
            {
                if ((DirectoryProblem(allNames) ?? HeaderRoomProblem()) is { } problem)
                    StoreRefused(wanted[^1].Name, problem);
                ClearForeignAutoclearBits();
            }
        }

        var fresh = new List<(long Offset, long Length)>(); // allocated here, not yet listed: freed again on failure
        var tables = new Dictionary<string, (long Offset, uint Size)>(StringComparer.Ordinal);
        var stale = new List<long>(); // data clusters of tables rewritten in place: free once the new directory is in effect
        try
        {
            if (storeBits)
            {
                foreach (WantedBitmap w in wanted)
                {
                    if (w.Inconsistent)
                        continue;
                    HierarchicalBitmap bits = w.Bitmap.Snapshot(); // under the node's lock, not the image's
                    lock (_sync)
                    {
                        CheckWritable();
                        tables[w.Name] = WriteBitmapData(w, bits, fresh, stale);
                    }
                }
            }
            lock (_sync)
            {
                CheckWritable();
                CommitBitmapDirectory(wanted, tables, fresh, stale);
            }
        }
        catch
        {
            lock (_sync)
                ReleaseClusters(fresh);
            throw;
        }
    }

    private void StoreRefused(string name, string why)
        => Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
            $"Can't store bitmap '{DirtyBitmapLimits.Shorten(name)}' in '{Path}': {why}.", name);

    /// <summary>
    /// Write a bitmap's non-zero data clusters to new clusters, and its table: in place over the table the image lists
    /// for it when that one is in use on disk and of the same size (nobody trusts an in-use bitmap's content, so a crash
    /// while it is rewritten costs nothing, provided the data it then names is on disk with its refcounts first, as
    /// qemu-img check walks in-use tables too; its old data clusters go to <paramref name="stale"/>), else to new clusters.
    /// A table of a thousand bitmaps is thus written over their own tables, not beside them. Returns the table.
    /// </summary>
    private (long Offset, uint Size) WriteBitmapData(WantedBitmap w, HierarchicalBitmap bits, List<(long, long)> fresh, List<long> stale)
    {
        if (Qcow2BitmapTable.SizeProblem(Size, w.GranularityBits, _clusterBits) is { } problem)
            StoreRefused(w.Name, problem);
        long bitCount = Qcow2BitmapTable.BitsFor(Size, w.GranularityBits);
        if (bits.Length != bitCount)
            bits.Resize(bitCount); // a copy: the image was resized under a bitmap that was not
        long entries = Qcow2BitmapTable.EntriesFor(Size, w.GranularityBits, _clusterBits);
        long tableClusters = ((entries * sizeof(ulong)) + _clusterSize - 1) >> _clusterBits;
        var table = new byte[tableClusters << _clusterBits];
        var cluster = new byte[_clusterSize];
        int freshBefore = fresh.Count;
        long bitsPerCluster = (long)_clusterSize * 8;
        for (long i = 0; i < entries; i++)
        {
            long start = i * bitsPerCluster;
            long count = Math.Min(bitsPerCluster, bitCount - start);
            if (bits.NextSet(start, start + count) < 0)
                continue; // all zeros: entry 0, no cluster
            Array.Clear(cluster);
            bits.Serialize(cluster, start, count);
            long offset = _allocator!.AllocateCluster();
            fresh.Add((offset, _clusterSize));
            _file.Write(offset, cluster);
            BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan((int)(i * sizeof(ulong))), (ulong)offset);
        }
        if (ReusableTable(w, entries, tableClusters) is { } reuse)
        {
            var old = new byte[table.Length];
            _file.Read(reuse.TableOffset, old);
            if (!old.AsSpan().SequenceEqual(table)) // the same table (an empty bitmap, say): nothing to write or free
            {
                // From this write on the image's table names the new data clusters: should the store fail now, they
                // must leak (as must the stale ones), never be freed while a table on disk still names them.
                fresh.RemoveRange(freshBefore, fresh.Count - freshBefore);
                // qemu-img check walks in-use tables too: the data they name, and its refcounts, first on disk.
                _refcounts.Flush();
                _file.Sync();
                _file.Write(reuse.TableOffset, table);
                for (int i = 0; i < reuse.TableSize; i++)
                {
                    ulong entry = BinaryPrimitives.ReadUInt64BigEndian(old.AsSpan(i * sizeof(ulong)));
                    long offset = (long)(entry & Qcow2BitmapTable.OffsetMask);
                    if (offset != 0 && Qcow2BitmapTable.Problem(entry, _clusterBits) is null && offset <= EndOffset - _clusterSize
                        && _regions.Describe(offset >> _clusterBits) is null)
                        stale.Add(offset >> _clusterBits);
                }
            }
            return (reuse.TableOffset, (uint)entries);
        }
        long tableOffset = AllocateMetadata(tableClusters);
        fresh.Add((tableOffset, tableClusters << _clusterBits));
        _file.Write(tableOffset, table);
        return (tableOffset, (uint)entries);
    }

    /// <summary>
    /// The on-disk entry of this bitmap when its table may be rewritten in place: in use on disk (its table is not
    /// trusted by anyone), the same granularity and table size, and a table that lies inside the file and is not other
    /// metadata. Otherwise null.
    /// </summary>
    private Qcow2BitmapDirectoryEntry? ReusableTable(WantedBitmap w, long entries, long tableClusters)
    {
        Qcow2BitmapDirectoryEntry? e = _bitmaps.FirstOrDefault(b => string.Equals(b.Name, w.Name, StringComparison.Ordinal));
        if (e is null || !e.InUse || e.GranularityBits != w.GranularityBits || e.TableSize != entries || e.TableOffset == 0
            || (e.TableOffset & (_clusterSize - 1)) != 0 || e.TableOffset > EndOffset - (tableClusters << _clusterBits))
            return null;
        for (long c = e.TableOffset >> _clusterBits; c < (e.TableOffset >> _clusterBits) + tableClusters; c++)
        {
            if (_regions.Describe(c) is not null || _refcounts.Get(c) != 1)
                return null;
        }
        return e;
    }

    /// <summary>A table of zero entries (the bitmap reads as all zeros) for a bitmap listed in use before it has bits.</summary>
    private (long Offset, uint Size) WriteEmptyTable(WantedBitmap w, List<(long, long)> fresh)
    {
        // In use, the table's size is not checked against the disk (QEMU allows a stale size), only its limits.
        long maxEntries = Math.Min(Qcow2Limits.MaxBitmapTableEntries, Qcow2Limits.MaxBitmapDataBytes >> _clusterBits);
        long entries = Math.Clamp(Qcow2BitmapTable.EntriesFor(Size, Math.Max(w.GranularityBits, 0), _clusterBits), 1, maxEntries);
        long tableClusters = ((entries * sizeof(ulong)) + _clusterSize - 1) >> _clusterBits;
        long tableOffset = AllocateMetadata(tableClusters);
        fresh.Add((tableOffset, tableClusters << _clusterBits));
        _file.Write(tableOffset, new byte[tableClusters << _clusterBits]);
        return (tableOffset, (uint)entries);
    }

    private long AllocateMetadata(long clusters) => clusters == 1 ? _allocator!.AllocateCluster() : _allocator!.AllocateContiguous(clusters);

    /// <summary>Write the new directory, switch the extension to it, then free what nothing lists any more.</summary>
    private void CommitBitmapDirectory(List<WantedBitmap> wanted, Dictionary<string, (long Offset, uint Size)> tables, List<(long Offset, long Length)> fresh, List<long> stale)
    {
        IReadOnlyList<Qcow2BitmapDirectoryEntry> old = _bitmaps;
        var byName = new Dictionary<string, Qcow2BitmapDirectoryEntry>(StringComparer.Ordinal);
        foreach (Qcow2BitmapDirectoryEntry e in old)
            byName.TryAdd(e.Name, e);

        var listed = new List<(WantedBitmap W, long TableOffset, uint TableSize, uint Flags)>(wanted.Count);
        foreach (WantedBitmap w in wanted)
        {
            if (byName.TryGetValue(w.Name, out Qcow2BitmapDirectoryEntry? previous) && previous.GranularityBits != w.GranularityBits)
                previous = null; // another bitmap of the same name: its table does not fit this one
            uint auto = w.Recording && !w.Inconsistent ? Qcow2BitmapDirectoryEntry.AutoFlag : 0;
            if (tables.TryGetValue(w.Name, out (long Offset, uint Size) stored))
                listed.Add((w, stored.Offset, stored.Size, auto));
            else if (previous is not null)
            {
                uint flags = w.Inconsistent
                    ? (previous.Flags & KnownBitmapFlags) | Qcow2BitmapDirectoryEntry.InUseFlag
                    : Qcow2BitmapDirectoryEntry.InUseFlag | auto;
                listed.Add((w, previous.TableOffset, previous.TableSize, flags));
            }
            else
            {
                (long offset, uint size) = WriteEmptyTable(w, fresh);
                listed.Add((w, offset, size, Qcow2BitmapDirectoryEntry.InUseFlag | auto));
            }
        }

        if (listed.Count == old.Count && _bitmapsExtension is not null && Enumerable.Range(0, old.Count).All(i =>
                old[i].Name == listed[i].W.Name && old[i].GranularityBits == listed[i].W.GranularityBits && old[i].Flags == listed[i].Flags
                && old[i].TableOffset == listed[i].TableOffset && old[i].TableSize == listed[i].TableSize
                && old[i].Type == Qcow2BitmapDirectoryEntry.DirtyTrackingType && old[i].ExtraDataSize == 0))
            return; // the image already says exactly this

        Qcow2BitmapsExtension? oldExtension = _bitmapsExtension;
        var newTables = new HashSet<long>(listed.Select(l => l.TableOffset));
        if (listed.Count == 0)
        {
            if (_extensions.Bitmaps is null)
                return;
            WriteAutoclear(0); // bit 0 goes first: from now on the extension is ignored whatever state it is in
            RemoveBitmapsRecord();
            _bitmaps = [];
            _bitmapsExtension = null;
            _extensions.Bitmaps = null;
            _regions.SetFixed(Qcow2MetadataRegions.BitmapDirectoryName, 0, 0);
        }
        else
        {
            int directorySize = listed.Sum(l => Qcow2BitmapDirectoryEntry.SizeFor(l.W.NameBytes.Length));
            long directoryClusters = ((long)directorySize + _clusterSize - 1) >> _clusterBits;
            var directory = new byte[directoryClusters << _clusterBits];
            long directoryOffset = AllocateMetadata(directoryClusters);
            fresh.Add((directoryOffset, directoryClusters << _clusterBits));
            var entries = new List<Qcow2BitmapDirectoryEntry>(listed.Count);
            int pos = 0;
            foreach ((WantedBitmap w, long tableOffset, uint tableSize, uint flags) in listed)
            {
                entries.Add(new Qcow2BitmapDirectoryEntry(w.Name, w.GranularityBits, flags, Qcow2BitmapDirectoryEntry.DirtyTrackingType,
                    tableOffset, tableSize, directoryOffset + pos));
                pos += Qcow2BitmapDirectoryEntry.Write(directory.AsSpan(pos), tableOffset, tableSize, flags, w.GranularityBits, w.NameBytes);
            }
            _file.Write(directoryOffset, directory);

            // Everything the new directory points to, and its refcounts, durable before the header names it.
            _refcounts.Flush();
            _file.Sync();
            fresh.Clear(); // from the header write on they may be listed: a failure must leak them, not free them
            var extension = new Qcow2BitmapsExtension
            {
                BitmapCount = (uint)listed.Count,
                DirectorySize = (ulong)directorySize,
                DirectoryOffset = (ulong)directoryOffset,
            };
            // From the switch on, the image may list bitmaps that are not in use: the next guest write must mark them
            // in use again first, even if a later step of this store fails.
            if (entries.Any(e => !e.InUse))
                _preparedForWrite = false;
            WriteBitmapsRecord(extension);
            _bitmaps = entries;
            _bitmapsExtension = extension;
            _extensions.Bitmaps = extension;
            _regions.SetFixed(Qcow2MetadataRegions.BitmapDirectoryName, directoryOffset, directorySize);
            WriteAutoclear((ulong)Qcow2AutoclearFeatures.Bitmaps); // foreign bits were cleared before anything changed
        }

        // The old directory and the tables (with their data) that nothing lists any more. A stale extension (auto-clear
        // bit clear) is not trusted: its clusters are left leaked, as QEMU leaves them.
        var free = new HashSet<long>();
        if (oldExtension is not null)
        {
            long first = (long)oldExtension.DirectoryOffset >> _clusterBits;
            long last = (long)(oldExtension.DirectoryOffset + oldExtension.DirectorySize - 1) >> _clusterBits;
            for (long c = first; c <= last; c++)
                free.Add(c);
            foreach (Qcow2BitmapDirectoryEntry e in old)
            {
                if (!newTables.Contains(e.TableOffset))
                    CollectBitmapClusters(e, free);
            }
        }
        free.UnionWith(stale); // data that tables rewritten in place no longer name
        foreach (long c in free)
            _allocator!.TryQueueFree(c);
        FlushMetadata();
        if (_bitmaps.Any(b => !b.InUse))
            _preparedForWrite = false; // the next guest write marks them in use again first
    }

    /// <summary>
    /// The clusters of a dropped bitmap: its table and every data cluster it names. Anything that does not look like
    /// bitmap clusters (outside the file, metadata, an invalid entry) is left alone: a leak is harmless, freeing a
    /// cluster in use is not.
    /// </summary>
    private void CollectBitmapClusters(Qcow2BitmapDirectoryEntry e, HashSet<long> free)
    {
        long bytes = (long)e.TableSize * sizeof(ulong);
        if (e.TableSize == 0 || e.TableSize > Qcow2Limits.MaxBitmapTableEntries || e.TableOffset == 0
            || (e.TableOffset & (_clusterSize - 1)) != 0 || e.TableOffset > EndOffset - bytes)
            return;
        long first = e.TableOffset >> _clusterBits;
        long last = (e.TableOffset + bytes - 1) >> _clusterBits;
        for (long c = first; c <= last; c++)
        {
            if (_regions.Describe(c) is not null)
                return;
        }
        var table = new byte[bytes];
        _file.Read(e.TableOffset, table);
        for (int i = 0; i < e.TableSize; i++)
        {
            ulong entry = BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i * sizeof(ulong)));
            long offset = (long)(entry & Qcow2BitmapTable.OffsetMask);
            if (offset == 0 || Qcow2BitmapTable.Problem(entry, _clusterBits) is not null || offset > EndOffset - _clusterSize
                || _regions.Describe(offset >> _clusterBits) is not null)
                continue;
            free.Add(offset >> _clusterBits);
        }
        for (long c = first; c <= last; c++)
            free.Add(c);
    }

    /// <summary>Give back clusters allocated by a store that failed before listing them (best effort: a leak otherwise).</summary>
    private void ReleaseClusters(List<(long Offset, long Length)> fresh)
    {
        try
        {
            foreach ((long offset, long length) in fresh)
            {
                for (long c = offset >> _clusterBits; c <= (offset + length - 1) >> _clusterBits; c++)
                    _allocator?.TryQueueFree(c);
            }
        }
        catch (BlockException)
        {
            // leaked; qemu-img check -r leaks reclaims them
        }
        fresh.Clear();
    }

    #endregion

    #region Header updates

    /// <summary>The records of the header extension area, read from the file now.</summary>
    private Qcow2HeaderExtensionArea ReadExtensionArea(out byte[] cluster0)
    {
        int limit = _header.BackingFileOffset != 0 ? (int)Math.Min((long)_header.BackingFileOffset, _clusterSize) : _clusterSize;
        cluster0 = new byte[limit];
        _file.Read(0, cluster0);
        return Qcow2HeaderExtensionArea.Find(cluster0, (int)_header.HeaderLength, limit, Path);
    }

    /// <summary>
    /// Point the bitmaps record at <paramref name="extension"/>: its payload is overwritten in place when the record
    /// exists; otherwise the record is added where the end record is (the backing file name moved out of the way
    /// first if needed), written behind the end record first and made a record by one 8-byte write last.
    /// </summary>
    private void WriteBitmapsRecord(Qcow2BitmapsExtension extension)
    {
        Span<byte> payload = stackalloc byte[Qcow2BitmapsExtension.Size];
        extension.WriteTo(payload);
        Qcow2HeaderExtensionArea area = ReadExtensionArea(out _);
        if (area.BitmapsRecord >= 0)
        {
            _file.Write(area.BitmapsRecord + Qcow2HeaderExtensionArea.RecordHeaderSize, payload);
            _file.Sync();
            return;
        }
        if (!area.RoomForBitmapsRecord((long)_header.BackingFileOffset, (int)_header.BackingFileSize, _clusterSize, out int newBackingOffset))
            Qcow2Errors.TooLarge(Path, "there is no room for the bitmaps header extension in the first cluster");
        if (newBackingOffset >= 0)
            MoveBackingFileName(newBackingOffset);
        int at = area.EndRecord;
        if (!area.HasEndRecord)
        {
            _file.Write(at, new byte[Qcow2HeaderExtensionArea.RecordHeaderSize]); // an end record where the records stop
            _file.Sync();
        }
        Span<byte> body = stackalloc byte[Qcow2BitmapsExtension.Size + Qcow2HeaderExtensionArea.RecordHeaderSize];
        body.Clear();
        payload.CopyTo(body);
        _file.Write(at + Qcow2HeaderExtensionArea.RecordHeaderSize, body); // payload, then the new end record
        _file.Sync();
        Span<byte> recordHeader = stackalloc byte[Qcow2HeaderExtensionArea.RecordHeaderSize];
        BinaryPrimitives.WriteUInt32BigEndian(recordHeader, Qcow2HeaderExtensions.BitmapsType);
        BinaryPrimitives.WriteUInt32BigEndian(recordHeader[4..], Qcow2BitmapsExtension.Size);
        _file.Write(at, recordHeader);
        _file.Sync();
    }

    /// <summary>
    /// Copy the backing file name to <paramref name="newOffset"/> (not overlapping the old place), switch the header
    /// field to it, then clear the old place.
    /// </summary>
    private void MoveBackingFileName(int newOffset)
    {
        int oldOffset = (int)_header.BackingFileOffset;
        int size = (int)_header.BackingFileSize;
        var name = new byte[size];
        _file.Read(oldOffset, name);
        _file.Write(newOffset, name);
        _file.Sync();
        Span<byte> field = stackalloc byte[sizeof(ulong)];
        BinaryPrimitives.WriteUInt64BigEndian(field, (ulong)newOffset);
        _file.Write(Qcow2Header.BackingFileOffsetOffset, field);
        _file.Sync();
        _header.BackingFileOffset = (ulong)newOffset;
        _file.Write(oldOffset, new byte[size]);
    }

    /// <summary>Drop the bitmaps record: an end record in its place when it is the last, else the records after it move up.</summary>
    private void RemoveBitmapsRecord()
    {
        Qcow2HeaderExtensionArea area = ReadExtensionArea(out byte[] cluster0);
        if (area.BitmapsRecord < 0)
            return;
        int at = area.BitmapsRecord;
        if (area.AfterBitmapsRecord == area.EndRecord)
        {
            _file.Write(at, new byte[Qcow2HeaderExtensionArea.RecordHeaderSize]); // one 8-byte write: the end record
            _file.Sync();
            _file.Write(at + Qcow2HeaderExtensionArea.RecordHeaderSize, new byte[Qcow2BitmapsExtension.Size]);
            return;
        }
        int tailEnd = area.HasEndRecord ? area.EndRecord + Qcow2HeaderExtensionArea.RecordHeaderSize : area.EndRecord;
        int moved = tailEnd - area.AfterBitmapsRecord;
        var shifted = new byte[tailEnd - at];
        cluster0.AsSpan(area.AfterBitmapsRecord, moved).CopyTo(shifted);
        _file.Write(at, shifted); // the freed tail becomes zeros: an end record
        _file.Sync();
    }

    /// <summary>Write the auto-clear field when it changes (v3 only), durably.</summary>
    private void WriteAutoclear(ulong value)
    {
        if (_header.Version < 3 || value == _header.AutoclearFeatures)
            return;
        Span<byte> field = stackalloc byte[sizeof(ulong)];
        BinaryPrimitives.WriteUInt64BigEndian(field, value);
        _file.Write(Qcow2Header.AutoclearFeaturesOffset, field);
        _file.Sync();
        _header.AutoclearFeatures = value;
    }

    /// <summary>A writer must clear the auto-clear bits of features it does not maintain before it changes the image.</summary>
    private void ClearForeignAutoclearBits() => WriteAutoclear(_header.AutoclearFeatures & (ulong)Qcow2AutoclearFeatures.Bitmaps);

    #endregion
}
