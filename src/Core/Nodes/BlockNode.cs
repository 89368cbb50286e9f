using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup.Core.Nodes;

/// <summary>
/// An opened image registered under a node name: checked I/O over a format driver plus the node's dirty
/// bitmaps. Every write marks each recording bitmap before it returns.
///
/// A write marks its whole range whatever the driver did with it (QEMU's <c>bdrv_co_write_req_finish</c>): a
/// write that failed or threw part-way may have changed any byte of its range, so the bits are set in a
/// <c>finally</c> once the driver has been called. A request refused before the driver sees it (node closed or
/// read-only, range past the end) changed nothing and marks nothing. A resize that grows the node marks the whole
/// new range, so that a clean bitmap always means "the last backup equals the disk", size included.
///
/// Durability (<see cref="CacheMode"/>): in write-back mode (the default) the driver may keep metadata in memory;
/// a timer writes it back and syncs within <see cref="WriteBackWindow"/> of the first write after the last sync,
/// so a crash loses at most that window. In write-through mode every write is synced before it returns.
/// <see cref="Flush"/> syncs now.
///
/// Two locks, each with one job:
/// - the write gate (a reader-writer lock): every write holds it shared from the data write until its bits are
///   marked; <see cref="Quiesce"/> holds it exclusively, so a point in time (a backup start, a transaction
///   commit) falls wholly before or wholly after each write, never between its data and its bits;
/// - <see cref="Sync"/>: guards the bitmaps' state and bits; held only for short, non-blocking sections.
/// </summary>
public sealed partial class BlockNode : IDisposable
{
    private readonly ReaderWriterLockSlim _gate = new(LockRecursionPolicy.SupportsRecursion);
    private readonly List<DirtyBitmap> _bitmaps = new(); // named and anonymous, in creation order
    private DirtyBitmap[] _recording = [];
    private IWriteInterceptor[] _interceptors = [];
    private INodeUser[] _users = [];
    private bool _closed;
    private int _unsynced; // 1 from the first write after a sync until the next sync starts
    private readonly Timer _writeBack;
    private BlockException? _lastWriteBackError;

    /// <summary>How long written data and metadata may stay unsynced in write-back mode (ext4's commit interval).</summary>
    public static readonly TimeSpan DefaultWriteBackWindow = TimeSpan.FromSeconds(5);

    internal BlockNode(string name, IBlockImage image, IBitmapStore? store = null, CacheMode cache = CacheMode.WriteBack)
    {
        Name = name;
        Image = image;
        Store = store;
        Cache = cache;
        _writeBack = new Timer(static state => ((BlockNode)state!).WriteBack(), this, Timeout.Infinite, Timeout.Infinite);
        _checkpointTimer = new Timer(static state => ((BlockNode)state!).CheckpointTick(), this, Timeout.Infinite, Timeout.Infinite);
    }

    /// <summary>Write-back (synced within <see cref="WriteBackWindow"/>) or write-through (synced before each write returns).</summary>
    public CacheMode Cache { get; }

    /// <summary>The write-back window of this node (tests shorten it).</summary>
    public TimeSpan WriteBackWindow { get; set; } = DefaultWriteBackWindow;

    /// <summary>Whether something was written since the last sync began.</summary>
    public bool HasUnsyncedWrites => Volatile.Read(ref _unsynced) != 0;

    /// <summary>The error of the last write-back that failed (it is retried every window), or null once one succeeds.</summary>
    public BlockException? LastWriteBackError => Volatile.Read(ref _lastWriteBackError);

    /// <summary>Where the image keeps persistent bitmaps, or null when its format cannot.</summary>
    public IBitmapStore? Store { get; private set; }

    public string Name { get; }

    public IBlockImage Image { get; }

    public string Path => Image.Path;

    public ImageFormat Format => Image.Format;

    public long Size => Image.Size;

    public int ClusterSize => Image.ClusterSize;

    public bool ReadOnly => Image.ReadOnly;

    public bool IsClosed => Volatile.Read(ref _closed);

    /// <summary>Guards bitmap state; see the type's remarks.</summary>
    public Lock Sync { get; } = new();

