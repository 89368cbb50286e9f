using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Digests;

/*
 * Writes the manifest of a backup while the backup copies. Crash order: everything goes to "<manifest>.tmp", which is
 * completed and fsynced before the backup commits (Seal, run beside the target's own sync); the rename to "<manifest>"
 * happens only once the backup itself has committed (Commit, called after the target's rename); so a crash leaves the
 * previous manifest or the new one, never a torn one, and a manifest never describes a backup that does not exist.
 *
 * A full backup starts from a sparse file (every digest 0: "reads as zeros") and writes the digest of each cluster
 * it copies; an incremental starts from a copy of the previous backup's manifest and rewrites the clusters it copies.
 * The copy skips the holes of the previous manifest (clusters that read as zeros were never written), so a 1 TiB disk
 * holding a few MiB costs a few KiB of digests, not 256 MiB.
 * Either way the source is read once, by the copy itself.
 *
 * Digests are gathered in 4 KiB pages (256 clusters) and each page is written once: when it is whole, when more than
 * MaxPendingPages are pending (the oldest goes), and at Seal. A
 * page not whole is read first and overlaid, so the previous backup's digests around it stay. A scattered incremental
 * of 819 clusters thus costs about 64 page writes, not 819 16-byte ones; memory stays under 1 MiB whatever the disk.
 */

/// <summary>The manifest of a backup being taken.</summary>
public sealed class DigestManifestWriter : IDisposable
{
    private const int PageBytes = 4096;
    private const int DigestsPerPage = PageBytes / DigestManifest.DigestSize;
    private const int MaxPendingPages = 192;

    private readonly SafeFileHandle _handle;
    private readonly Lock _pagesLock = new();
    private readonly Dictionary<long, Page> _pages = [];
    private readonly Queue<long> _pageOrder = new();
    private bool _done;

    /// <summary>A manifest page being gathered: its bytes and which of its digests were written.</summary>
    private sealed class Page
    {
        public readonly byte[] Bytes = new byte[PageBytes];
        public readonly ulong[] Filled = new ulong[DigestsPerPage / 64];
        public int Count;
    }

    private DigestManifestWriter(string path, string tempPath, SafeFileHandle handle, DigestManifestInfo info)
    {
        Path = path;
        TempPath = tempPath;
        _handle = handle;
        Info = info;
    }

    /// <summary>Where the manifest goes once the backup commits.</summary>
    public string Path { get; }

    /// <summary>Where it is written meanwhile.</summary>
    public string TempPath { get; }

    public DigestManifestInfo Info { get; }

