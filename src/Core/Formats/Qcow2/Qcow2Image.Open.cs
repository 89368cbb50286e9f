using System.Text;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Formats.Qcow2;

public sealed partial class Qcow2Image
{
    /// <summary>
    /// Open a qcow2 image and its backing chain. Backing images are opened read-only (raw or qcow2, as the image
    /// records or, when it does not, as <see cref="ImageProbe"/> detects); relative backing names are resolved
    /// against the folder of the image that names them. The chain is walked iteratively and has no fixed depth (nor
    /// has QEMU's); a loop is refused. An error below the top names both <paramref name="path"/> and the image at fault.
    /// </summary>
    /// <exception cref="BlockException">
    /// ImageNotFound, ImageInUse, UnsupportedFormat (not qcow2), ImageCorrupt, UnsupportedImageFeature (naming the
    /// feature: encryption, external data file, extended L2, a compression type other than deflate and zstd, unknown bits,
    /// internal snapshots when writing),
    /// BackingFileNotFound, BackingChainLoop, TooManyOpenFiles.
    /// </exception>
    /// <remarks>Every file of the chain takes QEMU's image locks (the image as a writer or a reader, its backing
    /// files as readers), or none with <paramref name="forceShare"/>, which only a read-only open may ask for. The
    /// descriptors of backing files count against <see cref="IO.FileHandleBudget"/>: beyond it, idle ones are
    /// closed and reopened at their next use.</remarks>
    public static Qcow2Image Open(string path, bool readOnly, bool forceShare = false)
    {
        string fullPath = System.IO.Path.GetFullPath(path);
        Qcow2Image image = OpenOne(new Qcow2File(fullPath, ImageFiles.Open(fullPath, readOnly, forceShare)), readOnly);
        try
        {
            image.OpenBackingChain(forceShare);
            return image;
        }
        catch
        {
            image.DisposeAfterFailedOpen();
            throw;
        }
    }

    private static Qcow2Image OpenOne(Qcow2File file, bool readOnly)
    {
        try
        {
            return Load(file, readOnly);
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    /// <summary>Nothing written back: the image was never in use.</summary>
    private void DisposeAfterFailedOpen()
    {
        _disposed = true;
        _file.Dispose();
        DisposeBackingChain();
    }

    /// <summary>
    /// Open every image below this one, nearest first, in a loop (no recursion: a chain may be thousands deep).
    /// An error in an image below the first backing file is reported as an error of this chain, naming both.
    /// </summary>
    private void OpenBackingChain(bool forceShare)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal) { Path };
        Qcow2Image current = this;
        int depth = 0;
        try
        {
            while (current.BackingFile is not null)
            {
                (string backingPath, ImageFormat format) = current.ResolveBacking(seen);
                IBlockImage backing = format == ImageFormat.Qcow2
                    ? OpenOne(new Qcow2File(ParkableFileHandle.Open(backingPath, forceShare)), readOnly: true)
                    : RawImage.Open(backingPath, readOnly: true, forceShare);
                current._backing = backing;
                current._backingFormat = format;
                seen.Add(backingPath);
                depth++;
                if (backing is not Qcow2Image next)
                    break;
                current = next;
            }
        }
        catch (BlockException e) when (current != this)
        {
            throw new BlockException(e.ErrorId, e.Category,
                $"The backing chain of '{Path}' is broken {depth} image{(depth == 1 ? "" : "s")} below it, at '{current.Path}': {e.Message}", Path, e);
        }
    }

