using System.Numerics;
using System.Text;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Formats.Qcow2;

public sealed partial class Qcow2Image
{
    /// <summary>Default cluster size, as qemu-img: 64 KiB.</summary>
    public const int DefaultClusterSize = 65536;

    /// <summary>
    /// Create an empty qcow2 v3 image (refcount_order 4, no extended L2, deflate compression type) of
    /// <paramref name="size"/> bytes. A backing file name is stored as given; a relative one is relative to the new
    /// image's folder, as in QEMU. The backing format extension is written from <paramref name="backingFormat"/> or,
    /// when that is null and the backing file exists, from probing it.
    /// </summary>
    /// <remarks>
    /// Layout, as qemu-img makes it for small images: cluster 0 header + extensions + backing name, then the
    /// refcount table, the refcount block(s) and the L1 table, all counted with refcount 1. Larger images or small
    /// clusters get as many table/block clusters as the layout needs.
    /// </remarks>
    /// <exception cref="BlockException">
    /// InvalidImageSize (not a positive multiple of 512, or too large for the cluster size), InvalidClusterSize,
    /// BackingFileNameTooLong, ImageAlreadyExists, ImageNotFound (folder missing), ImageIOFailed.
    /// </exception>
    /// <param name="durable">Sync the new image before returning; false for scratch images (a backup's '.partial' file,
    /// synced once at its commit).</param>
    /// <param name="compression">The compression type of compressed clusters: deflate (0, what every QEMU reads) or zstd
    /// (1: incompatible feature bit 3 set, compression_type 1; QEMU 5.1 and later).</param>
    public static void Create(string path, long size, int clusterSize = DefaultClusterSize, string? backingFile = null, ImageFormat? backingFormat = null, bool durable = true,
        Qcow2CompressionType compression = Qcow2CompressionType.Deflate)
    {
        string fullPath = System.IO.Path.GetFullPath(path);
        if (size <= 0 || size % 512 != 0)
            Throw.Block(ErrorIds.InvalidImageSize, BlockErrorCategory.InvalidArgument,
                $"Size {size} for image '{fullPath}' must be a positive multiple of 512 bytes.", fullPath);
        if (clusterSize < 1 << Qcow2Limits.MinClusterBits || clusterSize > 1 << Qcow2Limits.MaxClusterBits || !BitOperations.IsPow2(clusterSize))
            Throw.Block(ErrorIds.InvalidClusterSize, BlockErrorCategory.InvalidArgument,
                $"Cluster size {clusterSize} for image '{fullPath}' must be a power of two from 512 bytes to 2 MiB.", fullPath);
        int cb = BitOperations.Log2((uint)clusterSize);
        long cs = clusterSize;
        long l1Size = L1EntriesFor(size, cb);
        if (l1Size * sizeof(ulong) > Qcow2Limits.MaxL1Bytes)
            Throw.Block(ErrorIds.InvalidImageSize, BlockErrorCategory.InvalidArgument,
                $"Size {size} is too large for a qcow2 image with {clusterSize}-byte clusters (the L1 table would exceed {Qcow2Limits.MaxL1Bytes >> 20} MiB); use larger clusters.", fullPath);

        string? formatName = null;
        byte[] backingName = [];
        if (backingFile is not null)
        {
            backingName = Encoding.UTF8.GetBytes(backingFile);
            if (backingName.Length == 0 || backingName.Length > Qcow2Limits.MaxBackingFileNameLength)
                Throw.Block(ErrorIds.BackingFileNameTooLong, BlockErrorCategory.InvalidArgument,
                    $"The backing file name for image '{fullPath}' must be 1 to {Qcow2Limits.MaxBackingFileNameLength} bytes long (it is {backingName.Length}).", fullPath);
            if (backingFormat is null)
            {
                string folder = System.IO.Path.GetDirectoryName(fullPath) ?? "/";
                string resolved = System.IO.Path.IsPathRooted(backingFile) ? backingFile : System.IO.Path.Combine(folder, backingFile);
                if (File.Exists(resolved))
                    backingFormat = ImageProbe.Detect(resolved);
            }
            formatName = backingFormat is { } f ? ImageProbe.FormatName(f) : null;
        }
        int extensionsLength = Qcow2HeaderExtensions.SizeFor(formatName);
        long backingOffset = Qcow2Header.V3Length + extensionsLength;
        if (backingOffset + backingName.Length > cs)
            Throw.Block(ErrorIds.BackingFileNameTooLong, BlockErrorCategory.InvalidArgument,
                $"The backing file name for image '{fullPath}' ({backingName.Length} bytes) does not fit in the first {clusterSize}-byte cluster; use a shorter name or larger clusters.", fullPath);

        // Layout: header | refcount table (T) | refcount blocks (B) | L1 table, every cluster counted once.
        long entriesPerBlock = Qcow2RefcountBlock.EntriesPerBlock(cb, 4);
        long l1Clusters = Math.Max(1, ((l1Size * sizeof(ulong)) + cs - 1) >> cb);
        long tableClusters = 1, blocks = 1;
        while (true)
        {
            long total = 1 + tableClusters + blocks + l1Clusters;
            long b = (total + entriesPerBlock - 1) / entriesPerBlock;
            long t = ((b * sizeof(ulong)) + cs - 1) >> cb;
            if (b == blocks && t == tableClusters)
                break;
            blocks = Math.Max(blocks, b);
            tableClusters = Math.Max(tableClusters, t);
        }
        long totalClusters = 1 + tableClusters + blocks + l1Clusters;
        long l1Offset = (1 + tableClusters + blocks) << cb;

        var header = new Qcow2Header
        {
            MagicValue = Qcow2Header.Magic,
            Version = 3,
            BackingFileOffset = backingFile is null ? 0 : (ulong)backingOffset,
            BackingFileSize = (uint)backingName.Length,
            ClusterBits = (uint)cb,
            Size = (ulong)size,
            L1Size = (uint)l1Size,
            L1TableOffset = (ulong)l1Offset,
            RefcountTableOffset = (ulong)cs,
            RefcountTableClusters = (uint)tableClusters,
            RefcountOrder = 4,
            HeaderLength = Qcow2Header.V3Length,
            CompressionType = (byte)compression,
            IncompatibleFeatures = compression == Qcow2CompressionType.Deflate ? 0 : (ulong)Qcow2IncompatibleFeatures.CompressionType,
        };
        var metadata = new byte[(1 + tableClusters + blocks) << cb];
        header.WriteTo(metadata);
        Qcow2HeaderExtensions.Write(metadata.AsSpan(Qcow2Header.V3Length), formatName);
        backingName.CopyTo(metadata.AsSpan((int)backingOffset));
        var tableEntries = new ulong[blocks];
        for (long k = 0; k < blocks; k++)
            tableEntries[k] = (ulong)((1 + tableClusters + k) << cb);
        Qcow2RefcountTable.Serialize(tableEntries, (int)(tableClusters << cb)).CopyTo(metadata.AsSpan((int)cs));
        for (long c = 0; c < totalClusters; c++)
        {
            long block = (1 + tableClusters + (c / entriesPerBlock)) << cb;
            Qcow2RefcountBlock.Set(metadata.AsSpan((int)block, (int)cs), 4, c % entriesPerBlock, 1);
        }

        var file = new Qcow2File(fullPath, ImageFiles.CreateNew(fullPath));
        bool done = false;
        try
        {
            file.Write(0, metadata);
            file.Extend(totalClusters << cb); // the L1 table: zeros
            if (durable)
                file.SyncNow();
            done = true;
        }
        finally
        {
            file.Dispose();
            if (!done)
                TryDelete(fullPath);
        }
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // best effort: the create already failed and reports why
        }
    }
}
