using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup.Core.Nodes;

/*
 * Crash-safe bitmaps (New-DirtyBitmap -Persistent -CrashSafe): the node's write-intent log (WriteIntentLog,
 * docs/write-intent-log.md) and its checkpoints.
 *
 * Invariant: after any crash, each crash-safe bitmap loads as a superset of the writes it was recording, never a
 * subset; where that cannot be shown (the log is torn, missing or belongs to another image), it loads inconsistent,
 * as a persistent bitmap does without a log. Recovered bits = checkpoint bits ∪ (the log's intent regions, when the
 * checkpoint says the bitmap was recording), at the bitmap's granularity.
 *
 * How the node keeps it:
 *   - writes: every write makes its intent regions durable (WriteIntentLog.Ensure) before its driver sees it, inside
 *     the write gate, so no checkpoint falls between a write's intent and its marking;
 *   - checkpoints are taken under the write gate held exclusively: the snapshot, the slot written and made durable,
 *     and the intent shrunk to what was written in the last window, all at one instant as far as writes can tell;
 *   - a timer takes one within CheckpointWindow of the first write after the last one (the intent then shrinks,
 *     and an idle node's log empties within two windows);
 *   - every state change of a crash-safe bitmap that could make a stored one smaller than the truth (enable, disable,
 *     clear, merge, a backup's success or failure, Update-DirtyBitmap, a transaction commit, a resize, an add or a
 *     removal) is made and checkpointed under the gate before the call returns, so no write is recorded by a state the
 *     log does not have yet;
 *   - a log that cannot be written is removed (and the removal synced) before anything relies on it: the bitmaps then
 *     load inconsistent after a crash until a later checkpoint writes a new log; if even the removal fails, the write
 *     that needed the log fails before reaching the image.
 * At a clean close the image's store gets the bits (as for any persistent bitmap) and then the log a clean checkpoint
 * that only names the crash-safe bitmaps, with every intent block cleared.
 */
public sealed partial class BlockNode
{
    private WriteIntentLog? _intent;
    private long _generation; // the last checkpoint generation written, across logs
    private int _checkpointArmed;
    private Timer? _checkpointTimer;
    private BlockException? _lastCheckpointError;

    [ThreadStatic]
    private static HashSet<BlockNode>? t_deferred;

    /// <summary>How soon after the first write since the last checkpoint a new one is taken (and the intent shrunk).</summary>
    public static readonly TimeSpan DefaultCheckpointWindow = TimeSpan.FromSeconds(5);

    /// <summary>The checkpoint window of this node (tests shorten it; <see cref="Timeout.InfiniteTimeSpan"/>: only on state changes).</summary>
    public TimeSpan CheckpointWindow { get; set; } = DefaultCheckpointWindow;

    /// <summary>Bytes of disk per intent bit of a log this node writes from now on (a power of two, at least 64 KiB).</summary>
    public long IntentRegionSize
    {
        get => _intentRegionSize;
        set
        {
            if (value < 65536 || (value & (value - 1)) != 0)
                throw new ArgumentOutOfRangeException(nameof(value), "The intent region size must be a power of two of at least 64 KiB.");
            _intentRegionSize = value;
        }
    }

    private long _intentRegionSize = WriteIntentLog.DefaultRegionSize;

    /// <summary>
    /// Where the node keeps its write-intent log: beside the image, or beside its bitmaps in the bitmap state folder
    /// when they are kept there (a block device: nothing is ever written into /dev).
    /// </summary>
    public string IntentLogPath => IntentLogPathFor(Path, Store);

    /// <summary>The write-intent log of the image at <paramref name="imagePath"/> whose bitmaps live in <paramref name="store"/>.</summary>
    internal static string IntentLogPathFor(string imagePath, IBitmapStore? store)
        => (store is StateFolderBitmapStore { Path: { } stored } ? stored : imagePath) + WriteIntentLog.Suffix;

    /// <summary>Whether a write-intent log protects the node's crash-safe bitmaps now.</summary>
    public bool HasIntentLog => Volatile.Read(ref _intent) is not null;

    internal WriteIntentLog? IntentLog => Volatile.Read(ref _intent);