    /// <summary>The full path and format of this image's backing file, refusing a loop or a missing file.</summary>
    private (string Path, ImageFormat Format) ResolveBacking(HashSet<string> chain)
    {
        string name = BackingFile!;
        if (name.StartsWith("json:", StringComparison.Ordinal))
            Qcow2Errors.Unsupported(Path, $"a json: backing file specification ('{name}')");
        string folder = System.IO.Path.GetDirectoryName(Path) ?? "/";
        string backingPath;
        try
        {
            backingPath = System.IO.Path.GetFullPath(System.IO.Path.IsPathRooted(name) ? name : System.IO.Path.Combine(folder, name));
        }
        catch (Exception e) when (e is ArgumentException or IOException or NotSupportedException)
        {
            throw new BlockException(ErrorIds.BackingFileNotFound, BlockErrorCategory.ObjectNotFound,
                $"The backing file name '{name}' of image '{Path}' is not a usable path: {e.Message}", Path, e);
        }
        if (chain.Contains(backingPath))
            Throw.Block(ErrorIds.BackingChainLoop, BlockErrorCategory.InvalidData,
                $"The backing chain of '{Path}' loops: '{backingPath}' is already part of the chain.", Path);
        if (!File.Exists(backingPath))
            Throw.Block(ErrorIds.BackingFileNotFound, BlockErrorCategory.ObjectNotFound,
                $"The backing file '{name}' of image '{Path}' was not found (looked for '{backingPath}').", Path);

        if (_extensions.BackingFormat is { } recorded)
        {
            ImageFormat format = ImageProbe.ParseFormatName(recorded)
                ?? throw new BlockException(ErrorIds.UnsupportedFormat, BlockErrorCategory.NotImplemented,
                    $"The backing file '{name}' of image '{Path}' has format '{recorded}', which is not supported (raw and qcow2 are).", Path);
            return (backingPath, format);
        }
        return (backingPath, ImageProbe.Detect(backingPath));
    }

