using BitmapBackup.Core.IO;
using System.Text;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup.Core.Nodes;

/// <summary>
/// The registry of open block nodes, by node name. The module uses one engine for the whole process
/// (<see cref="Default"/>); tests make their own.
/// </summary>
public sealed class BlockEngine
{
    /// <summary>Longest node name (QEMU keeps node names in a 32-byte field).</summary>
    public const int MaxNodeNameLength = 31;

    private readonly object _sync = new();
    private readonly Dictionary<string, BlockNode> _nodes = new(StringComparer.Ordinal);
    private readonly Dictionary<string, string> _opening = new(StringComparer.Ordinal); // node name -> full path, while its image opens

    public static BlockEngine Default { get; } = new();

    /// <summary>Open nodes, ordered by name.</summary>
    public IReadOnlyList<BlockNode> Nodes
    {
        get
        {
            lock (_sync)
                return _nodes.Values.OrderBy(n => n.Name, StringComparer.Ordinal).ToArray();
        }
    }

    /// <summary>
    /// Create a new image file: a sparse raw file, or a qcow2 v3 image, optionally an overlay on a backing file
    /// (relative names are relative to the new image's folder, as in qemu-img). A size of 0 with a backing file
    /// takes the backing image's size.
    /// </summary>
    /// <param name="durable">Sync the new image before returning; false for a backup's scratch '.partial' file.</param>
    /// <param name="compression">The compression type of a qcow2 image's compressed clusters.</param>
    public static void CreateImage(string path, long size, ImageFormat format = ImageFormat.Raw, int? clusterSize = null, string? backingFile = null, bool durable = true,
        Qcow2CompressionType compression = Qcow2CompressionType.Deflate)
    {
        string fullPath = System.IO.Path.GetFullPath(path);
        if (format == ImageFormat.Raw)
        {
            if (clusterSize is not null || backingFile is not null)
                Throw.Block(ErrorIds.UnsupportedFormat, BlockErrorCategory.InvalidArgument,
                    $"A raw image has no {(backingFile is not null ? "backing file" : "cluster size")}: create '{fullPath}' as qcow2.", fullPath);
            CheckImageSize(size, fullPath);
            RawImage.Create(fullPath, size);
            return;
        }
        if (backingFile is not null)
        {
            string backing = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(fullPath)!, backingFile);
            if (Directory.Exists(backing))
                Throw.Block(ErrorIds.ImageIsFolder, BlockErrorCategory.InvalidArgument,
                    $"Backing file '{backingFile}' of '{fullPath}' is a folder ('{backing}'), not an image.", backingFile);
            if (!File.Exists(backing))
                Throw.Block(ErrorIds.BackingFileNotFound, BlockErrorCategory.ObjectNotFound,
                    $"Backing file '{backingFile}' of '{fullPath}' does not exist (looked for '{backing}'; a relative name is relative to the new image's folder).", backingFile);
            if (size == 0)
            {
                using IBlockImage image = ImageProbe.Open(backing, readOnly: true);
                size = image.Size;
            }
        }
        CheckImageSize(size, fullPath);
        Qcow2Image.Create(fullPath, size, clusterSize ?? Qcow2Image.DefaultClusterSize, backingFile, durable: durable, compression: compression);
    }

    /// <summary>Sizes are positive multiples of 512 bytes, as qemu-img rounds them.</summary>
    public static void CheckImageSize(long size, string path)
    {
        if (size <= 0 || size % 512 != 0)
            Throw.Block(ErrorIds.InvalidImageSize, BlockErrorCategory.InvalidArgument,
                $"Size {size} for image '{path}' must be a positive multiple of 512 bytes.", path);
    }

    /// <summary>
    /// Open an image as a node. Without <paramref name="name"/> the node is named after the file (made unique).
    /// With <paramref name="forceShare"/> (read-only only) the image is read without image locks, as QEMU's
    /// force-share=on: it opens while another process writes it, and what it reads may be changing.
    /// <paramref name="bitmapStore"/> is the bitmap state folder for an image that cannot hold its persistent
    /// bitmaps (<see cref="StoreFor"/>); null: the default one.
    /// </summary>
    /// <remarks>
    /// The engine's lock is never held while the file is opened, locked or read (an open can block on the outside
    /// world: a slow or hung file system): the name and the path are reserved under the lock, the image is opened
    /// outside it, and the node is registered under it again. A reserved name or path counts as taken.
    /// </remarks>
    public BlockNode Open(string path, string? name = null, bool readOnly = false, bool forceShare = false, CacheMode cache = CacheMode.WriteBack,
        string? bitmapStore = null)
    {
        string fullPath = System.IO.Path.GetFullPath(path);
        if (name is not null)
            CheckNodeName(name);
        if (forceShare && !readOnly)
            Throw.Block(ErrorIds.ForceShareRequiresReadOnly, BlockErrorCategory.InvalidArgument,
                $"Image '{fullPath}' cannot be opened for writing with force-share: only a read-only node may ignore the image locks (QEMU: force-share=on can only be used with read-only images).", fullPath);
        lock (_sync)
        {
            if (_nodes.Values.FirstOrDefault(n => n.Path == fullPath) is { } open)
                Throw.Block(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                    $"Image '{fullPath}' is already open as node '{open.Name}'.", fullPath);
            if (_opening.FirstOrDefault(o => o.Value == fullPath) is { Key: { } opening })
                Throw.Block(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                    $"Image '{fullPath}' is being opened as node '{opening}'.", fullPath);
            if (name is not null && (_nodes.ContainsKey(name) || _opening.ContainsKey(name)))
                Throw.Block(ErrorIds.NodeNameInUse, BlockErrorCategory.ResourceExists, $"Node name '{name}' is already in use.", name);
            name ??= UniqueName(DefaultName(fullPath));
            _opening.Add(name, fullPath);
        }
        BlockNode node;
        try
        {
            IBlockImage image = OpenImage(fullPath, readOnly, forceShare);
            try
            {
                node = new BlockNode(name, image, StoreFor(image, bitmapStore), cache);
                node.LoadPersistentBitmaps(forceShare);
            }
            catch
            {
                image.Dispose();
                throw;
            }
        }
        catch
        {
            lock (_sync)
                _opening.Remove(name);
            throw;
        }
        lock (_sync)
        {
            _opening.Remove(name);
            _nodes.Add(name, node);
        }
        ImageHolders.Add(node.Path, $"node '{name}'");
        return node;
    }

    /// <summary>Open an image file with the driver of its format; with <paramref name="forceShare"/> (read-only) without image locks.</summary>
    public static IBlockImage OpenImage(string path, bool readOnly, bool forceShare = false) => ImageProbe.Open(path, readOnly, forceShare);

    /// <summary>
    /// The bitmaps stored in an image, read without changing it. An image open here is read through its node's
    /// store (its stored state: in use while open). Otherwise the image is opened read-only (as a reader, or
    /// without locks with <paramref name="forceShare"/>) for the time of the read.
    /// </summary>
    public IReadOnlyList<StoredBitmap> ReadStoredBitmaps(string path, bool forceShare = false, string? bitmapStore = null)
    {
        string fullPath = System.IO.Path.GetFullPath(path);
        if (Nodes.FirstOrDefault(n => n.Path == fullPath) is { Store: { } open } node)
            return open.Load().Select(s => s with { CrashSafe = node.FindBitmap(s.Name) is { CrashSafe: true } }).ToArray();
        using IBlockImage image = OpenImage(fullPath, readOnly: true, forceShare);
        if (StoreFor(image, bitmapStore) is not { } store)
            return [];
        IReadOnlyList<StoredBitmap> stored = store.Load();
        // As the next open reads it (BlockNode.LoadOne): listed in the log's checkpoint = crash-safe; left in use with a
        // log that can be trusted = rebuilt at the next open, not inconsistent.
        if (IntentLogReader.Read(BlockNode.IntentLogPathFor(fullPath, store), IO.FileIdentity.Of(fullPath), image.Size, readOnly: true, forceShare) is not { } log)
            return stored;
        return stored.Select(s => s with { CrashSafe = log.EntryFor(s) is not null, Recoverable = log.Rebuilds(s, forceShare) }).ToArray();
    }

    /// <summary>
    /// Where an image keeps persistent bitmaps: a qcow2 image in itself; a raw file in its sidecar
    /// ("&lt;image&gt;.bitmaps"); a block device, and a raw file whose folder cannot take a sidecar (read-only, or
    /// another user's) or that is given a <paramref name="bitmapStore"/>, in a bitmap state folder
    /// (<see cref="StateFolderBitmapStore"/>), <paramref name="bitmapStore"/> or the default one.
    /// </summary>
    /// <exception cref="BlockException">BitmapStoreConflict: a state folder given for a qcow2 image, or for a raw file that has a sidecar.</exception>
    public static IBitmapStore? StoreFor(IBlockImage image, string? bitmapStore = null)
    {
        switch (image)
        {
            case Qcow2Image qcow2:
                if (bitmapStore is not null)
                    Throw.Block(ErrorIds.BitmapStoreConflict, BlockErrorCategory.InvalidArgument,
                        $"'{image.Path}' is a qcow2 image: it stores its persistent bitmaps in itself, not in a bitmap state folder ('{bitmapStore}').", image.Path);
                return new Qcow2BitmapStore(qcow2);
            case RawImage raw when raw.Device is not null:
                return new StateFolderBitmapStore(bitmapStore, raw.Identity, raw.Path, () => raw.Size);
            case RawImage raw:
                var sidecar = new RawBitmapSidecar(raw.Path);
                bool hasSidecar = File.Exists(sidecar.Path);
                if (bitmapStore is not null && hasSidecar)
                    Throw.Block(ErrorIds.BitmapStoreConflict, BlockErrorCategory.InvalidArgument,
                        $"'{raw.Path}' keeps its persistent bitmaps in its sidecar '{sidecar.Path}', not in a bitmap state folder ('{bitmapStore}'): open it without -BitmapStore.", raw.Path);
                if (bitmapStore is null && (hasSidecar || IO.LinuxFile.CanWriteIn(System.IO.Path.GetDirectoryName(raw.Path)!)))
                    return sidecar;
                return new StateFolderBitmapStore(bitmapStore, raw.Identity, raw.Path, () => raw.Size);
            default:
                return null;
        }
    }

    public BlockNode? Find(string name)
    {
        lock (_sync)
            return _nodes.GetValueOrDefault(name);
    }

    public BlockNode Get(string name)
        => Find(name) ?? throw new BlockException(ErrorIds.NodeNotFound, BlockErrorCategory.ObjectNotFound, $"Node '{name}' not found.", name);

    /// <summary>
    /// Flush and close a node and forget its (non-persistent) bitmaps. Refused while a backup uses it. The flush
    /// runs outside the engine's lock: the node stays registered until it is closed.
    /// </summary>
    public void Close(BlockNode node)
    {
        lock (_sync)
        {
            if (!_nodes.TryGetValue(node.Name, out BlockNode? known) || known != node)
                Throw.Block(ErrorIds.NodeNotFound, BlockErrorCategory.ObjectNotFound, $"Node '{node.Name}' not found.", node.Name);
        }
        node.Close();
        lock (_sync)
        {
            if (_nodes.TryGetValue(node.Name, out BlockNode? known) && known == node)
                _nodes.Remove(node.Name);
        }
        ImageHolders.Remove(node.Path, $"node '{node.Name}'");
    }

    /// <summary>Close every node (process exit, module unload); errors are collected, not thrown one by one.</summary>
    public IReadOnlyList<Exception> CloseAll()
    {
        var errors = new List<Exception>();
        foreach (BlockNode node in Nodes)
        {
            try
            {
                Close(node);
            }
            catch (Exception e)
            {
                errors.Add(e);
            }
        }
        return errors;
    }

    /// <summary>QEMU's rule for node names: a letter, then letters, digits, '-', '.' or '_'; at most 31 characters.</summary>
    public static void CheckNodeName(string name)
    {
        if (!IsValidNodeName(name))
            Throw.Block(ErrorIds.NodeNameInvalid, BlockErrorCategory.InvalidArgument,
                $"Node name '{name}' is invalid: it must start with a letter, contain only letters, digits, '-', '.' and '_', and be at most {MaxNodeNameLength} characters long.", name);
    }

    public static bool IsValidNodeName(string? name)
    {
        if (string.IsNullOrEmpty(name) || name.Length > MaxNodeNameLength || !char.IsAsciiLetter(name[0]))
            return false;
        foreach (char c in name)
        {
            if (!char.IsAsciiLetterOrDigit(c) && c is not ('-' or '.' or '_'))
                return false;
        }
        return true;
    }

    private static string DefaultName(string fullPath)
    {
        var sb = new StringBuilder();
        foreach (char c in System.IO.Path.GetFileNameWithoutExtension(fullPath))
            sb.Append(char.IsAsciiLetterOrDigit(c) || c is '-' or '.' or '_' ? c : '_');
        if (sb.Length == 0 || !char.IsAsciiLetter(sb[0]))
            sb.Insert(0, "node");
        return sb.ToString(0, Math.Min(sb.Length, MaxNodeNameLength - 4));
    }

    private string UniqueName(string stem)
    {
        if (!_nodes.ContainsKey(stem) && !_opening.ContainsKey(stem))
            return stem;
        for (int i = 2; ; i++)
        {
            string candidate = $"{stem}-{i}";
            if (!_nodes.ContainsKey(candidate) && !_opening.ContainsKey(candidate))
                return candidate;
        }
    }
}