    /// <summary>The error of the last checkpoint that failed (retried every window), or null once one succeeds.</summary>
    public BlockException? LastCheckpointError => Volatile.Read(ref _lastCheckpointError);

    /// <summary>Test hook: observes every write and fdatasync of the intent logs this node writes from now on.</summary>
    internal Action<long, byte[]?>? IntentObserver { get; set; }

    private bool HasCrashSafeLocked() => _bitmaps.Any(b => b.CrashSafe && b.Name is not null);

    #region Write path

    /// <summary>Before a write reaches the driver: its intent regions are durable. A log that fails is given up (see the design comment).</summary>
    private void EnsureIntent(long offset, long length)
    {
        WriteIntentLog? log = Volatile.Read(ref _intent);
        if (log is null)
            return;
        try
        {
            log.Ensure(offset, length);
        }
        catch (BlockException e)
        {
            LoseIntentLog(log, e); // throws when the log cannot even be removed: the write fails, nothing reached the image
        }
    }

    private readonly Lock _intentLoss = new();

    /// <summary>Remove a log that failed, so that nothing trusts it after a crash; warn; retry a new log later.</summary>
    private void LoseIntentLog(WriteIntentLog log, BlockException error)
    {
        lock (_intentLoss)
        {
            if (Volatile.Read(ref _intent) != log)
                return;
            log.Abandon();
            Volatile.Write(ref _intent, null);
        }
        Volatile.Write(ref _lastCheckpointError, error);
        EngineWarnings.PostOnce($"intent-lost:{Guid.NewGuid()}",
            $"The write-intent log of node '{Name}' ('{log.Path}') could not be written ({error.Message}). It was removed: until a checkpoint writes a new one, a crash leaves the node's crash-safe bitmaps inconsistent, as other persistent bitmaps.");
        ArmCheckpoint(CheckpointWindow);
    }

    /// <summary>The log saw the first write since the last checkpoint: take one within the window.</summary>
    private void OnFirstTouch() => ArmCheckpoint(CheckpointWindow);

    private void ArmCheckpoint(TimeSpan due)
    {
        if (due == Timeout.InfiniteTimeSpan || Volatile.Read(ref _checkpointArmed) != 0 || Interlocked.Exchange(ref _checkpointArmed, 1) != 0)
            return;
        try
        {
            _checkpointTimer?.Change(due, Timeout.InfiniteTimeSpan);
        }
        catch (ObjectDisposedException)
        {
        }
    }

    #endregion

    #region Checkpoints

    /// <summary>Take a checkpoint now and shrink the intent to the last window (what the timer does).</summary>
    public void Checkpoint()
    {
        CheckOpen();
        if (ReadOnly)
            return;
        WriteIntentLog? log;
        using (Quiesce())
        {
            CheckOpen();
            log = CheckpointLocked(tick: true);
        }
        if (log is not null)
        {
            try
            {
                log.Flush();
            }
            catch (BlockException e)
            {
                LoseIntentLog(log, e);
            }
        }
    }

    /// <summary>Timer: the checkpoint window has passed since the first write after the last checkpoint.</summary>
    private void CheckpointTick()
    {
        Volatile.Write(ref _checkpointArmed, 0);
        if (IsClosed)
            return;
        if (!_gate.TryEnterWriteLock(TimeSpan.FromSeconds(1)))
        {
            ArmCheckpoint(TimeSpan.FromMilliseconds(100));
            return;
        }
        WriteIntentLog? log = null;
        try
        {
            if (IsClosed)
                return;
            log = CheckpointLocked(tick: true);
            Volatile.Write(ref _lastCheckpointError, null);
        }
        catch (BlockException e)
        {
            Volatile.Write(ref _lastCheckpointError, e); // the slot may be torn; the other one and the intent still hold: retried
            ArmCheckpoint(CheckpointWindow);
            return;
        }
        finally
        {
            _gate.ExitWriteLock();
        }
        try
        {
            log?.Flush();
        }
        catch (BlockException e)
        {
            try
            {
                LoseIntentLog(log!, e);
            }
            catch (BlockException)
            {
                // the log stays; the next write that needs it fails, or removes it
            }
        }
        if (log is not null && log.CanShrink)
            ArmCheckpoint(CheckpointWindow);
    }