    /// <summary>Read and check the header, extensions and tables. Nothing is trusted before it is checked.</summary>
    private static Qcow2Image Load(Qcow2File file, bool readOnly)
    {
        string path = file.Path;
        long fileLength = file.Length;
        Span<byte> first = stackalloc byte[Qcow2Header.V3Length];
        first.Clear();
        file.Read(0, first);
        if (!IsQcow2(first))
            Throw.Block(ErrorIds.UnsupportedFormat, BlockErrorCategory.InvalidData, $"'{path}' is not a qcow2 image (no qcow2 magic).", path);
        if (fileLength < Qcow2Header.V2Length)
            Qcow2Errors.Corrupt(path, $"the file is {fileLength} bytes long, shorter than a qcow2 header");
        Qcow2Header header = Qcow2Header.ReadFrom(first);
        if (header.Version is not (2 or 3))
            Qcow2Errors.Unsupported(path, $"qcow2 version {header.Version} (only versions 2 and 3 are supported)");
        CheckHeader(header, path, fileLength);

        int cb = (int)header.ClusterBits;
        long cs = 1L << cb;
        var regions = new Qcow2MetadataRegions(cb);

        // Cluster 0 past the header: extensions, then the backing file name.
        var cluster0 = new byte[(int)Math.Min(cs, fileLength)];
        file.Read(0, cluster0);
        string? backingFile = null;
        long extensionsEnd = Math.Min(cs, fileLength);
        if (header.BackingFileOffset != 0)
        {
            if (header.BackingFileSize > Qcow2Limits.MaxBackingFileNameLength)
                Qcow2Errors.Corrupt(path, $"the backing file name is {header.BackingFileSize} bytes long (at most {Qcow2Limits.MaxBackingFileNameLength})");
            if (header.BackingFileOffset < header.HeaderLength || header.BackingFileOffset > (ulong)cs
                || header.BackingFileOffset + header.BackingFileSize > (ulong)Math.Min(cs, fileLength))
                Qcow2Errors.Corrupt(path, $"the backing file name at offset {header.BackingFileOffset} ({header.BackingFileSize} bytes) is not inside the first cluster after the header");
            if (header.BackingFileSize > 0)
                backingFile = Encoding.UTF8.GetString(cluster0, (int)header.BackingFileOffset, (int)header.BackingFileSize);
            if (backingFile is not null && backingFile.Contains('\0', StringComparison.Ordinal))
                Qcow2Errors.Corrupt(path, "the backing file name contains a NUL byte");
            extensionsEnd = Math.Min(extensionsEnd, (long)header.BackingFileOffset);
        }
        Qcow2HeaderExtensions extensions = Qcow2HeaderExtensions.ReadFrom(
            cluster0.AsSpan((int)header.HeaderLength, (int)Math.Max(0, extensionsEnd - header.HeaderLength)), path);
        CheckFeatures(header, extensions, path, readOnly);

        // The fixed tables must be inside the file and must not overlap each other or the header.
        long roundedLength = (fileLength + cs - 1) & ~(cs - 1);
        long l1Bytes = (long)header.L1Size * sizeof(ulong);
        long clusters = (long)((header.Size + (ulong)cs - 1) >> cb);
        long l1Needed = (clusters + (cs / sizeof(ulong)) - 1) / (cs / sizeof(ulong));
        if (l1Bytes > Qcow2Limits.MaxL1Bytes)
            Qcow2Errors.Corrupt(path, $"the L1 table has {header.L1Size} entries, more than the {Qcow2Limits.MaxL1Bytes >> 20} MiB QEMU allows");
        if (header.L1Size < l1Needed)
            Qcow2Errors.Corrupt(path, $"the L1 table has {header.L1Size} entries but the virtual size of {header.Size} bytes needs {l1Needed}");
        if (l1Bytes > 0)
            CheckTable(path, "the L1 table", header.L1TableOffset, l1Bytes, cs, roundedLength);
        regions.SetFixed(Qcow2MetadataRegions.L1Name, (long)header.L1TableOffset, l1Bytes);

        long refcountTableBytes = (long)header.RefcountTableClusters << cb;
        if (header.RefcountTableClusters == 0)
            Qcow2Errors.Corrupt(path, "the refcount table is empty (refcount_table_clusters is 0)");
        if (refcountTableBytes > Qcow2Limits.MaxRefcountTableBytes)
            Qcow2Errors.Corrupt(path, $"the refcount table is {header.RefcountTableClusters} clusters, more than the {Qcow2Limits.MaxRefcountTableBytes >> 20} MiB QEMU allows");
        CheckTable(path, "the refcount table", header.RefcountTableOffset, refcountTableBytes, cs, roundedLength);
        if (regions.FixedOverlap((long)(header.RefcountTableOffset >> cb), header.RefcountTableClusters) is { } overlapped)
            Qcow2Errors.Corrupt(path, $"the refcount table at offset {header.RefcountTableOffset} overlaps {overlapped}");
        regions.SetFixed(Qcow2MetadataRegions.RefcountTableName, (long)header.RefcountTableOffset, refcountTableBytes);
        if (l1Bytes > 0 && (long)(header.L1TableOffset >> cb) == 0)
            Qcow2Errors.Corrupt(path, "the L1 table overlaps the image header");

        if (header.SnapshotCount > 0 && (header.SnapshotsOffset % (ulong)cs != 0 || header.SnapshotsOffset == 0 || header.SnapshotsOffset >= (ulong)fileLength))
            Qcow2Errors.Corrupt(path, $"the snapshot table offset {header.SnapshotsOffset} is not a cluster inside the file");

        IReadOnlyList<Qcow2BitmapDirectoryEntry> bitmaps = LoadBitmapDirectory(file, header, extensions, regions, cs);

        // Tables. Each entry is checked once here, so the I/O paths can trust them.
        Qcow2L1Table l1 = Qcow2L1Table.Load(file, (long)header.L1TableOffset, (int)header.L1Size);
        var refcountTable = Qcow2RefcountTable.Load(file, (long)header.RefcountTableOffset, (int)header.RefcountTableClusters, cb);
        for (int i = 0; i < refcountTable.Count; i++)
        {
            ulong raw = refcountTable.RawEntry(i);
            if (raw == 0)
                continue;
            if ((raw & (ulong)(cs - 1)) != 0)
                Qcow2Errors.Corrupt(path, $"refcount table entry {i} ({raw:x}) is not a cluster-aligned offset");
            if (raw >= (ulong)fileLength)
                Qcow2Errors.Corrupt(path, $"refcount block {i} at offset {raw} is past the end of the file ({fileLength} bytes)");
            long block = (long)raw;
            if (regions.Describe(block >> cb) is { } what)
                Qcow2Errors.Corrupt(path, $"refcount block {i} at offset {block} overlaps {what}");
            regions.AddRefcountBlock(block >> cb);
        }
        for (int i = 0; i < l1.Count; i++)
        {
            long l2 = l1.L2Offset(i);
            if (l2 == 0)
                continue;
            if ((l2 & (cs - 1)) != 0)
                Qcow2Errors.Corrupt(path, $"L1 entry {i} points to offset {l2}, which is not cluster aligned");
            if (l2 >= roundedLength)
                Qcow2Errors.Corrupt(path, $"L1 entry {i} points to an L2 table at offset {l2}, past the end of the file ({fileLength} bytes)");
            if (regions.Describe(l2 >> cb) is { } what)
                Qcow2Errors.Corrupt(path, $"the L2 table of L1 entry {i} at offset {l2} overlaps {what}");
            regions.AddL2Table(l2 >> cb);
        }

        var refcounts = new Qcow2Refcounts(file, refcountTable, regions, cb, (int)header.RefcountOrder);
        Qcow2Allocator? allocator = readOnly ? null : Qcow2Allocator.Create(file, refcounts, regions, header);
        return new Qcow2Image(file, header, extensions, backingFile, bitmaps, regions, l1, refcounts, allocator);
    }

