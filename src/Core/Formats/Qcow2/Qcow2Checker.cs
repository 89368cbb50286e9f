using System.Buffers.Binary;
using System.Collections;
using System.Globalization;
using System.Runtime.CompilerServices;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Read-only consistency check of one qcow2 image, the equivalent of <c>qemu-img check</c> without <c>-r</c>:
/// it counts the references to every host cluster (header, L1 tables, L2 tables, data and compressed clusters,
/// the snapshot table and the snapshots' L1/L2 tables, the refcount table and blocks, the LUKS header, the bitmap
/// directory, bitmap tables and bitmap data) and compares them with the stored refcounts, then checks the
/// OFLAG_COPIED flags of the active tables against the stored refcounts, as QEMU's <c>qcow2_check_refcounts</c> does.
///
/// <para><b>Same numbers as qemu-img.</b> Counts follow QEMU's rules, so that <see cref="Qcow2CheckReport"/> matches
/// <c>qemu-img check --output=json</c>: a compressed cluster references every host cluster its sectors touch; a region
/// that ends one cluster or more past the end of the file is one corruption and is not counted; a cluster referenced
/// more often than the refcount width can hold is an overflow corruption; only clusters inside the file (plus the one
/// partial cluster past it) are compared. Problems QEMU refuses at open (misaligned tables, an L1 table too small, a
/// broken extension) are reported as corruptions here and the check goes on with what can be read.</para>
///
/// <para><b>Untrusted files.</b> Only a header that cannot be interpreted at all (no magic, unknown version, cluster
/// size or refcount width out of range) throws, as a <see cref="BlockException"/>; everything else ends up in the
/// report. Memory is bounded by the file size (two bytes and a few bits per host cluster plus a prefix of the refcount
/// table); metadata reading is bounded by a budget proportional to the file size, and an L2 table referenced many
/// times is walked once and counted with its multiplicity, so hostile images cannot make the check hang.</para>
///
/// <para><b>Locking.</b> The file is opened for reading with <see cref="FileShare.ReadWrite"/>: it can be checked while
/// other readers (or QEMU) have it open. On Linux .NET takes a shared flock, so an image the engine holds open for
/// writing (exclusive lock) cannot be checked; the report then says so as a check error.</para>
/// </summary>
public sealed class Qcow2Checker
{
    private const ulong L1ReservedMask = 0x7F00_0000_0000_01FFUL;
    private const ulong L2StandardReservedMask = 0x3F00_0000_0000_01FEUL;
    private const ulong EntryOffsetMask = Qcow2L2Entry.OffsetMask; // bits 9-55 (L1, L2, bitmap table entries)
    private const ulong RefTableOffsetMask = ~0x1FFUL;
    private const ulong RefTableReservedMask = 0x1FFUL;
    private const ulong BitmapEntryReservedMask = 0xFF00_0000_0000_01FEUL;
    private const ulong SubclusterAllocMask = 0xFFFF_FFFFUL;
    private const ulong KnownIncompatible = 0x1F;
    private const int MaxSnapshots = 65536;
    private const long MaxSnapshotTableBytes = 1024L * MaxSnapshots;
    private const int MaxSnapshotExtraData = 1024;
    private const int SnapshotHeaderSize = 40;
    private const int SnapshotMinExtraDataV3 = 16;
    private const long MaxL1Entries = Qcow2Limits.MaxL1Bytes / sizeof(ulong);
    private const uint BitmapReservedFlags = 0xFFFF_FFFC;
    private const uint MaxBitmapTableEntries = 0x800_0000;
    private const ulong MaxBitmapPhysicalBytes = 0x2000_0000;
    private const int MinBitmapGranularityBits = 9;
    private const int MaxBitmapGranularityBits = 31;
    private const uint CryptLuks = 2;
    private const int CryptoHeaderExtensionSize = 16;
    private const int ChunkBytes = 64 * 1024;
    private const int MaxTrackedUnalignedTables = 65536;

    /// <summary>What references a cluster (kept for the first two different users, for messages).</summary>
    private enum Use : byte
    {
        None,
        Header,
        ActiveL1,
        ActiveL2,
        Data,
        Compressed,
        SnapshotTable,
        SnapshotL1,
        SnapshotL2,
        RefcountTable,
        RefcountBlock,
        BitmapDirectory,
        BitmapTable,
        BitmapData,
        CryptoHeader,
    }

    private enum ClusterType
    {
        Unallocated,
        ZeroPlain,
        ZeroAlloc,
        Normal,
        Compressed,
    }

    private readonly Qcow2File _file;
    private readonly Qcow2CheckReport _report;
    private readonly long _fileLength;
    private readonly long _budgetLimit;
    private long _budgetUsed;

    private Qcow2Header _header = null!;
    private int _cb;
    private long _cs;
    private int _refcountOrder;
    private ulong _refcountMax;
    private long _entriesPerBlock;
    private bool _hasDataFile;
    private bool _subclusters;
    private int _l2EntrySize;

    // Expected refcounts ("reference" in qemu's words): one byte per host cluster, larger values on the side.
    private byte[] _counts = [];
    private byte[] _uses = [];
    private readonly Dictionary<long, ulong> _bigCounts = new();
    private long _countLength;

    // Stored refcounts: the part of the refcount table that covers the file, and whether each refcount is 1.
    private long _refTableOffset;
    private long _refTableEntries;
    private ulong[] _refTable = [];
    private BitArray _storedIsOne = new(0);
    private readonly HashSet<long> _unreadableBlocks = new();
    private byte[]? _lookupBlock;
    private long _lookupBlockOffset = -1;

    // L2 tables walked once; further references are counted with their multiplicity at the end.
    private BitArray _walkedL2 = new(0);
    private readonly HashSet<long> _walkedUnalignedL2 = new();
    private readonly Dictionary<long, (long Active, long Snapshot)> _repeatedL2 = new();
    private byte[] _l2Buffer = [];

    private Qcow2Checker(Qcow2File file, Qcow2CheckReport report)
    {
        _file = file;
        _report = report;
        // QEMU sees the file in whole 512-byte sectors (bdrv_getlength); the tail of the last one reads as zeros.
        _fileLength = (file.Length + 511) & ~511L;
        // Valid images read each metadata structure about once; 4x the file leaves room for snapshots sharing L2 tables.
        _budgetLimit = (4 * _fileLength) + (256L << 20);
    }