    /// <summary>
    /// A checkpoint under the gate (held exclusively by the caller). With <paramref name="tick"/>: a new window starts,
    /// the slot is written only if something was written in the one that ended, and the intent shrinks (its blocks are
    /// rewritten by the caller's flush of the returned log, outside the gate). Without a log and with crash-safe
    /// bitmaps, writes a new one. Returns the log to flush, or null.
    /// </summary>
    private WriteIntentLog? CheckpointLocked(bool tick)
    {
        bool crashSafe;
        lock (Sync)
            crashSafe = HasCrashSafeLocked();
        WriteIntentLog? log = Volatile.Read(ref _intent);
        if (!crashSafe)
        {
            if (log is not null)
                DropIntentLogLocked();
            return null;
        }
        if (log is null)
        {
            RebuildIntentLogLocked();
            return null;
        }
        bool written = !tick || log.BeginEpoch();
        if (written && !log.WriteCheckpoint(BuildCheckpoint(++_generation, clean: false)))
        {
            RebuildIntentLogLocked(); // the bitmaps outgrew the slots: a new log, empty intent
            return null;
        }
        if (tick)
            log.Shrink();
        return log;
    }

    /// <summary>The checkpoint of every crash-safe bitmap (and <paramref name="extra"/>, not attached yet) as it is now.</summary>
    private IntentCheckpoint BuildCheckpoint(long generation, bool clean, DirtyBitmap? extra = null)
    {
        lock (Sync)
        {
            var entries = new List<IntentCheckpointEntry>();
            foreach (DirtyBitmap b in _bitmaps.Append(extra).OfType<DirtyBitmap>().Where(b => b.CrashSafe && b.Name is not null).Distinct())
                entries.Add(new IntentCheckpointEntry(b.Name!, b.Granularity, b.Recording, b.Inconsistent, b.Recovered,
                    clean || b.Inconsistent ? null : b.CheckpointBitsLocked()));
            return new IntentCheckpoint(generation, clean, Size, entries);
        }
    }

    private IEnumerable<(string, long)> CrashSafeShapes(DirtyBitmap? extra = null)
    {
        lock (Sync)
            return _bitmaps.Append(extra).OfType<DirtyBitmap>().Where(b => b.CrashSafe && b.Name is not null).Distinct().Select(b => (b.Name!, b.Granularity)).ToArray();
    }

    /// <summary>
    /// Write a new log (new file renamed over the old one): a checkpoint of the bitmaps as they are, every intent region
    /// clear. Caller holds the gate exclusively (or the node is not registered yet). Throws BlockException; the old log,
    /// if any, stays in place then.
    /// </summary>
    private void RebuildIntentLogLocked(DirtyBitmap? extra = null)
    {
        IntentCheckpoint checkpoint = BuildCheckpoint(_generation + 1, clean: false, extra);
        WriteIntentLog fresh = CreateIntentLog(checkpoint, CrashSafeShapes(extra), OnFirstTouch);
        _generation = checkpoint.Generation;
        WriteIntentLog? old = Volatile.Read(ref _intent);
        Volatile.Write(ref _intent, fresh);
        Volatile.Write(ref _lastCheckpointError, null);
        try
        {
            old?.Close(null);
        }
        catch (BlockException)
        {
        }
    }

    /// <summary>
    /// A new log at <see cref="IntentLogPath"/>. In a bitmap state folder the log may come before the first stored
    /// bitmap, so the store's folder is made first.
    /// </summary>
    private WriteIntentLog CreateIntentLog(IntentCheckpoint checkpoint, IEnumerable<(string, long)> shapes, Action firstTouch)
    {
        (Store as StateFolderBitmapStore)?.EnsureFolder();
        return WriteIntentLog.Create(IntentLogPath, Path, Size, IntentRegionSize, checkpoint, shapes, firstTouch, IntentObserver);
    }