    /// <summary>Fields that decide how everything else is read.</summary>
    private static void CheckHeader(Qcow2Header header, string path, long fileLength)
    {
        if (header.ClusterBits < Qcow2Limits.MinClusterBits)
            Qcow2Errors.Corrupt(path, $"cluster_bits is {header.ClusterBits} (at least {Qcow2Limits.MinClusterBits})");
        if (header.ClusterBits > Qcow2Limits.MaxClusterBits)
            Qcow2Errors.Unsupported(path, $"cluster size 2^{header.ClusterBits} bytes (at most 2 MiB)");
        long cs = 1L << (int)header.ClusterBits;
        if (header.Version >= 3)
        {
            if (header.HeaderLength < Qcow2Header.V3MinLength || header.HeaderLength % 8 != 0 || header.HeaderLength > cs)
                Qcow2Errors.Corrupt(path, $"header_length is {header.HeaderLength} (a multiple of 8 from {Qcow2Header.V3MinLength} to the cluster size)");
            if (header.HeaderLength > fileLength)
                Qcow2Errors.Corrupt(path, $"the header is {header.HeaderLength} bytes long but the file only {fileLength}");
            if (header.RefcountOrder > Qcow2Limits.MaxRefcountOrder)
                Qcow2Errors.Corrupt(path, $"refcount_order is {header.RefcountOrder} (at most {Qcow2Limits.MaxRefcountOrder})");
        }
        else
        {
            header.HeaderLength = Qcow2Header.V2Length;
            header.RefcountOrder = 4;
        }
        // Sizes beyond 2^62 cannot be addressed by any L1 table QEMU accepts; rejecting them keeps arithmetic safe.
        if (header.Size > (1UL << 62))
            Qcow2Errors.Corrupt(path, $"the virtual size {header.Size} is impossibly large");
        if (header.L1Size > 0 && header.L1TableOffset == 0)
            Qcow2Errors.Corrupt(path, "the L1 table offset is 0");
    }

    /// <summary>Refuse features we cannot honour, naming each; refuse writing where QEMU does.</summary>
    private static void CheckFeatures(Qcow2Header header, Qcow2HeaderExtensions extensions, string path, bool readOnly)
    {
        var unsupported = new List<string>();
        if (header.CryptMethod != 0)
            unsupported.Add(header.CryptMethod switch
            {
                1 => "encryption (crypt_method 1, AES)",
                2 => "encryption (crypt_method 2, LUKS)",
                _ => $"encryption (crypt_method {header.CryptMethod})",
            });
        ulong incompatible = header.IncompatibleFeatures;
        if ((incompatible & (ulong)Qcow2IncompatibleFeatures.ExternalDataFile) != 0)
            unsupported.Add($"external data file{(extensions.DataFile is { } df ? $" '{df}'" : "")} (incompatible bit 2)");
        if ((incompatible & (ulong)Qcow2IncompatibleFeatures.CompressionType) != 0)
        {
            if (header.HeaderLength <= Qcow2Header.CompressionTypeOffset)
                Qcow2Errors.Corrupt(path, "the compression type bit is set but the header has no compression_type field");
            if (header.CompressionType == 0)
                Qcow2Errors.Corrupt(path, "the compression type bit is set but compression_type is 0 (deflate)");
            if (header.CompressionType != (byte)Qcow2CompressionType.Zstd)
                unsupported.Add($"compression type {header.CompressionType}");
        }
        else if (header.CompressionType != 0)
        {
            Qcow2Errors.Corrupt(path, $"compression_type is {header.CompressionType} but the compression type bit is not set");
        }
        if ((incompatible & (ulong)Qcow2IncompatibleFeatures.ExtendedL2) != 0)
            unsupported.Add("extended L2 entries (subclusters, incompatible bit 4)");
        const ulong known = (ulong)(Qcow2IncompatibleFeatures.Dirty | Qcow2IncompatibleFeatures.Corrupt | Qcow2IncompatibleFeatures.ExternalDataFile
            | Qcow2IncompatibleFeatures.CompressionType | Qcow2IncompatibleFeatures.ExtendedL2);
        for (int bit = 0; bit < 64; bit++)
        {
            if ((incompatible & ~known & (1UL << bit)) != 0)
            {
                string? name = extensions.FeatureNames.NameOf(Qcow2FeatureNameTable.IncompatibleType, bit);
                unsupported.Add(name is null ? $"unknown incompatible feature bit {bit}" : $"'{name}' (incompatible bit {bit})");
            }
        }
        if (!readOnly && header.SnapshotCount > 0)
            unsupported.Add($"internal snapshots ({header.SnapshotCount}) when writing; open the image read-only");
        if (unsupported.Count > 0)
            Qcow2Errors.Unsupported(path, string.Join(", ", unsupported));

        if (!readOnly && (incompatible & (ulong)Qcow2IncompatibleFeatures.Corrupt) != 0)
            Qcow2Errors.Corrupt(path, "QEMU marked it corrupt (incompatible bit 1), so it can only be opened read-only; repair it with 'qemu-img check -r all'");
        if (!readOnly && (incompatible & (ulong)Qcow2IncompatibleFeatures.Dirty) != 0)
            Qcow2Errors.Corrupt(path, "it was not closed cleanly while using lazy refcounts (dirty bit set), so its refcounts may be wrong; run 'qemu-img check -r all' before writing to it");
    }