    /// <summary>
    /// Start the manifest at <paramref name="path"/> for <paramref name="info"/>: every cluster "zeros", or, with
    /// <paramref name="previous"/> (the manifest of the backup this one goes on top of), its digests.
    /// </summary>
    public static DigestManifestWriter Create(string path, DigestManifestInfo info, DigestManifest? previous)
    {
        string full = System.IO.Path.GetFullPath(path);
        string temp = full + ".tmp";
        SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(temp, FileMode.Create, FileAccess.ReadWrite, FileShare.None);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot create digest manifest '{temp}': {e.Message}", temp, e);
        }
        var writer = new DigestManifestWriter(full, temp, handle, info);
        try
        {
            writer.Io("write", () =>
            {
                RandomAccess.SetLength(handle, DigestManifest.HeaderSize + (info.ClusterCount * DigestManifest.DigestSize)); // a grown disk's new clusters: zeros
                if (previous is not null)
                    previous.CopyDigestsTo(handle, info.ClusterCount);
                RandomAccess.Write(handle, DigestManifest.FormatHeader(info), 0);
            });
            return writer;
        }
        catch
        {
            writer.Dispose();
            throw;
        }
    }

    /// <summary>Record the digest of a cluster as copied (thread-safe; written by pages, at the latest at <see cref="Commit"/>).</summary>
    public void Write(long cluster, UInt128 digest)
    {
        long pageIndex = cluster / DigestsPerPage;
        int slot = (int)(cluster % DigestsPerPage);
        lock (_pagesLock)
        {
            if (!_pages.TryGetValue(pageIndex, out Page? page))
            {
                if (_pages.Count >= MaxPendingPages)
                    FlushOldestLocked();
                page = new Page();
                _pages.Add(pageIndex, page);
                _pageOrder.Enqueue(pageIndex);
            }
            BinaryPrimitives.WriteUInt128BigEndian(page.Bytes.AsSpan(slot * DigestManifest.DigestSize, DigestManifest.DigestSize), digest);
            ref ulong word = ref page.Filled[slot >> 6];
            ulong bit = 1UL << (slot & 63);
            if ((word & bit) == 0)
            {
                word |= bit;
                page.Count++;
            }
            if (page.Count == Math.Min(DigestsPerPage, Info.ClusterCount - (pageIndex * DigestsPerPage)))
            {
                WritePage(pageIndex, page); // a page that fails stays gathered: the next write or flush tries it again
                _pages.Remove(pageIndex);
                while (_pageOrder.TryPeek(out long head) && !_pages.ContainsKey(head))
                    _pageOrder.Dequeue(); // pages written whole leave the queue (a full backup's go in order)
            }
        }
    }

    private void FlushOldestLocked()
    {
        while (_pageOrder.TryPeek(out long index))
        {
            if (_pages.TryGetValue(index, out Page? page))
            {
                WritePage(index, page); // a failure leaves it gathered and first in line
                _pages.Remove(index);
                _pageOrder.Dequeue();
                return;
            }
            _pageOrder.Dequeue();
        }
    }

    /// <summary>
    /// Before the backup commits: write every digest still gathered and the header with <paramref name="pointInTime"/>,
    /// and sync the file, so that a full disk fails the backup (which can still be undone), not the manifest of a backup
    /// already named, and <see cref="Commit"/> has only the rename left. Runs beside the target's own sync (the two files
    /// are synced at once). Retried after a failure: whatever failed is written again.
    /// </summary>
    public void Seal(DateTimeOffset pointInTime)
    {
        FlushPages();
        byte[] header = DigestManifest.FormatHeader(Info with { PointInTime = pointInTime });
        Io("write at offset 0", () => RandomAccess.Write(_handle, header, 0));
        Io("flush", () => RandomAccess.FlushToDisk(_handle));
        _sealedAt = pointInTime;
    }

    /// <summary>The point in time of the last <see cref="Seal"/> that succeeded, or null.</summary>
    private DateTimeOffset? _sealedAt;

    /// <summary>Write every page still gathered.</summary>
    private void FlushPages()
    {
        lock (_pagesLock)
        {
            foreach ((long index, Page page) in _pages.OrderBy(p => p.Key).ToArray())
            {
                WritePage(index, page); // a failure leaves this page and the rest gathered, for the retry
                _pages.Remove(index);
            }
            _pageOrder.Clear();
        }
    }

    private void WritePage(long index, Page page)
    {
        long offset = DigestManifest.HeaderSize + (index * PageBytes);
        long fileEnd = DigestManifest.HeaderSize + (Info.ClusterCount * DigestManifest.DigestSize);
        int length = (int)Math.Min(PageBytes, fileEnd - offset);
        Io($"write at offset {offset}", () =>
        {
            if (page.Count < length / DigestManifest.DigestSize)
            {
                // Not whole: keep what the file holds (the previous backup's digests) where this backup wrote nothing.
                byte[] old = new byte[length];
                int read = RandomAccess.Read(_handle, old, offset);
                for (int slot = 0; slot < length / DigestManifest.DigestSize; slot++)
                {
                    if ((page.Filled[slot >> 6] & (1UL << (slot & 63))) == 0)
                    {
                        Span<byte> target = page.Bytes.AsSpan(slot * DigestManifest.DigestSize, DigestManifest.DigestSize);
                        if ((slot + 1) * DigestManifest.DigestSize <= read)
                            old.AsSpan(slot * DigestManifest.DigestSize, DigestManifest.DigestSize).CopyTo(target);
                        else
                            target.Clear();
                    }
                }
            }
            RandomAccess.Write(_handle, page.Bytes.AsSpan(0, length), offset);
        });
    }

    /// <summary>The backup has committed: stamp its point in time, make the manifest durable and give it its name.</summary>
    public void Commit(DateTimeOffset pointInTime)
    {
        bool pending;
        lock (_pagesLock)
            pending = _pages.Count > 0;
        if (_sealedAt != pointInTime || pending)
            Seal(pointInTime); // not sealed before the commit (or written to since): do it now
        _handle.Dispose();
        Io("rename", () => File.Move(TempPath, Path, overwrite: true));
        _done = true;
        IO.LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(Path)!);
    }

    /// <summary>The backup did not happen: drop the temporary file.</summary>
    public void Dispose()
    {
        _handle.Dispose();
        if (_done)
            return;
        _done = true;
        try
        {
            File.Delete(TempPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }

    /// <summary>Run a file operation; its failure is ImageIOFailed, worded as the image drivers word theirs ("during &lt;op&gt;").</summary>
    private void Io(string operation, Action action)
    {
        try
        {
            action();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"I/O error on digest manifest '{TempPath}' during {operation}: {e.Message}", TempPath, e);
        }
    }
}