    /// <summary>
    /// After a resize (caller holds the gate exclusively): a new log for the new size. If it cannot be written, the
    /// old one is closed and left as it is: it describes the old size, so a crash makes it ignored (bitmaps inconsistent).
    /// </summary>
    private void ResizeIntentLogLocked()
    {
        if (ReadOnly)
            return;
        bool crashSafe;
        lock (Sync)
            crashSafe = HasCrashSafeLocked();
        WriteIntentLog? old = Volatile.Read(ref _intent);
        if (!crashSafe)
        {
            if (old is not null)
                DropIntentLogLocked();
            return;
        }
        try
        {
            RebuildIntentLogLocked();
        }
        catch (BlockException e)
        {
            Volatile.Write(ref _intent, null);
            try
            {
                old?.Close(null);
            }
            catch (BlockException)
            {
            }
            Volatile.Write(ref _lastCheckpointError, e);
            EngineWarnings.PostOnce($"intent-resize:{Guid.NewGuid()}",
                $"The write-intent log of node '{Name}' cannot be written for its new size ({e.Message}): until a checkpoint writes it, a crash leaves the node's crash-safe bitmaps inconsistent.");
            ArmCheckpoint(CheckpointWindow);
        }
    }

    /// <summary>No crash-safe bitmap is left: close and remove the log.</summary>
    private void DropIntentLogLocked()
    {
        WriteIntentLog? log = Volatile.Read(ref _intent);
        Volatile.Write(ref _intent, null);
        try
        {
            log?.Delete();
        }
        catch (BlockException)
        {
        }
    }

    /// <summary>
    /// Make an existing bitmap crash-safe, or a plain persistent one again, keeping its bits (Set-DirtyBitmap
    /// -CrashSafe). On: the log's checkpoint lists it, with its bits, before it records another write (a new log when
    /// there is none). Off: the checkpoint no longer lists it (the log is removed when no crash-safe bitmap is left), so a
    /// crash loads it inconsistent, as any persistent bitmap. Refused as <see cref="AddBitmap"/> refuses a crash-safe
    /// bitmap (not persistent, node read-only, log cannot be written: nothing changed), and while the bitmap is busy or
    /// inconsistent. Returns whether anything changed.
    /// </summary>
    public bool SetCrashSafe(DirtyBitmap bitmap, bool crashSafe)
    {
        CheckOpen();
        bitmap.Check(BitmapUse.AllowReadOnly);
        if (bitmap.CrashSafe == crashSafe)
            return false;
        if (crashSafe && !bitmap.Persistent)
            Throw.Block(ErrorIds.CrashSafeRequiresPersistent, BlockErrorCategory.InvalidArgument,
                $"Bitmap '{bitmap.Name}' on node '{Name}' cannot be crash-safe: it is not persistent (a crash-safe bitmap is a persistent bitmap whose writes are also logged).", bitmap.Name);
        if (ReadOnly)
            Throw.Block(ErrorIds.CrashSafeNodeReadOnly, BlockErrorCategory.InvalidOperation,
                $"Can't change whether bitmap '{bitmap.Name}' is crash-safe on node '{Name}': the node is open read-only, so it keeps no write-intent log.", bitmap.Name);
        using (Quiesce()) // no write between the flag and the checkpoint that states it
        {
            CheckOpen();
            bitmap.Check(BitmapUse.AllowReadOnly);
            if (bitmap.CrashSafe == crashSafe)
                return false;
            if (crashSafe)
            {
                lock (Sync)
                    bitmap.CrashSafe = true;
                try
                {
                    LogNewCrashSafeLocked(bitmap);
                }
                catch
                {
                    lock (Sync)
                        bitmap.CrashSafe = false;
                    throw;
                }
            }
            else
            {
                lock (Sync)
                    bitmap.CrashSafe = false;
                CheckpointAfterChangeLocked();
            }
            return true;
        }
    }

    /// <summary>
    /// Make a change to a crash-safe bitmap and checkpoint it before returning, under the write gate (see the design
    /// comment). Inside a transaction (the caller's thread holds this node's gate in <see cref="DeferCheckpoints"/>),
    /// the checkpoint is written once, when the transaction's changes are all made, still under its gates.
    /// </summary>
    internal T ChangeBitmap<T>(DirtyBitmap bitmap, Func<T> change)
    {
        if (!bitmap.CrashSafe || ReadOnly)
            return change();
        if (t_deferred is { } deferred && _gate.IsWriteLockHeld)
        {
            T result = change();
            deferred.Add(this);
            return result;
        }
        using (Quiesce())
        {
            T result = change();
            CheckpointAfterChangeLocked();
            return result;
        }
    }