    /// <summary>The named bitmaps, in creation order.</summary>
    public IReadOnlyList<DirtyBitmap> Bitmaps
    {
        get
        {
            lock (Sync)
                return _bitmaps.Where(b => b.Name is not null).ToArray();
        }
    }

    #region I/O

    public void Read(long offset, Span<byte> buffer)
    {
        CheckOpen();
        CheckRange(offset, buffer.Length);
        Testing.FaultInjection.Check(Path, Testing.FaultOperation.Read, offset, buffer.Length);
        Image.Read(offset, buffer);
    }

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        CheckWritable();
        CheckRange(offset, data.Length);
        if (data.Length == 0)
            return;
        _gate.EnterReadLock();
        try
        {
            CheckOpen(); // closed while this write waited for the gate
            BeforeWrite(offset, data.Length);
            EnsureIntent(offset, data.Length); // crash-safe bitmaps: the intent is durable before the driver sees the write
            try
            {
                Image.Write(offset, data);
            }
            finally
            {
                MarkDirty(offset, data.Length); // whatever the driver did: a failed write may have changed the range
                AfterWrite();
            }
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    public void WriteZeroes(long offset, long length)
    {
        CheckWritable();
        CheckRange(offset, length);
        if (length == 0)
            return;
        _gate.EnterReadLock();
        try
        {
            CheckOpen();
            BeforeWrite(offset, length);
            EnsureIntent(offset, length);
            try
            {
                Image.WriteZeroes(offset, length);
            }
            finally
            {
                MarkDirty(offset, length);
                AfterWrite();
            }
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    /// <summary>
    /// After a write reached the driver: write-through syncs now (a failure fails the write); write-back arms the
    /// timer on the first write after a sync (one volatile read otherwise).
    /// </summary>
    private void AfterWrite()
    {
        if (Cache == CacheMode.WriteThrough)
        {
            Volatile.Write(ref _unsynced, 1);
            SyncLocked();
            return;
        }
        if (Volatile.Read(ref _unsynced) == 0 && Interlocked.Exchange(ref _unsynced, 1) == 0)
            ArmWriteBack(WriteBackWindow);
    }

    private void ArmWriteBack(TimeSpan due)
    {
        try
        {
            _writeBack.Change(due, Timeout.InfiniteTimeSpan);
        }
        catch (ObjectDisposedException)
        {
            // closed meanwhile: the close synced
        }
    }

    private void BeforeWrite(long offset, long length)
    {
        foreach (IWriteInterceptor interceptor in Volatile.Read(ref _interceptors))
            interceptor.BeforeWrite(this, offset, length);
    }

    /// <summary>Install a copy-before-write hook. Call under <see cref="Quiesce"/> to give it a point in time.</summary>
    public void AddWriteInterceptor(IWriteInterceptor interceptor)
    {
        lock (Sync)
            _interceptors = [.. _interceptors, interceptor];
    }

    /// <summary>Remove a hook. Under <see cref="Quiesce"/> no call into it is still running afterwards.</summary>
    public void RemoveWriteInterceptor(IWriteInterceptor interceptor)
    {
        lock (Sync)
            _interceptors = _interceptors.Where(i => i != interceptor).ToArray();
    }

    /// <summary>Register something that serves this node (an NBD export): until it is removed the node cannot be closed or resized.</summary>
    public void AddUser(INodeUser user)
    {
        lock (Sync)
        {
            CheckOpen();
            _users = [.. _users, user];
        }
    }

    /// <summary>Release a user registered with <see cref="AddUser"/>.</summary>
    public void RemoveUser(INodeUser user)
    {
        lock (Sync)
            _users = _users.Where(u => u != user).ToArray();
    }

    /// <summary>Who serves this node now (NBD exports).</summary>
    public IReadOnlyList<INodeUser> Users => Volatile.Read(ref _users);

    /// <summary>
    /// Write back everything the driver holds in memory and sync the image (data, then metadata in crash-safe order,
    /// then fdatasync): every write that returned before this call is durable when it returns.
    /// </summary>
    public void Flush()
    {
        CheckOpen();
        if (ReadOnly)
            return;
        _gate.EnterReadLock(); // writes may go on; a close waits for the sync
        try
        {
            CheckOpen();
            SyncLocked();
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    /// <summary>Sync if anything was written since the last sync began. Caller holds the gate (shared or exclusive).</summary>
    private void SyncLocked()
    {
        if (Interlocked.Exchange(ref _unsynced, 0) == 0)
            return;
        try
        {
            Image.Flush();
            Volatile.Write(ref _lastWriteBackError, null);
        }
        catch
        {
            Volatile.Write(ref _unsynced, 1); // still unsynced: the next flush or window tries again
            if (Cache == CacheMode.WriteBack)
                ArmWriteBack(WriteBackWindow);
            throw;
        }
    }

    /// <summary>Timer: the write-back window has passed since the first unsynced write.</summary>
    private void WriteBack()
    {
        if (!_gate.TryEnterReadLock(0))
        {
            ArmWriteBack(TimeSpan.FromMilliseconds(100)); // quiesced (a close, a backup start): soon again
            return;
        }
        try
        {
            if (!IsClosed)
                SyncLocked();
        }
        catch (Exception e) when (e is BlockException or ObjectDisposedException)
        {
            if (e is BlockException be)
                Volatile.Write(ref _lastWriteBackError, be); // retried every window; writes stay marked dirty meanwhile
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    /// <summary>Allocation of [offset, offset+length), or of the whole node when length is omitted.</summary>
    public IReadOnlyList<AllocationExtent> GetAllocation(long offset = 0, long? length = null)
    {
        CheckOpen();
        long len = length ?? Size - offset;
        CheckRange(offset, len);
        return len == 0 ? [] : Merge(Image.GetAllocation(offset, len)).ToArray();
    }

    /// <summary>Allocation through the whole backing chain (<see cref="ChainAllocation"/>).</summary>
    public IReadOnlyList<AllocationExtent> GetChainAllocation(long offset = 0, long? length = null)
    {
        CheckOpen();
        long len = length ?? Size - offset;
        CheckRange(offset, len);
        return len == 0 ? [] : Merge(ChainAllocation.Of(Image, offset, len)).ToArray();
    }

    /// <summary>
    /// Allocation through the whole backing chain of [offset, offset+length), merged, produced as it is enumerated
    /// (a caller that needs only the first extents stops early). Checked now; enumerate it while the node is open.
    /// </summary>
    public IEnumerable<AllocationExtent> EnumerateChainAllocation(long offset, long length)
    {
        CheckOpen();
        CheckRange(offset, length);
        return length == 0 ? [] : Merge(ChainAllocation.Of(Image, offset, length));
    }

    private static IEnumerable<AllocationExtent> Merge(IEnumerable<AllocationExtent> extents)
    {
        AllocationExtent? pending = null;
        foreach (AllocationExtent e in extents)
        {
            if (e.Length == 0)
                continue;
            if (pending is { } p && p.State == e.State && p.End == e.Offset)
                pending = p with { Length = p.Length + e.Length };
            else
            {
                if (pending is { } done)
                    yield return done;
                pending = e;
            }
        }
        if (pending is { } last)
            yield return last;
    }

    /// <summary>
    /// Grow or shrink the node; every bitmap follows. Refused while a bitmap is busy, and a shrink is refused
    /// when the part cut off holds data.
    /// </summary>
    public void Resize(long newSize)
    {
        CheckWritable();
        if (newSize <= 0 || newSize % 512 != 0)
            Throw.Block(ErrorIds.InvalidImageSize, BlockErrorCategory.InvalidArgument,
                $"Size {newSize} for node '{Name}' must be a positive multiple of 512 bytes.", Name);
        using (Quiesce())
        {
            lock (Sync)
            {
                if (_users.FirstOrDefault() is { } user)
                    Throw.Block(ErrorIds.NodeBusy, BlockErrorCategory.ResourceBusy,
                        $"Node '{Name}' cannot be resized while it is in use by {user.Description}: its clients agreed on the size; {user.ReleaseHint}.", Name);
                if (_bitmaps.FirstOrDefault(b => b.Busy) is { } busy)
                    Throw.Block(ErrorIds.NodeBusy, BlockErrorCategory.ResourceBusy,
                        $"Node '{Name}' cannot be resized while bitmap '{busy.Name}' is in use by {busy.BusyWith}.", Name);
                if (_interceptors.Length > 0)
                    Throw.Block(ErrorIds.NodeBusy, BlockErrorCategory.ResourceBusy,
                        $"Node '{Name}' cannot be resized while a backup of it is running.", Name);
            }
            long size = Size;
            if (newSize < size && FirstNonZeroByte(newSize, size - newSize) is long at)
                Throw.Block(ErrorIds.ShrinkWouldDiscardData, BlockErrorCategory.InvalidOperation,
                    $"Shrinking node '{Name}' to {newSize} bytes would discard data stored at offset {at}; write zeros there first if it is not needed.", Name);
            try
            {
                Image.Resize(newSize);
            }
            catch
            {
                // A shrink that failed part-way may have dropped clusters past the new end (a backing file can now
                // show through there): the range keeps its size but not necessarily its contents.
                if (newSize < size && Size == size)
                    MarkDirty(newSize, size - newSize);
                Volatile.Write(ref _unsynced, 1);
                throw;
            }
            lock (Sync)
            {
                foreach (DirtyBitmap b in _bitmaps)
                    b.ResizeLocked(newSize);
                // Growth marks the new range in every recording bitmap: the last backup does not have it (QEMU marks
                // nothing here; after a shrink and a grow its incremental would let old backed-up data show through).
                if (newSize > size)
                {
                    foreach (DirtyBitmap b in _recording)
                        b.MarkLocked(size, newSize - size);
                }
            }
            AfterWrite();
            ResizeIntentLogLocked();
        }
    }

    /// <summary>Offset of the first non-zero byte of the range, reading only what the image stores; null if none.</summary>
    private long? FirstNonZeroByte(long offset, long length)
    {
        byte[] buffer = new byte[1 << 20];
        foreach (AllocationExtent extent in Image.GetAllocation(offset, length).Where(e => e.State != AllocationState.Zero))
        {
            for (long pos = extent.Offset; pos < extent.End; pos += buffer.Length)
            {
                Span<byte> chunk = buffer.AsSpan(0, (int)Math.Min(buffer.Length, extent.End - pos));
                Image.Read(pos, chunk);
                int i = chunk.IndexOfAnyExcept((byte)0);
                if (i >= 0)
                    return pos + i;
            }
        }
        return null;
    }

    #endregion

    #region Bitmaps

    /// <summary>Record a write in every recording bitmap (successors included).</summary>
    internal void MarkDirty(long offset, long length)
    {
        lock (Sync)
        {
            foreach (DirtyBitmap b in _recording)
                b.MarkLocked(offset, length);
        }
    }

    /// <summary>
    /// Hold off writes: until the returned handle is disposed no write is in flight and none starts. Used to
    /// give a backup start or a transaction one instant.
    /// </summary>
    public IDisposable Quiesce()
    {
        _gate.EnterWriteLock();
        return new GateRelease(_gate);
    }

    /// <summary>
    /// Add a bitmap. <paramref name="crashSafe"/> (persistent only): the node keeps a write-intent log for it, and the
    /// log's checkpoint lists it before it records anything; refused with one id each without
    /// <paramref name="persistent"/>, on a read-only node, and when the log cannot be written (nothing changed then).
    /// </summary>
    public DirtyBitmap AddBitmap(string name, long? granularity = null, bool persistent = false, bool disabled = false, bool crashSafe = false)
    {
        CheckOpen();
        if (crashSafe && !persistent)
            Throw.Block(ErrorIds.CrashSafeRequiresPersistent, BlockErrorCategory.InvalidArgument,
                $"Bitmap '{name}' on node '{Name}' cannot be crash-safe without being persistent: add -Persistent (a crash-safe bitmap is a persistent bitmap whose writes are also logged).", name);
        DirtyBitmapLimits.CheckName(name, Name);
        long g = granularity ?? DirtyBitmapLimits.DefaultGranularity(ClusterSize);
        DirtyBitmapLimits.CheckGranularity(g, Name, name);
        if (crashSafe && ReadOnly)
            Throw.Block(ErrorIds.CrashSafeNodeReadOnly, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{name}' crash-safe on node '{Name}': the node is open read-only, so it can keep no write-intent log.", name);
        if (!crashSafe)
            return AddBitmapLocked(name, g, persistent, disabled, crashSafe: false);
        using (Quiesce()) // the log lists the bitmap before it records a write
            return AddBitmapLocked(name, g, persistent, disabled, crashSafe: true);
    }

    private DirtyBitmap AddBitmapLocked(string name, long g, bool persistent, bool disabled, bool crashSafe)
    {
        DirtyBitmap bitmap;
        lock (Sync)
        {
            CheckOpen();
            if (FindLocked(name) is not null)
                Throw.Block(ErrorIds.BitmapAlreadyExists, BlockErrorCategory.ResourceExists, $"Bitmap '{name}' already exists on node '{Name}'.", name);
            if (persistent)
                CheckCanPersist(name, g);
            bitmap = new DirtyBitmap(this, name, g, disabled, persistent) { CrashSafe = crashSafe };
        }
        if (crashSafe)
            LogNewCrashSafeLocked(bitmap);
        lock (Sync)
        {
            AttachLocked(bitmap);
            if (persistent)
            {
                try
                {
                    Store!.MarkInUse(PersistentLocked()); // a crash from now on leaves it inconsistent, not absent
                }
                catch
                {
                    DetachLocked(bitmap);
                    throw;
                }
            }
            return bitmap;
        }
    }

    /// <summary>
    /// Put a new crash-safe bitmap in the log's checkpoint (a new log when there is none or the slots are too small).
    /// Caller holds the gate exclusively. IntentLogUnavailable when the log cannot be written; nothing changed then.
    /// </summary>
    private void LogNewCrashSafeLocked(DirtyBitmap bitmap)
    {
        try
        {
            WriteIntentLog? log = Volatile.Read(ref _intent);
            if (log is null || !log.WriteCheckpoint(BuildCheckpoint(++_generation, clean: false, bitmap)))
                RebuildIntentLogLocked(bitmap);
        }
        catch (BlockException e)
        {
            Throw.Block(ErrorIds.IntentLogUnavailable, e.Category,
                $"Can't make bitmap '{bitmap.Name}' crash-safe on node '{Name}': its write-intent log '{IntentLogPath}' cannot be written {(Store is StateFolderBitmapStore ? "in the bitmap state folder" : "beside the image")} ({e.Message}). Nothing was changed.", bitmap.Name, e);
        }
    }

    private void CheckCanPersist(string name, long granularity)
    {
        if (Store is null)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.NotImplemented,
                $"Can't make bitmap '{name}' persistent in node '{Name}': {Format} images of this kind cannot store bitmaps.", name);
        if (ReadOnly)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{name}' persistent in node '{Name}': the node is open read-only, so the bitmap could never be stored.", name);
        Store.CheckCanStore(name, granularity, PersistentLocked());
    }

    private DirtyBitmap[] PersistentLocked() => _bitmaps.Where(b => b.Persistent && b.Name is not null).ToArray();

    /// <summary>
    /// Load the bitmaps stored in the image (at open). Opened for writing, they are marked in use on disk at
    /// once; one found in use already (its last writer crashed) loads inconsistent, unless it is crash-safe and its
    /// write-intent log can be trusted: it is then rebuilt from the log (BlockNode.CrashSafe.cs). With
    /// <paramref name="forceShare"/> the log is not used (its writer may be running).
    /// </summary>
    internal void LoadPersistentBitmaps(bool forceShare = false)
    {
        if (Store is null)
            return;
        IReadOnlyList<StoredBitmap> stored = Store.Load();
        IntentLogContents? log = IntentLogReader.Read(IntentLogPath, IO.FileIdentity.Of(Path), Size, ReadOnly, forceShare); // null: no log
        var notes = new List<string>();
        bool crashSafe;
        lock (Sync)
        {
            foreach (StoredBitmap s in stored)
                AttachLocked(LoadOne(s, log, forceShare, notes));
            crashSafe = HasCrashSafeLocked();
        }
        foreach (string note in notes)
            EngineWarnings.PostOnce($"intent-load:{Guid.NewGuid()}", note);
        if (ReadOnly)
            return;
        StartIntentLog(crashSafe, log?.Checkpoint);
        try
        {
            lock (Sync)
            {
                if (_bitmaps.Count > 0)
                    Store.MarkInUse(PersistentLocked());
            }
        }
        catch
        {
            _checkpointTimer?.Dispose();
            Volatile.Read(ref _intent)?.Close(null); // the image keeps its stored bitmaps, and they win over this log
            throw;
        }
    }

    /// <summary>
    /// Keep this node's persistent bitmaps in the bitmap state folder <paramref name="folder"/> (New-DirtyBitmap
    /// -BitmapStore): nothing to do when they are kept there already; otherwise the node switches folders, and loads
    /// what the new folder holds for its image, only while it keeps no persistent bitmap anywhere else.
    /// </summary>
    /// <exception cref="BlockException">BitmapStoreConflict: a qcow2 image, a raw file with a sidecar, or persistent bitmaps kept elsewhere.</exception>
    public void UseBitmapStore(string folder)
    {
        CheckOpen();
        string full = System.IO.Path.GetFullPath(folder);
        lock (Sync)
        {
            if (Store is StateFolderBitmapStore current && current.Folder == full)
                return;
            IBitmapStore? next = BlockEngine.StoreFor(Image, full);
            if (PersistentLocked() is { Length: > 0 } kept)
                Throw.Block(ErrorIds.BitmapStoreConflict, BlockErrorCategory.InvalidOperation,
                    $"Node '{Name}' keeps persistent bitmap '{kept[0].Name}' in {(Store is StateFolderBitmapStore s ? $"the bitmap state folder '{s.Folder}'" : $"'{Path}'")}, not in '{full}': " +
                    "give the folder it was opened with, or remove its persistent bitmaps first.", Name);
            Store = next;
        }
        LoadPersistentBitmaps();
    }

    /// <summary>Write persistent bitmaps with their bits (clean close).</summary>
    private void StorePersistentBitmaps()
    {
        if (Store is null || ReadOnly)
            return;
        lock (Sync)
            Store.Store(PersistentLocked());
    }

    public DirtyBitmap? FindBitmap(string name)
    {
        lock (Sync)
            return FindLocked(name);
    }

    public DirtyBitmap GetBitmap(string name)
        => FindBitmap(name) ?? throw new BlockException(ErrorIds.BitmapNotFound, BlockErrorCategory.ObjectNotFound,
            $"Dirty bitmap '{name}' not found on node '{Name}'.", name);

    /// <summary>Remove a bitmap. Refused while busy or read-only; allowed when inconsistent. Returns its position, for <see cref="RestoreBitmap"/>.</summary>
    public int RemoveBitmap(DirtyBitmap bitmap)
    {
        int position = ChangeBitmap(bitmap, () => RemoveBitmapLocked(bitmap)); // the log's checkpoint no longer lists it
        return position;
    }

    private int RemoveBitmapLocked(DirtyBitmap bitmap)
    {
        lock (Sync)
        {
            if (bitmap.Node != this || !_bitmaps.Contains(bitmap))
                Throw.Block(ErrorIds.BitmapNotFound, BlockErrorCategory.ObjectNotFound, $"Dirty bitmap '{bitmap.Name}' not found on node '{Name}'.", bitmap.Name);
            bitmap.Check(BitmapUse.Remove);
            int position = _bitmaps.IndexOf(bitmap);
            DetachLocked(bitmap);
            if (bitmap.Persistent && Store is not null && !ReadOnly)
            {
                try
                {
                    Store.MarkInUse(PersistentLocked()); // gone from the image at once, as in QEMU
                }
                catch
                {
                    AttachLocked(bitmap, position);
                    throw;
                }
            }
            return position;
        }
    }

    /// <summary>Put back a bitmap removed by <see cref="RemoveBitmap"/> (transaction rollback).</summary>
    public void RestoreBitmap(DirtyBitmap bitmap, int position = int.MaxValue) => ChangeBitmap(bitmap, () => RestoreBitmapLocked(bitmap, position));

    private void RestoreBitmapLocked(DirtyBitmap bitmap, int position)
    {
        lock (Sync)
        {
            if (bitmap.Node != this || FindLocked(bitmap.Name!) is not null)
                throw new InvalidOperationException($"Bitmap '{bitmap.Name}' cannot be restored on node '{Name}'.");
            if (bitmap.Length != DirtyBitmap.BitsFor(Size, bitmap.Granularity))
                bitmap.ResizeLocked(Size);
            AttachLocked(bitmap, position);
            if (bitmap.Persistent && Store is not null && !ReadOnly)
                Store.MarkInUse(PersistentLocked()); // back in the image, in use, as before the removal
        }
    }

    private DirtyBitmap? FindLocked(string name)
    {
        foreach (DirtyBitmap b in _bitmaps)
        {
            if (b.Name is not null && string.Equals(b.Name, name, StringComparison.Ordinal))
                return b;
        }
        return null;
    }

    internal void AttachLocked(DirtyBitmap bitmap, int position = int.MaxValue)
    {
        _bitmaps.Insert(Math.Min(position, _bitmaps.Count), bitmap);
        RecordingChanged();
    }

    internal void DetachLocked(DirtyBitmap bitmap)
    {
        _bitmaps.Remove(bitmap);
        RecordingChanged();
    }

    /// <summary>Rebuild the array the write path walks. Caller holds <see cref="Sync"/>.</summary>
    internal void RecordingChanged() => _recording = _bitmaps.Where(b => b.IsRecordingItself).ToArray();

    #endregion

    #region Checks

    private void CheckOpen()
    {
        if (IsClosed)
            Throw.Block(ErrorIds.NodeClosed, BlockErrorCategory.InvalidOperation, $"Node '{Name}' is closed.", Name);
    }

    private void CheckWritable()
    {
        CheckOpen();
        if (ReadOnly)
        {
            if (Image is Formats.Qcow2.Qcow2Image { IsCorrupt: true })
                Throw.Block(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData,
                    $"Node '{Name}' is read-only since its image '{Path}' was marked corrupt; copy out what can be read, then repair it with 'qemu-img check -r all'.", Name);
            Throw.ReadOnly(Name);
        }
    }

    /// <summary>Throw OffsetOutOfRange or InvalidLength unless [offset, offset+length) lies within the node.</summary>
    public void CheckRange(long offset, long length)
    {
        if (length < 0)
            Throw.Block(ErrorIds.InvalidLength, BlockErrorCategory.InvalidArgument, $"Length {length} for node '{Name}' is negative.", Name);
        long size = Size;
        if (offset < 0 || offset > size || length > size - offset)
            Throw.OffsetOutOfRange(Name, offset, length, size);
    }

    #endregion

    internal void Close()
    {
        using (Quiesce())
        {
            if (_closed)
                return;
            lock (Sync)
            {
                if (_users.FirstOrDefault() is { } user)
                    Throw.Block(ErrorIds.NodeBusy, BlockErrorCategory.ResourceBusy,
                        $"Node '{Name}' cannot be closed while it is in use by {user.Description}; {user.ReleaseHint}.", Name);
                if (_bitmaps.FirstOrDefault(b => b.Busy) is { } busy)
                    Throw.Block(ErrorIds.NodeBusy, BlockErrorCategory.ResourceBusy,
                        $"Node '{Name}' cannot be closed while bitmap '{busy.Name}' is in use by {busy.BusyWith}.", Name);
                if (_interceptors.Length > 0)
                    Throw.Block(ErrorIds.NodeBusy, BlockErrorCategory.ResourceBusy,
                        $"Node '{Name}' cannot be closed while a backup of it is running; stop the job (Stop-Job) or wait for it.", Name);
            }
            // Data and metadata durable first, then the bitmaps stored clean: a bitmap never says "clean" about
            // writes the image may still lose. Either step failing leaves the node open and usable (its persistent
            // bitmaps still in use on disk, so a crash meanwhile loads them inconsistent): fix the cause and close again.
            if (!ReadOnly)
            {
                Volatile.Write(ref _unsynced, 1);
                SyncLocked();
            }
            StorePersistentBitmaps();
            CloseIntentLog(); // a clean checkpoint, the intent cleared: the log is left empty
            Volatile.Write(ref _closed, true);
            _writeBack.Dispose();
            Image.Dispose();
        }
    }

    public void Dispose() => Close();

    public override string ToString() => Name;

    private sealed class GateRelease(ReaderWriterLockSlim gate) : IDisposable
    {
        private int _released;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 0)
                gate.ExitWriteLock();
        }
    }
}