    /// <summary>
    /// Check the qcow2 image at <paramref name="path"/> without changing it. Problems in the image are reported in the
    /// returned <see cref="Qcow2CheckReport"/>; so is an image locked by a writer (as a check error: the check opens
    /// it as a reader, with QEMU's image locks, as qemu-img check does). With <paramref name="forceShare"/> it reads
    /// the image without locks (qemu-img check -U): a writer may be changing what it checks.
    /// </summary>
    /// <exception cref="BlockException">
    /// ImageNotFound (no such file), ImageIsFolder, ImageIsFifo, ImageIsSocket, ImageIsCharacterDevice (not a file),
    /// ImageIOFailed (no permission to read it), UnsupportedFormat (not a qcow2 image), UnsupportedImageFeature (unknown version, cluster size above 2 MiB), ImageCorrupt (the header
    /// cannot be interpreted: file shorter than a header, cluster_bits, header_length or refcount_order out of range).
    /// </exception>
    public static Qcow2CheckReport Check(string path, bool forceShare = false)
    {
        ArgumentNullException.ThrowIfNull(path);
        string fullPath;
        try
        {
            fullPath = System.IO.Path.GetFullPath(path);
        }
        catch (Exception e) when (e is ArgumentException or NotSupportedException or PathTooLongException)
        {
            throw new BlockException(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound, $"'{path}' is not a usable image path: {e.Message}", path, e);
        }
        var report = new Qcow2CheckReport(fullPath);
        SafeFileHandle handle;
        try
        {
            handle = ImageFiles.Open(fullPath, readOnly: true, forceShare);
        }
        catch (BlockException e) when (e.ErrorId == ErrorIds.ImageInUse)
        {
            report.AddCheckError($"the image is locked by a writer (it is open for writing, here or in another process), so it cannot be checked now: {e.Message}");
            return report;
        }

        Qcow2File file;
        try
        {
            file = new Qcow2File(fullPath, handle);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
        using (file)
            new Qcow2Checker(file, report).Run();
        return report;
    }

    private void Run()
    {
        ReadHeader();
        try
        {
            CheckImage();
        }
        catch (BudgetExceededException)
        {
            _report.AddCheckError($"the check stopped after reading {_budgetUsed} bytes of metadata (more than {_budgetLimit} for a {_fileLength}-byte file): "
                + "the image's tables reference the same regions too many times; the counts above are incomplete");
        }
        catch (BlockException e) when (e.ErrorId == ErrorIds.ImageIOFailed)
        {
            _report.AddCheckError($"the check stopped on an I/O error; the counts are incomplete: {e.Message}");
        }
        catch (OutOfMemoryException)
        {
            _report.AddCheckError($"not enough memory to check an image file of {_fileLength} bytes with {_cs}-byte clusters");
        }
    }

    #region Header

    /// <summary>Decode the fixed header; throw when it cannot be interpreted at all.</summary>
    private void ReadHeader()
    {
        string path = _file.Path;
        _report.FileLength = _file.Length;
        Span<byte> first = stackalloc byte[Qcow2Header.V3Length];
        first.Clear();
        _file.Read(0, first);
        if (!Qcow2Image.IsQcow2(first))
            Throw.Block(ErrorIds.UnsupportedFormat, BlockErrorCategory.InvalidData, $"'{path}' is not a qcow2 image (no qcow2 magic).", path);
        if (_file.Length < Qcow2Header.V2Length)
            Qcow2Errors.Corrupt(path, $"the file is {_file.Length} bytes long, shorter than a qcow2 header");
        Qcow2Header h = Qcow2Header.ReadFrom(first);
        if (h.Version is not (2 or 3))
            Qcow2Errors.Unsupported(path, $"qcow2 version {h.Version} (only versions 2 and 3 are supported)");
        if (h.ClusterBits < Qcow2Limits.MinClusterBits)
            Qcow2Errors.Corrupt(path, $"cluster_bits is {h.ClusterBits} (at least {Qcow2Limits.MinClusterBits})");
        if (h.ClusterBits > Qcow2Limits.MaxClusterBits)
            Qcow2Errors.Unsupported(path, $"cluster size 2^{h.ClusterBits} bytes (at most 2 MiB)");
        long cs = 1L << (int)h.ClusterBits;
        if (h.Version >= 3)
        {
            if (h.HeaderLength < Qcow2Header.V3MinLength || h.HeaderLength > cs)
                Qcow2Errors.Corrupt(path, $"header_length is {h.HeaderLength} (from {Qcow2Header.V3MinLength} to the cluster size)");
            if (h.RefcountOrder > Qcow2Limits.MaxRefcountOrder)
                Qcow2Errors.Corrupt(path, $"refcount_order is {h.RefcountOrder} (at most {Qcow2Limits.MaxRefcountOrder})");
        }
        _header = h;
        _cb = (int)h.ClusterBits;
        _cs = cs;
        _refcountOrder = (int)h.RefcountOrder;
        _refcountMax = Qcow2RefcountBlock.MaxRefcount(_refcountOrder);
        _entriesPerBlock = Qcow2RefcountBlock.EntriesPerBlock(_cb, _refcountOrder);
        _report.Version = (int)h.Version;
        _report.ClusterSize = (int)cs;
        _report.RefcountBits = 1 << _refcountOrder;
        // QEMU's total_sectors is the size in whole sectors.
        ulong size = h.Size >> 9 << 9;
        _report.TotalClusters = (long)(size >> _cb) + ((size & (ulong)(cs - 1)) != 0 ? 1 : 0);
    }

    #endregion

    private void CheckImage()
    {
        Qcow2Header h = _header;
        ulong incompatible = h.IncompatibleFeatures;
        if ((incompatible & ~KnownIncompatible) != 0)
        {
            _report.AddCheckError($"the image uses unknown incompatible features (bits 0x{incompatible & ~KnownIncompatible:x}), so its metadata cannot be interpreted");
            return;
        }
        if ((incompatible & (ulong)Qcow2IncompatibleFeatures.Dirty) != 0)
            _report.AddWarning("the dirty bit is set (lazy refcounts, not closed cleanly): refcounts may be stale; 'qemu-img check -r all' repairs them");
        if ((incompatible & (ulong)Qcow2IncompatibleFeatures.Corrupt) != 0)
            _report.AddWarning("QEMU marked the image corrupt (incompatible bit 1)");
        if (h.CryptMethod != 0)
            _report.AddWarning($"the image is encrypted (crypt_method {h.CryptMethod}); only its metadata is checked");
        _hasDataFile = (incompatible & (ulong)Qcow2IncompatibleFeatures.ExternalDataFile) != 0;
        if (_hasDataFile)
            _report.AddWarning("guest data lives in an external data file; data clusters are not counted in this file");
        _subclusters = (incompatible & (ulong)Qcow2IncompatibleFeatures.ExtendedL2) != 0;
        _l2EntrySize = _subclusters ? 16 : 8;
        if (_subclusters && _cb < 14)
            Corrupt($"extended L2 entries need clusters of at least 16 KiB, but the cluster size is {_cs} (QEMU refuses to open it)");

        (Qcow2BitmapsExtension? bitmaps, ulong cryptoOffset, ulong cryptoLength) = ReadExtensions();

        long fileClusters = (_fileLength + _cs - 1) >> _cb;
        if (fileClusters + 2 > Array.MaxLength)
        {
            _report.AddCheckError($"the file has {fileClusters} clusters of {_cs} bytes, too many to check");
            return;
        }
        int arrayLength = (int)fileClusters + 1; // a reference may reach into the partial cluster past the end
        _counts = new byte[arrayLength];
        _uses = new byte[arrayLength];
        _storedIsOne = new BitArray(arrayLength);
        _walkedL2 = new BitArray(arrayLength);
        _countLength = fileClusters;
        _l2Buffer = new byte[_cs];

        LoadRefcountTable();
        ReadStoredRefcounts();

        // Header, active L1 and L2 tables, data clusters (with the OFLAG_COPIED checks of the active tables).
        Inc(0, (ulong)_cs, Use.Header, 1);
        CheckActiveL1();
        CheckSnapshots();
        WalkRepeatedL2Tables();
        Inc(h.RefcountTableOffset, (ulong)h.RefcountTableClusters << _cb, Use.RefcountTable, 1);
        if (cryptoLength != 0)
            Inc(cryptoOffset, cryptoLength, Use.CryptoHeader, 1);
        if (bitmaps is not null)
            CheckBitmaps(bitmaps);
        CheckRefcountBlocks();
        CompareRefcounts();
    }

    #region Header extensions

    /// <summary>The bitmaps extension (when QEMU would use it) and the LUKS header region, from the extension area.</summary>
    private (Qcow2BitmapsExtension? Bitmaps, ulong CryptoOffset, ulong CryptoLength) ReadExtensions()
    {
        Qcow2Header h = _header;
        long end = _cs;
        if (h.BackingFileOffset != 0)
        {
            if (h.BackingFileOffset > (ulong)_cs)
                Corrupt($"the backing file name offset {h.BackingFileOffset} is past the first cluster (QEMU refuses to open it)");
            else
                end = (long)h.BackingFileOffset;
            if (h.BackingFileSize > Qcow2Limits.MaxBackingFileNameLength)
                Corrupt($"the backing file name is {h.BackingFileSize} bytes long (at most {Qcow2Limits.MaxBackingFileNameLength}; QEMU refuses to open it)");
        }
        var area = new byte[_cs];
        _file.Read(0, area);
        Qcow2BitmapsExtension? bitmaps = null;
        ulong cryptoOffset = 0, cryptoLength = 0;
        long pos = h.HeaderLength;
        while (pos < end)
        {
            if (end - pos < 8)
            {
                Corrupt($"the header extension at byte {pos} runs past the end of the extension area ({end} bytes; QEMU refuses to open it)");
                break;
            }
            uint type = BinaryPrimitives.ReadUInt32BigEndian(area.AsSpan((int)pos));
            uint length = BinaryPrimitives.ReadUInt32BigEndian(area.AsSpan((int)pos + 4));
            pos += 8;
            if (length > end - pos)
            {
                Corrupt($"header extension 0x{type:x8} is {length} bytes long but only {end - pos} bytes remain in the extension area (QEMU refuses to open it)");
                break;
            }
            if (type == Qcow2HeaderExtensions.EndType)
                break;
            ReadOnlySpan<byte> data = area.AsSpan((int)pos, (int)length);
            if (type == Qcow2HeaderExtensions.BitmapsType)
                bitmaps = ReadBitmapsExtension(data) ?? bitmaps;
            else if (type == Qcow2HeaderExtensions.CryptoHeaderType)
                (cryptoOffset, cryptoLength) = ReadCryptoExtension(data);
            pos += ((long)length + 7) & ~7L;
        }
        return (bitmaps, cryptoOffset, cryptoLength);
    }

    private Qcow2BitmapsExtension? ReadBitmapsExtension(ReadOnlySpan<byte> data)
    {
        if (data.Length != Qcow2BitmapsExtension.Size)
        {
            Corrupt($"the bitmaps extension is {data.Length} bytes long, not {Qcow2BitmapsExtension.Size} (QEMU refuses to open it)");
            return null;
        }
        if ((_header.AutoclearFeatures & (ulong)Qcow2AutoclearFeatures.Bitmaps) == 0)
        {
            _report.AddWarning("the bitmaps extension is marked inconsistent (auto-clear bit 0 is clear: a program without bitmap support wrote the image), "
                + "so its bitmaps are ignored, as QEMU ignores them; their clusters count as leaks");
            return null;
        }
        Qcow2BitmapsExtension ext = Qcow2BitmapsExtension.ReadFrom(data);
        string? problem = null;
        if (ext.Reserved != 0)
            problem = "its reserved field is not zero";
        else if (ext.BitmapCount == 0 || ext.BitmapCount > Qcow2Limits.MaxBitmaps)
            problem = $"it lists {ext.BitmapCount} bitmaps (1-{Qcow2Limits.MaxBitmaps} allowed)";
        else if (ext.DirectoryOffset % (ulong)_cs != 0)
            problem = $"the bitmap directory offset {ext.DirectoryOffset} is not cluster aligned";
        else if (ext.DirectorySize > Qcow2Limits.MaxBitmapDirectoryBytes)
            problem = $"the bitmap directory is {ext.DirectorySize} bytes (at most {Qcow2Limits.MaxBitmapDirectoryBytes})";
        if (problem is not null)
        {
            Corrupt($"the bitmaps extension is invalid: {problem} (QEMU refuses to open the image); bitmaps are not checked");
            return null;
        }
        return ext;
    }

    private (ulong Offset, ulong Length) ReadCryptoExtension(ReadOnlySpan<byte> data)
    {
        if (_header.CryptMethod != CryptLuks)
        {
            Corrupt("the image has a crypto header extension but does not use LUKS encryption (QEMU refuses to open it)");
            return (0, 0);
        }
        if (data.Length != CryptoHeaderExtensionSize)
        {
            Corrupt($"the crypto header extension is {data.Length} bytes long, not {CryptoHeaderExtensionSize} (QEMU refuses to open it)");
            return (0, 0);
        }
        ulong offset = BinaryPrimitives.ReadUInt64BigEndian(data);
        ulong length = BinaryPrimitives.ReadUInt64BigEndian(data[8..]);
        if (offset % (ulong)_cs != 0)
        {
            Corrupt($"the LUKS header offset {offset} is not cluster aligned (QEMU refuses to open it)");
            return (0, 0);
        }
        return (offset, length);
    }

    #endregion

    #region Stored refcounts

    /// <summary>Validate the refcount table and keep the entries that describe clusters of the file.</summary>
    private void LoadRefcountTable()
    {
        Qcow2Header h = _header;
        long declaredBytes = (long)h.RefcountTableClusters << _cb;
        if (h.RefcountTableClusters == 0)
            _report.AddWarning("the image has no refcount table (refcount_table_clusters is 0): every refcount reads as 0");
        if (declaredBytes > Qcow2Limits.MaxRefcountTableBytes)
            Corrupt($"the refcount table is {h.RefcountTableClusters} clusters, more than the {Qcow2Limits.MaxRefcountTableBytes >> 20} MiB QEMU allows (QEMU refuses to open it)");
        if (h.RefcountTableOffset % (ulong)_cs != 0)
            Corrupt($"the refcount table offset 0x{h.RefcountTableOffset:x} is not cluster aligned (QEMU refuses to open it)");
        if (h.RefcountTableOffset >= (ulong)_fileLength)
        {
            _refTableOffset = _fileLength; // nothing of it is in the file: every entry reads as 0
            _refTableEntries = 0;
            return;
        }
        _refTableOffset = (long)h.RefcountTableOffset;
        _refTableEntries = declaredBytes / sizeof(ulong);
        long needed = (_counts.Length + _entriesPerBlock - 1) / _entriesPerBlock;
        long inFile = (_fileLength - _refTableOffset + sizeof(ulong) - 1) / sizeof(ulong);
        long count = Math.Min(Math.Min(_refTableEntries, needed), inFile);
        _refTable = ReadEntries(_refTableOffset, count);
    }

    /// <summary>Read the stored refcounts of the file's clusters once: which are exactly 1 (for the OFLAG_COPIED checks).</summary>
    private void ReadStoredRefcounts()
    {
        var block = new byte[_cs];
        for (long ti = 0; ti < _refTable.Length; ti++)
        {
            ulong raw = _refTable[ti];
            ulong offset = raw & RefTableOffsetMask;
            if (offset == 0)
                continue;
            if (offset % (ulong)_cs != 0)
            {
                _unreadableBlocks.Add(ti);
                continue;
            }
            if (!ReadBlock(offset, block))
                continue; // past the end of the file: all zeros
            long first = ti * _entriesPerBlock;
            long n = Math.Min(_entriesPerBlock, _counts.Length - first);
            for (long j = 0; j < n; j++)
            {
                if (Qcow2RefcountBlock.Get(block, _refcountOrder, j) == 1)
                    _storedIsOne[(int)(first + j)] = true;
            }
        }
    }

    /// <summary>Raw refcount table entry <paramref name="index"/> (0 past the table or the file).</summary>
    private ulong RefTableEntry(long index)
    {
        if (index < _refTable.Length)
            return _refTable[index];
        if (index >= _refTableEntries)
            return 0;
        long pos = _refTableOffset + (index * sizeof(ulong));
        if (pos >= _fileLength)
            return 0;
        Span<byte> b = stackalloc byte[sizeof(ulong)];
        _file.Read(pos, b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    /// <summary>The stored refcount of a cluster, as qcow2_get_refcount reads it; false when its refcount block is misaligned.</summary>
    private bool TryStoredRefcount(long cluster, out ulong value)
    {
        value = 0;
        ulong offset = RefTableEntry(cluster / _entriesPerBlock) & RefTableOffsetMask;
        if (offset == 0)
            return true;
        if (offset % (ulong)_cs != 0)
            return false;
        if (offset >= (ulong)_fileLength)
            return true;
        _lookupBlock ??= new byte[_cs];
        if (_lookupBlockOffset != (long)offset)
        {
            _lookupBlockOffset = -1;
            ReadBlock(offset, _lookupBlock);
            _lookupBlockOffset = (long)offset;
        }
        value = Qcow2RefcountBlock.Get(_lookupBlock, _refcountOrder, cluster % _entriesPerBlock);
        return true;
    }

    /// <summary>Whether the stored refcount of a cluster is exactly 1; false when it cannot be read (misaligned block).</summary>
    private bool TryStoredIsOne(long cluster, out bool isOne)
    {
        if (cluster < _counts.Length)
        {
            isOne = _storedIsOne[(int)cluster];
            return !_unreadableBlocks.Contains(cluster / _entriesPerBlock);
        }
        bool ok = TryStoredRefcount(cluster, out ulong value);
        isOne = value == 1;
        return ok;
    }

    /// <summary>Read one cluster at an aligned offset; false (buffer zeroed) when it is past the end of the file.</summary>
    private bool ReadBlock(ulong offset, byte[] buffer)
    {
        if (offset >= (ulong)_fileLength)
        {
            Array.Clear(buffer);
            return false;
        }
        Consume(buffer.Length);
        _file.Read((long)offset, buffer);
        return true;
    }

    #endregion

    #region Reference counting

    /// <summary>
    /// qcow2_inc_refcounts_imrt: count <paramref name="times"/> references to every cluster of the region. A region
    /// ending a cluster or more past the end of the file is a corruption and is not counted.
    /// </summary>
    private void Inc(ulong offset, ulong size, Use use, long times)
    {
        if (size == 0 || times <= 0)
            return;
        if (offset > long.MaxValue || size > long.MaxValue || (long)offset > long.MaxValue - (long)size
            || (long)offset + (long)size - _fileLength >= _cs)
        {
            Corrupt(times, $"{Describe(use)} at offset 0x{offset:x} ({size} bytes) reaches one cluster or more past the end of the file ({_fileLength} bytes)");
            return;
        }
        long first = (long)offset >> _cb;
        long last = ((long)offset + (long)size - 1) >> _cb;
        for (long k = first; k <= last; k++)
            IncCluster(k, use, times);
    }

    private void IncCluster(long k, Use use, long times)
    {
        if (k >= _counts.Length)
        {
            // Cannot happen: Inc only lets regions end less than a cluster past the end of the file.
            _report.AddCheckError($"internal: a reference to cluster {k} is past the counted range");
            return;
        }
        if (k >= _countLength)
            _countLength = k + 1;
        byte u = _uses[k];
        if ((u & 0xF) == 0)
            _uses[k] = (byte)use;
        else if ((u >> 4) == 0 && (u & 0xF) != (byte)use)
            _uses[k] = (byte)(u | ((byte)use << 4));

        ulong current = GetCount(k);
        ulong room = _refcountMax - current;
        ulong added = (ulong)times <= room ? (ulong)times : room;
        if (added > 0)
            SetCount(k, current + added);
        if ((ulong)times > added)
        {
            Corrupt((long)((ulong)times - added), $"cluster {k} (offset 0x{k << _cb:x}) has more references than a {1 << _refcountOrder}-bit refcount can hold ({_refcountMax}); use 'qemu-img amend -o refcount_bits=...' or 'qemu-img convert'");
        }
    }

    private ulong GetCount(long k)
    {
        byte b = _counts[k];
        return b == byte.MaxValue ? _bigCounts[k] : b;
    }

    private void SetCount(long k, ulong value)
    {
        if (value >= byte.MaxValue)
        {
            _counts[k] = byte.MaxValue;
            _bigCounts[k] = value;
        }
        else
        {
            _counts[k] = (byte)value;
        }
    }

    #endregion

    #region L1 and L2 tables

    private void CheckActiveL1()
    {
        Qcow2Header h = _header;
        // What QEMU checks when opening the image.
        ulong l1Needed = L1EntriesNeeded(h.Size);
        if (h.L1Size < l1Needed)
            Corrupt($"the L1 table has {h.L1Size} entries but the virtual size of {h.Size} bytes needs {l1Needed} (QEMU refuses to open it)");
        if (h.L1Size > MaxL1Entries)
            Corrupt($"the L1 table has {h.L1Size} entries, more than the {Qcow2Limits.MaxL1Bytes >> 20} MiB QEMU allows (QEMU refuses to open it)");
        if (h.L1Size > 0 && h.L1TableOffset % (ulong)_cs != 0)
            Corrupt($"the L1 table offset 0x{h.L1TableOffset:x} is not cluster aligned (QEMU refuses to open it)");
        CheckL1(h.L1TableOffset, h.L1Size, active: true, "the active L1 table");
    }

    private ulong L1EntriesNeeded(ulong size)
    {
        int shift = _cb + _cb - (_subclusters ? 4 : 3); // log2 of the bytes one L1 entry covers
        ulong l1Covers = 1UL << shift;
        return (size >> shift) + ((size & (l1Covers - 1)) != 0 ? 1UL : 0);
    }

    /// <summary>check_refcounts_l1 (and, for the active table, the L1 part of check_oflag_copied).</summary>
    private void CheckL1(ulong l1Offset, uint l1Size, bool active, string name)
    {
        if (l1Size == 0)
            return;
        Inc(l1Offset, (ulong)l1Size * sizeof(ulong), active ? Use.ActiveL1 : Use.SnapshotL1, 1);
        if (l1Offset >= (ulong)_fileLength)
            return; // every entry reads as 0
        long offset = (long)l1Offset;
        long entries = Math.Min(l1Size, (_fileLength - offset + sizeof(ulong) - 1) / sizeof(ulong));
        var chunk = new byte[Math.Min(ChunkBytes, entries * sizeof(ulong))];
        for (long done = 0; done < entries;)
        {
            int n = (int)Math.Min(chunk.Length / sizeof(ulong), entries - done);
            Span<byte> bytes = chunk.AsSpan(0, n * sizeof(ulong));
            Consume(bytes.Length);
            _file.Read(offset + (done * sizeof(ulong)), bytes);
            int pos = 0;
            while (true)
            {
                int nz = bytes[pos..].IndexOfAnyExcept((byte)0);
                if (nz < 0)
                    break;
                int i = (pos + nz) / sizeof(ulong);
                pos = (i + 1) * sizeof(ulong);
                CheckL1Entry(done + i, BinaryPrimitives.ReadUInt64BigEndian(bytes[(i * sizeof(ulong))..]), active, name);
                if (pos >= bytes.Length)
                    break;
            }
            done += n;
        }
    }

    private void CheckL1Entry(long index, ulong entry, bool active, string name)
    {
        if ((entry & L1ReservedMask) != 0)
            Corrupt($"{name} entry {index} (0x{entry:x16}) has reserved bits set");
        ulong l2 = entry & EntryOffsetMask;
        Inc(l2, (ulong)_cs, active ? Use.ActiveL2 : Use.SnapshotL2, 1);
        if (l2 % (ulong)_cs != 0)
            Corrupt($"{name} entry {index} points to an L2 table at offset 0x{l2:x}, which is not cluster aligned");
        bool oflag = false;
        if (active && l2 != 0 && TryStoredIsOne((long)(l2 >> _cb), out bool isOne))
        {
            oflag = true;
            bool copied = (entry & Qcow2L2Entry.CopiedFlag) != 0;
            if (isOne != copied)
            {
                Corrupt($"OFLAG_COPIED L2 cluster: {name} entry {index} (0x{entry:x16}) has the COPIED flag {(copied ? "set" : "clear")} but the L2 table's refcount is {StoredRefcountText((long)(l2 >> _cb))}");
            }
        }
        VisitL2((long)l2, active, oflag);
    }

    /// <summary>Walk an L2 table the first time it is referenced; later references are counted by <see cref="WalkRepeatedL2Tables"/>.</summary>
    private void VisitL2(long l2, bool active, bool oflag)
    {
        if (l2 >= _fileLength)
            return; // reads as zeros: references nothing
        if ((l2 & (_cs - 1)) == 0)
        {
            int index = (int)(l2 >> _cb);
            if (_walkedL2[index])
            {
                AddRepeat(l2, active);
                return;
            }
            _walkedL2[index] = true;
        }
        else if (_walkedUnalignedL2.Contains(l2))
        {
            AddRepeat(l2, active);
            return;
        }
        else if (_walkedUnalignedL2.Count < MaxTrackedUnalignedTables)
        {
            _walkedUnalignedL2.Add(l2);
        }
        WalkL2(l2, active ? 1 : 0, active ? 0 : 1, oflag ? 1 : 0);
    }

    private void AddRepeat(long l2, bool active)
    {
        (long a, long s) = _repeatedL2.GetValueOrDefault(l2);
        _repeatedL2[l2] = active ? (a + 1, s) : (a, s + 1);
    }

    /// <summary>Count the further references to L2 tables referenced more than once, as if each had been walked again.</summary>
    private void WalkRepeatedL2Tables()
    {
        foreach ((long l2, (long active, long snapshot)) in _repeatedL2)
        {
            long oflag = active > 0 && l2 != 0 && TryStoredIsOne(l2 >> _cb, out _) ? active : 0;
            WalkL2(l2, active, snapshot, oflag);
        }
        _repeatedL2.Clear();
    }

    /// <summary>
    /// check_refcounts_l2 for a table referenced <paramref name="active"/> times from the active L1 table and
    /// <paramref name="snapshot"/> times from snapshots, plus the data part of check_oflag_copied
    /// (<paramref name="oflag"/> active references whose L2 refcount could be read).
    /// </summary>
    private void WalkL2(long l2, long active, long snapshot, long oflag)
    {
        long times = active + snapshot;
        Consume(_cs);
        _file.Read(l2, _l2Buffer);
        ReadOnlySpan<byte> table = _l2Buffer;
        long allocated = 0, compressed = 0, fragmented = 0;
        ulong nextContiguous = 0;
        int pos = 0;
        while (pos < table.Length)
        {
            int nz = table[pos..].IndexOfAnyExcept((byte)0);
            if (nz < 0)
                break;
            int i = (pos + nz) / _l2EntrySize;
            pos = (i + 1) * _l2EntrySize;
            ulong entry = BinaryPrimitives.ReadUInt64BigEndian(table[(i * _l2EntrySize)..]);
            ulong bitmap = _subclusters ? BinaryPrimitives.ReadUInt64BigEndian(table[((i * _l2EntrySize) + 8)..]) : 0;
            ClusterType type = Classify(entry);
            if (type != ClusterType.Compressed && (entry & L2StandardReservedMask) != 0)
                Corrupt(times, $"L2 table 0x{l2:x} entry {i} (0x{entry:x16}) has reserved bits set");
            switch (type)
            {
                case ClusterType.Compressed:
                    if ((entry & Qcow2L2Entry.CopiedFlag) != 0)
                    {
                        Corrupt(times, $"L2 table 0x{l2:x} entry {i}: the COPIED flag must never be set on a compressed cluster");
                        entry &= ~Qcow2L2Entry.CopiedFlag;
                    }
                    if (_hasDataFile)
                    {
                        Corrupt(times, $"L2 table 0x{l2:x} entry {i} is a compressed cluster in an image with an external data file");
                        break;
                    }
                    if (bitmap != 0)
                    {
                        Corrupt(times, $"L2 table 0x{l2:x} entry {i} is a compressed cluster with a non-zero subcluster bitmap");
                        break;
                    }
                    (long cOffset, int cLength) = new Qcow2L2Entry(entry).GetCompressedRange(_cb);
                    Inc((ulong)cOffset, (ulong)cLength, Use.Compressed, times);
                    if (active > 0)
                    {
                        allocated++;
                        compressed++;
                        fragmented++; // QEMU counts every compressed cluster as fragmented
                    }
                    break;

                case ClusterType.Normal:
                case ClusterType.ZeroAlloc:
                    ulong offset = entry & EntryOffsetMask;
                    if (((bitmap >> 32) & bitmap) != 0)
                        Corrupt(times, $"L2 table 0x{l2:x} entry {i}: the cluster at 0x{offset:x} has a subcluster both allocated and zero");
                    if (offset % (ulong)_cs != 0)
                    {
                        bool data = _subclusters ? (bitmap & SubclusterAllocMask) != 0 : (entry & Qcow2L2Entry.ZeroFlag) == 0;
                        Corrupt(times, $"L2 table 0x{l2:x} entry {i}: {(data ? "data" : "preallocated zero")} cluster offset 0x{offset:x} is not cluster aligned");
                    }
                    if (active > 0)
                    {
                        allocated++;
                        if (nextContiguous != 0 && offset != nextContiguous)
                            fragmented++;
                        nextContiguous = offset + (ulong)_cs;
                    }
                    if (!_hasDataFile)
                        Inc(offset, (ulong)_cs, Use.Data, times);
                    if (oflag > 0)
                        CheckDataCopied(l2, i, entry, offset, oflag);
                    break;

                case ClusterType.Unallocated:
                    if ((bitmap & SubclusterAllocMask) != 0)
                        Corrupt(times, $"L2 table 0x{l2:x} entry {i} is unallocated but its subcluster bitmap marks subclusters allocated");
                    break;
            }
        }
        _report.AllocatedClusters += allocated * active;
        _report.CompressedClusters += compressed * active;
        _report.FragmentedClusters += fragmented * active;
    }

    private void CheckDataCopied(long l2, int index, ulong entry, ulong offset, long times)
    {
        bool isOne = true;
        if (!_hasDataFile && !TryStoredIsOne((long)(offset >> _cb), out isOne))
            return; // QEMU skips entries whose refcount cannot be read
        bool copied = (entry & Qcow2L2Entry.CopiedFlag) != 0;
        if (isOne == copied)
            return;
        Corrupt(times, $"OFLAG_COPIED data cluster: L2 table 0x{l2:x} entry {index} (0x{entry:x16}) has the COPIED flag {(copied ? "set" : "clear")} but the refcount of cluster 0x{offset:x} is {(_hasDataFile ? "1" : StoredRefcountText((long)(offset >> _cb)))}");
    }

    private ClusterType Classify(ulong entry)
    {
        if ((entry & Qcow2L2Entry.CompressedFlag) != 0)
            return ClusterType.Compressed;
        if ((entry & Qcow2L2Entry.ZeroFlag) != 0 && !_subclusters)
            return (entry & EntryOffsetMask) != 0 ? ClusterType.ZeroAlloc : ClusterType.ZeroPlain;
        if ((entry & EntryOffsetMask) == 0)
            return _hasDataFile && (entry & Qcow2L2Entry.CopiedFlag) != 0 ? ClusterType.Normal : ClusterType.Unallocated;
        return ClusterType.Normal;
    }

    #endregion

    #region Snapshots

    /// <summary>The snapshot table (qcow2_check_read_snapshot_table) and every snapshot's L1 table and L2 tables.</summary>
    private void CheckSnapshots()
    {
        uint count = _header.SnapshotCount;
        ulong tableOffset = _header.SnapshotsOffset;
        if (count > MaxSnapshots)
        {
            _report.AddCheckError($"the snapshot table has {count} entries, more than the {MaxSnapshots} QEMU allows; snapshots are not checked");
            return;
        }
        if (tableOffset % (ulong)_cs != 0 || tableOffset > (ulong)long.MaxValue - ((ulong)count * SnapshotHeaderSize))
        {
            _report.AddCheckError($"the snapshot table offset 0x{tableOffset:x} is invalid; snapshots are not checked");
            return;
        }
        if (count == 0)
            return;
        if (_hasDataFile)
            Corrupt($"the image has {count} snapshots and an external data file");

        var snapshots = new List<(ulong L1Offset, uint L1Size)>((int)Math.Min(count, 1024));
        long incomplete = 0;
        long start = (long)tableOffset;
        long pos = start;
        Span<byte> h = stackalloc byte[SnapshotHeaderSize];
        for (int i = 0; i < count; i++)
        {
            pos = (pos + 7) & ~7L;
            Consume(SnapshotHeaderSize);
            if (pos < 0 || pos >= _fileLength)
                h.Clear(); // reads as zeros past the end of the file (or the offset overflowed; caught below)
            else
                _file.Read(pos, h);
            pos += SnapshotHeaderSize;
            ulong l1Offset = BinaryPrimitives.ReadUInt64BigEndian(h);
            uint l1Size = BinaryPrimitives.ReadUInt32BigEndian(h[8..]);
            ushort idSize = BinaryPrimitives.ReadUInt16BigEndian(h[12..]);
            ushort nameSize = BinaryPrimitives.ReadUInt16BigEndian(h[14..]);
            uint extraSize = BinaryPrimitives.ReadUInt32BigEndian(h[36..]);
            if (extraSize > MaxSnapshotExtraData)
            {
                _report.AddCheckError($"snapshot table entry {i} has {extraSize} bytes of extra data (at most {MaxSnapshotExtraData}); snapshots are not checked");
                return;
            }
            pos += extraSize + idSize + nameSize;
            if (pos < start || pos - start > MaxSnapshotTableBytes)
            {
                _report.AddCheckError($"the snapshot table is larger than {MaxSnapshotTableBytes} bytes; snapshots are not checked");
                return;
            }
            if (_header.Version >= 3 && extraSize < SnapshotMinExtraDataV3)
                incomplete++;
            snapshots.Add((l1Offset, l1Size));
        }
        if (incomplete > 0)
            Corrupt(incomplete, "snapshot table entries are incomplete (version 3 needs at least 16 bytes of extra data)");

        for (int i = 0; i < snapshots.Count; i++)
        {
            (ulong l1Offset, uint l1Size) = snapshots[i];
            if (l1Offset % (ulong)_cs != 0)
            {
                Corrupt($"snapshot {i}: its L1 table offset 0x{l1Offset:x} is not cluster aligned");
                continue;
            }
            if (l1Size > MaxL1Entries)
            {
                Corrupt($"snapshot {i}: its L1 table has {l1Size} entries, more than the {Qcow2Limits.MaxL1Bytes >> 20} MiB QEMU allows");
                continue;
            }
            CheckL1(l1Offset, l1Size, active: false, $"the L1 table of snapshot {i}");
        }
        Inc(tableOffset, (ulong)(pos - start), Use.SnapshotTable, 1);
    }

    #endregion

    #region Bitmaps

    /// <summary>qcow2_check_bitmaps_refcounts: the bitmap directory, each bitmap table and its data clusters.</summary>
    private void CheckBitmaps(Qcow2BitmapsExtension ext)
    {
        Inc(ext.DirectoryOffset, ext.DirectorySize, Use.BitmapDirectory, 1);
        List<(ulong TableOffset, uint TableSize, string Name)>? bitmaps = ReadBitmapDirectory(ext, out string? problem);
        if (bitmaps is null)
        {
            Corrupt($"the bitmap directory at offset 0x{ext.DirectoryOffset:x} is invalid: {problem}; its bitmaps are not checked");
            return;
        }
        foreach ((ulong tableOffset, uint tableSize, string name) in bitmaps)
        {
            Inc(tableOffset, (ulong)tableSize * sizeof(ulong), Use.BitmapTable, 1);
            if (tableOffset >= (ulong)_fileLength)
                continue; // every entry reads as 0
            long offset = (long)tableOffset;
            long entries = Math.Min(tableSize, (_fileLength - offset + sizeof(ulong) - 1) / sizeof(ulong));
            var chunk = new byte[Math.Min(ChunkBytes, entries * sizeof(ulong))];
            for (long done = 0; done < entries;)
            {
                int n = (int)Math.Min(chunk.Length / sizeof(ulong), entries - done);
                Span<byte> bytes = chunk.AsSpan(0, n * sizeof(ulong));
                Consume(bytes.Length);
                _file.Read(offset + (done * sizeof(ulong)), bytes);
                for (int i = 0; i < n; i++)
                {
                    ulong entry = BinaryPrimitives.ReadUInt64BigEndian(bytes[(i * sizeof(ulong))..]);
                    if (entry == 0)
                        continue;
                    ulong dataOffset = entry & EntryOffsetMask;
                    if ((entry & BitmapEntryReservedMask) != 0 || (dataOffset != 0 && ((entry & 1) != 0 || dataOffset % (ulong)_cs != 0)))
                    {
                        Corrupt($"bitmap '{name}': table entry {done + i} (0x{entry:x16}) is invalid");
                        continue;
                    }
                    if (dataOffset != 0)
                        Inc(dataOffset, (ulong)_cs, Use.BitmapData, 1);
                }
                done += n;
            }
        }
    }

    /// <summary>bitmap_list_load with check_dir_entry: the directory entries, or null with the reason QEMU would reject it.</summary>
    private List<(ulong TableOffset, uint TableSize, string Name)>? ReadBitmapDirectory(Qcow2BitmapsExtension ext, out string? problem)
    {
        problem = null;
        if (ext.DirectorySize == 0)
        {
            problem = "its size is 0";
            return null;
        }
        if (ext.DirectoryOffset >= (ulong)_fileLength || ext.DirectorySize > (ulong)_fileLength - ext.DirectoryOffset)
        {
            problem = $"its {ext.DirectorySize} bytes run past the end of the file";
            return null;
        }
        Consume((long)ext.DirectorySize);
        var dir = new byte[ext.DirectorySize];
        _file.Read((long)ext.DirectoryOffset, dir);
        var list = new List<(ulong, uint, string)>();
        int pos = 0;
        while (pos < dir.Length)
        {
            if (dir.Length - pos < Qcow2BitmapDirectoryEntry.FixedSize)
            {
                problem = "an entry runs past its end";
                return null;
            }
            if (list.Count >= ext.BitmapCount)
            {
                problem = $"it holds more entries than the {ext.BitmapCount} the bitmaps extension lists";
                return null;
            }
            ReadOnlySpan<byte> e = dir.AsSpan(pos);
            ulong tableOffset = BinaryPrimitives.ReadUInt64BigEndian(e);
            uint tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            byte type = e[16];
            byte granularityBits = e[17];
            ushort nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            uint extraSize = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            long entrySize = (Qcow2BitmapDirectoryEntry.FixedSize + (long)nameSize + extraSize + 7) & ~7L;
            if (entrySize > dir.Length - pos)
            {
                problem = $"entry {list.Count} runs past its end";
                return null;
            }
            if (extraSize != 0)
            {
                problem = $"entry {list.Count} has extra data, which QEMU does not support";
                return null;
            }
            string name = System.Text.Encoding.UTF8.GetString(e.Slice(Qcow2BitmapDirectoryEntry.FixedSize, nameSize));
            ulong physicalBytes = (ulong)tableSize * (ulong)_cs;
            if (tableSize == 0 || tableOffset == 0 || tableOffset % (ulong)_cs != 0 || tableSize > MaxBitmapTableEntries
                || granularityBits > MaxBitmapGranularityBits || granularityBits < MinBitmapGranularityBits
                || (flags & BitmapReservedFlags) != 0 || nameSize > Qcow2Limits.MaxBitmapNameLength
                || type != Qcow2BitmapDirectoryEntry.DirtyTrackingType
                || physicalBytes > MaxBitmapPhysicalBytes || _header.Size > (physicalBytes * 8) << granularityBits)
            {
                problem = $"bitmap '{name}' does not satisfy QEMU's constraints (table at 0x{tableOffset:x}, {tableSize} entries, granularity 2^{granularityBits}, flags 0x{flags:x}, type {type})";
                return null;
            }
            list.Add((tableOffset, tableSize, name));
            pos += (int)entrySize;
        }
        if (list.Count != ext.BitmapCount)
        {
            problem = $"it holds {list.Count} entries but the bitmaps extension lists {ext.BitmapCount}";
            return null;
        }
        return list;
    }

    #endregion

    #region Refcount blocks and comparison

    /// <summary>check_refblocks: every refcount table entry; each block must be referenced exactly once.</summary>
    private void CheckRefcountBlocks()
    {
        long inFile = _refTableOffset >= _fileLength ? 0 : (_fileLength - _refTableOffset + sizeof(ulong) - 1) / sizeof(ulong);
        long entries = Math.Min(_refTableEntries, inFile);
        for (long ti = 0; ti < _refTable.Length; ti++)
            CheckRefcountTableEntry(ti, _refTable[ti]);
        if (entries <= _refTable.Length)
            return;
        var chunk = new byte[ChunkBytes];
        for (long ti = _refTable.Length; ti < entries;)
        {
            int n = (int)Math.Min(ChunkBytes / sizeof(ulong), entries - ti);
            Span<byte> bytes = chunk.AsSpan(0, n * sizeof(ulong));
            Consume(bytes.Length);
            _file.Read(_refTableOffset + (ti * sizeof(ulong)), bytes);
            int pos = 0;
            while (pos < bytes.Length)
            {
                int nz = bytes[pos..].IndexOfAnyExcept((byte)0);
                if (nz < 0)
                    break;
                int i = (pos + nz) / sizeof(ulong);
                pos = (i + 1) * sizeof(ulong);
                CheckRefcountTableEntry(ti + i, BinaryPrimitives.ReadUInt64BigEndian(bytes[(i * sizeof(ulong))..]));
            }
            ti += n;
        }
    }

    private void CheckRefcountTableEntry(long index, ulong raw)
    {
        if (raw == 0)
            return;
        if ((raw & RefTableReservedMask) != 0)
        {
            Corrupt($"refcount table entry {index} (0x{raw:x16}) has reserved bits set");
            return;
        }
        ulong offset = raw & RefTableOffsetMask;
        if (offset % (ulong)_cs != 0)
        {
            Corrupt($"refcount block {index} at offset 0x{offset:x} is not cluster aligned");
            return;
        }
        ulong cluster = offset >> _cb;
        if (cluster >= (ulong)_countLength)
        {
            Corrupt($"refcount block {index} at offset 0x{offset:x} is outside the image ({_fileLength} bytes)");
            return;
        }
        Inc(offset, (ulong)_cs, Use.RefcountBlock, 1);
        ulong references = GetCount((long)cluster);
        if (references != 1)
            Corrupt($"refcount block {index} at offset 0x{offset:x} is referenced {references} times ({UsesOf((long)cluster)})");
    }

    /// <summary>compare_refcounts: stored refcount against references for every cluster of the file.</summary>
    private void CompareRefcounts()
    {
        var block = new byte[_cs];
        long loadedIndex = -1;
        bool blockZero = true, blockUnreadable = false;
        long highest = 0;
        long unreadableClusters = 0;
        for (long i = 0; i < _countLength; i++)
        {
            long ti = i / _entriesPerBlock;
            if (ti != loadedIndex)
            {
                FlushUnreadable(loadedIndex, ref unreadableClusters);
                loadedIndex = ti;
                ulong offset = RefTableEntry(ti) & RefTableOffsetMask;
                blockUnreadable = offset != 0 && offset % (ulong)_cs != 0;
                blockZero = offset == 0 || blockUnreadable || !ReadBlock(offset, block);
            }
            if (blockUnreadable)
            {
                unreadableClusters++;
                continue;
            }
            ulong stored = blockZero ? 0 : Qcow2RefcountBlock.Get(block, _refcountOrder, i % _entriesPerBlock);
            ulong expected = GetCount(i);
            if (stored > 0 || expected > 0)
                highest = i;
            if (stored == expected)
                continue;
            if (stored < expected)
                Corrupt($"cluster {i} (offset 0x{i << _cb:x}) has refcount {stored} but {expected} references ({UsesOf(i)}){(IsMetadataOverlap(i, expected) ? "; metadata overlaps" : "")}");
            else
                _report.AddLeak(i << _cb);
        }
        FlushUnreadable(loadedIndex, ref unreadableClusters);
        _report.ImageEndOffset = (highest + 1) << _cb;
    }

    private void FlushUnreadable(long tableIndex, ref long clusters)
    {
        if (clusters == 0)
            return;
        _report.AddCheckError($"the refcounts of {clusters} clusters cannot be read: refcount table entry {tableIndex} points to a block that is not cluster aligned", clusters);
        clusters = 0;
    }

    #endregion

    #region Messages and limits

    private void Corrupt(string message) => _report.AddCorruption(message, 1);

    private void Corrupt(long count, string message) => _report.AddCorruption(message, count);

    /// <summary>Count a corruption; the message is only formatted while the report still keeps messages.</summary>
    private void Corrupt([InterpolatedStringHandlerArgument("")] ref MessageHandler message) => Corrupt(1, ref message);

    private void Corrupt(long count, [InterpolatedStringHandlerArgument("")] ref MessageHandler message)
    {
        if (message.Enabled)
            _report.AddCorruption(message.ToStringAndClear(), count);
        else
            _report.AddCorruption("", count);
    }

    /// <summary>Formats a message only when the report still wants one (hostile images can have millions of corruptions).</summary>
    [InterpolatedStringHandler]
    private ref struct MessageHandler
    {
        private DefaultInterpolatedStringHandler _inner;

        public MessageHandler(int literalLength, int formattedCount, Qcow2Checker checker, out bool enabled)
        {
            Enabled = enabled = checker._report.WantsCorruptionMessage;
            _inner = enabled ? new DefaultInterpolatedStringHandler(literalLength, formattedCount, CultureInfo.InvariantCulture) : default;
        }

        public bool Enabled { get; }

        public void AppendLiteral(string value) => _inner.AppendLiteral(value);

        public void AppendFormatted<T>(T value) => _inner.AppendFormatted(value);

        public void AppendFormatted<T>(T value, string? format) => _inner.AppendFormatted(value, format);

        public string ToStringAndClear() => _inner.ToStringAndClear();
    }

    private string StoredRefcountText(long cluster)
    {
        return TryStoredRefcount(cluster, out ulong value) ? value.ToString(CultureInfo.InvariantCulture) : "unreadable";
    }

    private string UsesOf(long cluster)
    {
        byte u = _uses[cluster];
        Use first = (Use)(u & 0xF), second = (Use)(u >> 4);
        if (first == Use.None)
            return "nothing references it";
        return second == Use.None ? $"all by {Describe(first)}" : $"by {Describe(first)} and {Describe(second)}";
    }

    private bool IsMetadataOverlap(long cluster, ulong references)
    {
        byte u = _uses[cluster];
        Use first = (Use)(u & 0xF), second = (Use)(u >> 4);
        if (references < 2)
            return false;
        if (second != Use.None)
            return IsMetadata(first) || IsMetadata(second);
        return IsMetadata(first) && first is not (Use.ActiveL2 or Use.SnapshotL2); // L2 tables may be shared with snapshots
    }

    private static bool IsMetadata(Use use) => use is not (Use.None or Use.Data or Use.Compressed);

    private static string Describe(Use use) => use switch
    {
        Use.Header => "the image header",
        Use.ActiveL1 => "the active L1 table",
        Use.ActiveL2 => "an active L2 table",
        Use.Data => "a data cluster",
        Use.Compressed => "compressed data",
        Use.SnapshotTable => "the snapshot table",
        Use.SnapshotL1 => "a snapshot L1 table",
        Use.SnapshotL2 => "a snapshot L2 table",
        Use.RefcountTable => "the refcount table",
        Use.RefcountBlock => "a refcount block",
        Use.BitmapDirectory => "the bitmap directory",
        Use.BitmapTable => "a bitmap table",
        Use.BitmapData => "bitmap data",
        Use.CryptoHeader => "the LUKS header",
        _ => "nothing",
    };

    private ulong[] ReadEntries(long offset, long count)
    {
        var entries = new ulong[count];
        var chunk = new byte[Math.Min(ChunkBytes, count * sizeof(ulong))];
        for (long done = 0; done < count;)
        {
            int n = (int)Math.Min(chunk.Length / sizeof(ulong), count - done);
            Span<byte> bytes = chunk.AsSpan(0, n * sizeof(ulong));
            Consume(bytes.Length);
            _file.Read(offset + (done * sizeof(ulong)), bytes);
            for (int i = 0; i < n; i++)
                entries[done + i] = BinaryPrimitives.ReadUInt64BigEndian(bytes[(i * sizeof(ulong))..]);
            done += n;
        }
        return entries;
    }

    private void Consume(long bytes)
    {
        _budgetUsed += bytes;
        if (_budgetUsed > _budgetLimit)
            throw new BudgetExceededException();
    }

    private sealed class BudgetExceededException : Exception
    {
    }

    #endregion
}