    internal void ChangeBitmap(DirtyBitmap bitmap, Action change) => ChangeBitmap(bitmap, () =>
    {
        change();
        return 0;
    });

    /// <summary>
    /// The checkpoint of a state change (caller holds the gate exclusively). A log that fails here is removed, since
    /// it may now say less than the change (a bitmap enabled, bits merged): a crash then loads the bitmaps inconsistent.
    /// Throws only when the log can neither be written nor removed.
    /// </summary>
    private void CheckpointAfterChangeLocked()
    {
        if (IsClosed)
            return;
        try
        {
            CheckpointLocked(tick: false);
        }
        catch (BlockException e)
        {
            if (Volatile.Read(ref _intent) is { } log)
                LoseIntentLog(log, e);
            else
                Volatile.Write(ref _lastCheckpointError, e);
        }
    }

    /// <summary>
    /// Hold back the checkpoints of crash-safe bitmap changes made by this thread while it holds the nodes' gates (a
    /// transaction); disposing the scope, still under the gates, writes one checkpoint per node changed.
    /// </summary>
    public static IDisposable DeferCheckpoints() => new Deferral();

    private sealed class Deferral : IDisposable
    {
        private readonly HashSet<BlockNode>? _outer = t_deferred;
        private readonly HashSet<BlockNode> _mine = [];
        private bool _disposed;

        public Deferral() => t_deferred = _mine;

        public void Dispose()
        {
            if (_disposed)
                return;
            _disposed = true;
            t_deferred = _outer;
            BlockException? first = null;
            foreach (BlockNode node in _mine.OrderBy(n => n.Name, StringComparer.Ordinal))
            {
                try
                {
                    using (node.Quiesce())
                        node.CheckpointAfterChangeLocked();
                }
                catch (BlockException e)
                {
                    first ??= e;
                }
            }
            if (first is not null)
                throw first;
        }
    }

    #endregion

    #region Open and close

    /// <summary>
    /// At open, after the store's bitmaps were read: rebuild the ones a crash left in use from the log where it can be
    /// trusted, mark which are crash-safe, and say what was recovered. Caller holds <see cref="Sync"/>. Returns the
    /// warnings to post once the bitmaps are attached.
    /// </summary>
    private DirtyBitmap LoadOne(StoredBitmap stored, IntentLogContents? log, bool forceShare, List<string> notes)
    {
        IntentCheckpointEntry? entry = log?.EntryFor(stored);
        if (log is not null && entry is not null && log.Rebuilds(stored, forceShare))
        {
            var recovered = new DirtyBitmap(this, stored.Name, stored.Granularity, disabled: !entry.Recording, persistent: true)
            {
                CrashSafe = true,
                Recovered = true,
                ReadOnly = ReadOnly,
            };
            recovered.LoadBits(entry.Bits!.Clone());
            long before = recovered.DirtyBits;
            if (entry.Recording)
            {
                long region = log.Layout!.RegionSize;
                foreach ((long start, long count) in log.Intent!.Runs())
                {
                    long offset = start * region;
                    if (offset < Size)
                        recovered.MarkLocked(offset, Math.Min(count * region, Size - offset));
                }
            }
            long added = (recovered.DirtyBits - before) * stored.Granularity;
            notes.Add($"Bitmap '{stored.Name}' of node '{Name}' was left in use by a crash; it is recovered from its write-intent log '{log.Path}': " +
                $"its last checkpoint (generation {log.Checkpoint!.Generation}) plus {added:N0} bytes the log says may have been written since (regions of {log.Layout!.RegionSize / 1024:N0} KiB). " +
                "It is consistent: the next incremental backup copies those regions too, and Update-DirtyBitmap narrows them to what changed.");
            return recovered;
        }
        var bitmap = new DirtyBitmap(this, stored.Name, stored.Granularity, disabled: !stored.Auto || stored.InUse, persistent: true)
        {
            Inconsistent = stored.InUse,
            ReadOnly = ReadOnly,
            CrashSafe = entry is not null,
            Recovered = !stored.InUse && entry is { Recovered: true },
        };
        if (stored.Bits is { } bits)
        {
            bitmap.LoadBits(bits);
            // The disk grew since the bits were stored (a device grown by lvextend or losetup -c while no node had it
            // open): the new range is dirty, as a resize of the node marks it. A shrink only cuts bits off.
            if (stored.DiskSize is long recorded && recorded < Size && stored.Auto && !stored.InUse)
                bitmap.MarkLocked(recorded, Size - recorded);
        }
        if (stored.InUse && entry is not null)
        {
            string why = log!.Problem is { } p ? $"its write-intent log '{log.Path}' is ignored: {p}"
                : entry.Inconsistent ? "it was inconsistent already when its log's last checkpoint was taken"
                : forceShare ? "the node was opened with -ForceShare, so its log may be changing"
                : $"its write-intent log '{log.Path}' says the image was closed cleanly since, so another program (QEMU?) used the image afterwards and did not close it cleanly";
            notes.Add($"Crash-safe bitmap '{stored.Name}' of node '{Name}' is inconsistent: {why}.");
        }
        return bitmap;
    }