    private static void CheckTable(string path, string name, ulong offset, long bytes, long cs, long roundedLength)
    {
        if (offset % (ulong)cs != 0)
            Qcow2Errors.Corrupt(path, $"{name} offset {offset} is not cluster aligned");
        if (offset > (ulong)roundedLength || (long)offset + bytes > roundedLength)
            Qcow2Errors.Corrupt(path, $"{name} at offset {offset} ({bytes} bytes) runs past the end of the file ({roundedLength} bytes)");
    }

    /// <summary>The bitmap directory, when the bitmaps extension exists and is marked consistent.</summary>
    private static IReadOnlyList<Qcow2BitmapDirectoryEntry> LoadBitmapDirectory(Qcow2File file, Qcow2Header header,
        Qcow2HeaderExtensions extensions, Qcow2MetadataRegions regions, long cs)
    {
        string path = file.Path;
        if (extensions.Bitmaps is not { } ext || (header.AutoclearFeatures & (ulong)Qcow2AutoclearFeatures.Bitmaps) == 0)
            return [];
        if (ext.BitmapCount == 0 || ext.BitmapCount > Qcow2Limits.MaxBitmaps)
            Qcow2Errors.Corrupt(path, $"the bitmaps extension lists {ext.BitmapCount} bitmaps (1-{Qcow2Limits.MaxBitmaps} allowed)");
        if (ext.DirectorySize == 0 || ext.DirectorySize > Qcow2Limits.MaxBitmapDirectoryBytes)
            Qcow2Errors.Corrupt(path, $"the bitmap directory is {ext.DirectorySize} bytes (at most {Qcow2Limits.MaxBitmapDirectoryBytes})");
        if (ext.DirectoryOffset % (ulong)cs != 0 || ext.DirectoryOffset == 0 || ext.DirectoryOffset + ext.DirectorySize > (ulong)file.Length)
            Qcow2Errors.Corrupt(path, $"the bitmap directory at offset {ext.DirectoryOffset} ({ext.DirectorySize} bytes) is not an aligned range inside the file");
        if (regions.FixedOverlap((long)(ext.DirectoryOffset / (ulong)cs), (long)((ext.DirectorySize + (ulong)cs - 1) / (ulong)cs)) is { } what)
            Qcow2Errors.Corrupt(path, $"the bitmap directory overlaps {what}");
        var directory = new byte[ext.DirectorySize];
        file.Read((long)ext.DirectoryOffset, directory);
        List<Qcow2BitmapDirectoryEntry>? entries = Qcow2BitmapDirectoryEntry.ReadDirectory(directory, (long)ext.DirectoryOffset, (int)ext.BitmapCount, out string? problem);
        if (entries is null)
            Qcow2Errors.Corrupt(path, problem!);
        regions.SetFixed(Qcow2MetadataRegions.BitmapDirectoryName, (long)ext.DirectoryOffset, (long)ext.DirectorySize);
        return entries;
    }
}