    /// <summary>After the bitmaps are loaded, for writing: a new log for the crash-safe ones (none: remove an old one).</summary>
    private void StartIntentLog(bool crashSafe, IntentCheckpoint? found)
    {
        _generation = found?.Generation ?? 0;
        if (!crashSafe)
        {
            if (File.Exists(IntentLogPath))
            {
                try
                {
                    File.Delete(IntentLogPath);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                }
            }
            return;
        }
        try
        {
            RebuildIntentLogLocked();
        }
        catch (BlockException e)
        {
            Volatile.Write(ref _lastCheckpointError, e);
            EngineWarnings.PostOnce($"intent-open:{Guid.NewGuid()}",
                $"The write-intent log of node '{Name}' cannot be written ({e.Message}): until a checkpoint writes it, a crash leaves the node's crash-safe bitmaps inconsistent, as other persistent bitmaps.");
            ArmCheckpoint(CheckpointWindow);
        }
    }

    /// <summary>
    /// At a clean close, after the bitmaps were stored in the image: a clean checkpoint (names only) and every intent
    /// block cleared; no crash-safe bitmap left: the log removed. Best effort: the image's store already says everything.
    /// </summary>
    private void CloseIntentLog()
    {
        _checkpointTimer?.Dispose();
        if (ReadOnly)
            return;
        bool crashSafe;
        lock (Sync)
            crashSafe = HasCrashSafeLocked();
        WriteIntentLog? log = Volatile.Read(ref _intent);
        Volatile.Write(ref _intent, null);
        try
        {
            if (!crashSafe)
            {
                log?.Delete();
                return;
            }
            IntentCheckpoint clean = BuildCheckpoint(++_generation, clean: true);
            if (log is null)
                log = CreateIntentLog(clean, CrashSafeShapes(), () => { });
            log.Close(clean);
        }
        catch (BlockException)
        {
            // the store says the bitmaps were stored cleanly: the log is not needed to load them
        }
    }

    #endregion

    /// <summary>
    /// Test hook: what a kill -9 leaves. The files are closed as they are (writes made so far stay, as the page cache
    /// keeps them), nothing is stored, no clean checkpoint is written; the node is closed. The image's locks go with it.
    /// </summary>
    internal void SimulateCrash()
    {
        _gate.EnterWriteLock();
        try
        {
            if (_closed)
                return;
            Volatile.Write(ref _closed, true);
            _writeBack.Dispose();
            _checkpointTimer?.Dispose();
            WriteIntentLog? log = Volatile.Read(ref _intent);
            Volatile.Write(ref _intent, null);
            log?.Close(null);
            Image.Dispose();
        }
        finally
        {
            _gate.ExitWriteLock();
        }
    }

    /// <summary>The log's costs so far (tests, bench): syncs of intent blocks, writes that missed, regions marked now.</summary>
    public (long Syncs, long Misses, long MarkedRegions) IntentStatistics
        => Volatile.Read(ref _intent) is { } log ? (log.Syncs, log.Misses, log.MarkedRegions) : (0, 0, 0);
}
