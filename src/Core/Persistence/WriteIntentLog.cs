using System.Security.Cryptography;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Persistence;

/*
 * The write-intent log of a node with crash-safe bitmaps, open while the node is (format: IntentLogFormat,
 * docs/write-intent-log.md). After Linux md's write-intent bitmap, with the bitmaps' own bits kept in checkpoints.
 *
 * Invariant (what recovery relies on): at every instant, the intent regions on disk cover every write that reached
 * the image after the snapshot of the newest durable checkpoint. Hence after any crash, checkpoint bits ∪ intent
 * regions ⊇ the writes each recording crash-safe bitmap recorded.
 *
 * How each step keeps it:
 *   - a write first makes every region it touches durable here (Ensure): set in the wanted bits, its block written,
 *     fdatasync; only then does the node pass the write to its driver. _durable (what the fast path reads) only ever
 *     holds regions whose block is durable;
 *   - concurrent misses share one flush (group commit): a request is served by the first flush that starts after it;
 *   - regions are cleared only by Shrink, which the node calls under its write gate (no write between its intent and
 *     its marking) right after a checkpoint slot is durable: the new content is "written in the last window", a
 *     superset of "written since that checkpoint" (nothing, at that instant). Blocks rewritten smaller afterwards may
 *     land in any order or tear: a block is either its old content (a superset), its new one, or torn — and a torn
 *     block fails its checksum, so recovery refuses the whole log and the bitmaps load inconsistent, as without a log.
 *
 * Clearing a region does not wait for the data written there to be durable, as md must: the checkpoint holds the bits
 * themselves, so a write a power loss takes back is still marked (a superset, never a subset).
 *
 * The fast path (a region already durable and already touched since the last checkpoint) is two bit tests, no lock.
 * Threads: Ensure from writers holding the node's gate shared; BeginEpoch, Shrink and WriteCheckpoint under the gate
 * held exclusively; Flush from writers or the checkpoint timer; _lock guards the wanted bits and the flush state.
 */

/// <summary>An open write-intent log "&lt;image&gt;.intent".</summary>
internal sealed class WriteIntentLog : IDisposable
{
    public const string Suffix = ".intent";

    /// <summary>The default region size: one intent bit per this many bytes of disk (see docs/write-intent-log.md for the figures).</summary>
    public const long DefaultRegionSize = 1L << 20;

    private readonly SafeFileHandle _handle;
    private readonly int _shift;
    private readonly long _regions;
    private readonly ulong[] _durable;      // regions whose block is durable with them set: the fast path's test
    private ulong[] _touched;               // regions written since the last BeginEpoch (fast path sets them)
    private ulong[] _touchedBefore;         // regions written in the window before that
    private readonly ulong[] _wanted;       // what the blocks must say (⊇ _durable); under _lock
    private readonly bool[] _dirty;         // blocks whose wanted content is not written yet; under _lock
    private readonly object _lock = new();
    private readonly Action _firstTouch;
    private int _anyTouched;
    private long _generation;
    private long _requested, _done;         // group commit: requests made, requests durable
    private bool _flushing, _closed, _lost;
    private long _syncs, _misses;

    private WriteIntentLog(string path, SafeFileHandle handle, IntentLogLayout layout, long nodeSize, long generation, Action firstTouch)
    {
        Path = path;
        _handle = handle;
        Layout = layout;
        _shift = System.Numerics.BitOperations.Log2((ulong)layout.RegionSize);
        _regions = IntentLogLayout.RegionsFor(nodeSize, layout.RegionSize);
        long words = (_regions + 63) / 64;
        _durable = new ulong[words];
        _touched = new ulong[words];
        _touchedBefore = new ulong[words];
        _wanted = new ulong[words];
        _dirty = new bool[layout.IntentBlocks];
        _generation = generation;
        _firstTouch = firstTouch;
    }

    public string Path { get; }

    public IntentLogLayout Layout { get; }

    /// <summary>The newest checkpoint known durable.</summary>
    public long Generation => Volatile.Read(ref _generation);

    /// <summary>Flushes of intent blocks so far (each one fdatasync).</summary>
    public long Syncs => Volatile.Read(ref _syncs);

    /// <summary>Writes that found a region not yet durable.</summary>
    public long Misses => Volatile.Read(ref _misses);

    /// <summary>Regions set in the log now (in memory: what the blocks say once flushed).</summary>
    public long MarkedRegions
    {
        get
        {
            lock (_lock)
                return _wanted.Sum(w => (long)System.Numerics.BitOperations.PopCount(w));
        }
    }

    /// <summary>Test hook: sees every write (offset, bytes) and every fdatasync (offset -1) of the log file, in order.</summary>
    internal Action<long, byte[]?>? Observer { get; set; }

    #region Creation

    /// <summary>
    /// Write a new log for <paramref name="imagePath"/> at <paramref name="path"/> (beside the image, or in the bitmap
    /// state folder for a block device): header, empty intent blocks, <paramref name="checkpoint"/> in its slot; durable,
    /// then renamed over any old log (and the folder synced). The blocks are allocated, so that
    /// writing them later needs no free space. Throws BlockException (ImageIOFailed) naming the log; nothing is left behind.
    /// </summary>
    public static WriteIntentLog Create(string path, string imagePath, long nodeSize, long regionSize, IntentCheckpoint checkpoint, IEnumerable<(string Name, long Granularity)> capacityFor,
        Action firstTouch, Action<long, byte[]?>? observer = null)
    {
        string temp = path + ".tmp";
        long need = IntentLogFormat.MaxSlotBytes(nodeSize, capacityFor);
        long capacity = (need + IntentLogLayout.BlockSize - 1) / IntentLogLayout.BlockSize * IntentLogLayout.BlockSize;
        var layout = new IntentLogLayout(RandomNumberGenerator.GetBytes(16), regionSize, IntentLogLayout.BlocksFor(nodeSize, regionSize), capacity,
            FileIdentity.Of(imagePath), System.IO.Path.GetFileName(imagePath));
        SafeFileHandle handle = ImageFiles.OpenToRewrite(temp); // a writer's image locks, as the image has
        try
        {
            Io(temp, "allocate", () =>
            {
                int errno = LinuxFile.Allocate(handle, 0, layout.FileLength);
                if (errno is not (0 or LinuxFile.EOPNOTSUPP))
                    throw new IOException(LinuxFile.Describe(errno), errno);
                if (errno != 0)
                    RandomAccess.Write(handle, new byte[layout.FileLength - layout.SlotOffset(0)], layout.SlotOffset(0));
            });
            var log = new WriteIntentLog(path, handle, layout, nodeSize, checkpoint.Generation, firstTouch) { Observer = observer };
            log.WriteAt(0, IntentLogFormat.EncodeHeader(layout), temp);
            log.WriteAt(layout.IntentOffset, log.EncodeBlocks(0, layout.IntentBlocks), temp);
            byte[] slot = IntentLogFormat.EncodeSlot(checkpoint, layout);
            log.WriteAt(layout.SlotOffset(IntentLogLayout.SlotOf(checkpoint.Generation)), slot, temp);
            log.SyncFile(temp);
            Io(temp, "rename", () => File.Move(temp, path, overwrite: true));
            LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(path)!);
            return log;
        }
        catch (Exception e)
        {
            handle.Dispose();
            TryDelete(temp);
            if (e is BlockException)
                throw;
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot write the write-intent log '{path}': {e.Message}", path, e);
        }
    }

    #endregion

    #region Write path

    /// <summary>
    /// Before a write of [offset, offset+length) reaches the image: every region it touches is durable in the log when
    /// this returns. Throws BlockException when the log cannot be written (the caller then gives the log up).
    /// </summary>
    public void Ensure(long offset, long length)
    {
        long first = offset >> _shift;
        long last = (offset + length - 1) >> _shift;
        ulong[] touched = Volatile.Read(ref _touched);
        bool miss = false;
        for (long r = first; r <= last; r++)
        {
            int w = (int)(r >> 6);
            ulong bit = 1UL << (int)(r & 63);
            if ((Volatile.Read(ref touched[w]) & bit) == 0)
                Touch(touched, w, bit);
            if ((Volatile.Read(ref _durable[w]) & bit) == 0)
                miss = true;
        }
        if (miss)
            Mark(first, last);
    }

    private void Touch(ulong[] touched, int w, ulong bit)
    {
        Interlocked.Or(ref touched[w], bit);
        if (Volatile.Read(ref _anyTouched) == 0 && Interlocked.Exchange(ref _anyTouched, 1) == 0)
            _firstTouch(); // the node arms its checkpoint timer
    }

    private void Mark(long first, long last)
    {
        lock (_lock)
        {
            if (_closed || _lost)
                return;
            _misses++;
            IntentMarking.Expand(first, last, _regions, Layout.RegionSize, IsRecent, Want);
            WaitDurable(++_requested);
        }
    }

    private bool IsRecent(long r)
    {
        int w = (int)(r >> 6);
        ulong bit = 1UL << (int)(r & 63);
        return ((Volatile.Read(ref _touched[w]) | _touchedBefore[w]) & bit) != 0;
    }

    /// <summary>Set regions [start, start+count) in the wanted bits; their blocks become dirty. Caller holds _lock.</summary>
    private void Want(long start, long count)
    {
        long end = Math.Min(start + count, _regions);
        for (long r = start; r < end; r++)
        {
            int w = (int)(r >> 6);
            ulong bit = 1UL << (int)(r & 63);
            if ((_wanted[w] & bit) != 0)
                continue;
            _wanted[w] |= bit;
            _dirty[(int)(r / IntentLogLayout.RegionsPerBlock)] = true;
        }
    }

    /// <summary>Write the dirty blocks (if any) and wait until they are durable: the shrink after a checkpoint, or a test.</summary>
    public void Flush()
    {
        lock (_lock)
        {
            if (_closed || _lost)
                return;
            WaitDurable(++_requested);
        }
    }

    /// <summary>
    /// Group commit: wait until request <paramref name="mine"/> is durable. The first waiter with no flush in progress
    /// becomes the flusher: it takes every dirty block as it is now (serving every request made so far), writes and
    /// syncs them outside the lock, then wakes the others. Caller holds _lock.
    /// </summary>
    private void WaitDurable(long mine)
    {
        while (_done < mine)
        {
            if (_closed || _lost)
                return;
            if (_flushing)
            {
                Monitor.Wait(_lock);
                continue;
            }
            long upTo = _requested;
            int[] blocks = Enumerable.Range(0, _dirty.Length).Where(i => _dirty[i]).ToArray();
            if (blocks.Length == 0)
            {
                _done = upTo; // nothing dirty: every earlier request is durable already (flushes run one at a time)
                break;
            }
            var content = new (int Block, byte[] Bytes, ulong[] Words)[blocks.Length];
            for (int i = 0; i < blocks.Length; i++)
            {
                content[i] = (blocks[i], EncodeBlocks(blocks[i], 1), SnapshotWords(blocks[i]));
                _dirty[blocks[i]] = false;
            }
            _flushing = true;
            Exception? error = null;
            Monitor.Exit(_lock);
            try
            {
                foreach ((int block, byte[] bytes, _) in content)
                    WriteAt(Layout.BlockOffset(block), bytes, Path);
                SyncFile(Path);
            }
            catch (Exception e)
            {
                error = e;
            }
            finally
            {
                Monitor.Enter(_lock);
                _flushing = false;
            }
            if (error is not null)
            {
                foreach ((int block, _, _) in content)
                    _dirty[block] = true; // still to write: the next flush tries again
                Monitor.PulseAll(_lock);
                throw error as BlockException ?? new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                    $"Cannot write the write-intent log '{Path}': {error.Message}", Path, error);
            }
            foreach ((int block, _, ulong[] words) in content)
            {
                long firstWord = (long)block * IntentLogLayout.RegionsPerBlock / 64;
                for (int i = 0; i < words.Length; i++)
                    Volatile.Write(ref _durable[firstWord + i], words[i] & _wanted[firstWord + i]); // a shrink meanwhile only takes bits away
            }
            _syncs++;
            _done = Math.Max(_done, upTo);
            Monitor.PulseAll(_lock);
        }
    }

    private ulong[] SnapshotWords(int block)
    {
        long firstWord = (long)block * IntentLogLayout.RegionsPerBlock / 64;
        long end = Math.Min(firstWord + (IntentLogLayout.RegionsPerBlock / 64), _wanted.Length);
        return _wanted.AsSpan((int)firstWord, (int)Math.Max(0, end - firstWord)).ToArray();
    }

    /// <summary>Blocks [first, first+count) as the wanted bits say, stamped with the newest durable checkpoint.</summary>
    private byte[] EncodeBlocks(int first, int count)
    {
        byte[] bytes = new byte[(long)count * IntentLogLayout.BlockSize];
        long generation = Volatile.Read(ref _generation);
        for (int i = 0; i < count; i++)
            IntentLogFormat.EncodeBlock(bytes.AsSpan(i * IntentLogLayout.BlockSize, IntentLogLayout.BlockSize), Layout, first + i, generation, _wanted);
        return bytes;
    }

    #endregion

    #region Checkpoints (the node holds its write gate exclusively)

    /// <summary>Start a new window of touched regions; returns whether anything was written in the one that ends.</summary>
    public bool BeginEpoch()
    {
        ulong[] ended = _touched;
        ulong[] reuse = _touchedBefore;
        Array.Clear(reuse);
        _touchedBefore = ended;
        Volatile.Write(ref _touched, reuse);
        Volatile.Write(ref _anyTouched, 0);
        return Array.Exists(ended, w => w != 0);
    }

    /// <summary>Whether regions are marked now or were touched in the window that ended: a later checkpoint can clear more.</summary>
    public bool CanShrink
    {
        get
        {
            lock (_lock)
                return Array.Exists(_wanted, w => w != 0) || Array.Exists(_touchedBefore, w => w != 0);
        }
    }

    /// <summary>
    /// Write a checkpoint in its slot and make it durable. False (nothing written) when it does not fit the slots: the
    /// node then writes a new log. Throws BlockException on an I/O error: the slot may be torn, and the other one (an
    /// older checkpoint, which the intent still covers since nothing was cleared) stays valid.
    /// </summary>
    public bool WriteCheckpoint(IntentCheckpoint checkpoint)
    {
        byte[] slot = IntentLogFormat.EncodeSlot(checkpoint, Layout);
        if (slot.Length > Layout.SlotCapacity)
            return false;
        WriteAt(Layout.SlotOffset(IntentLogLayout.SlotOf(checkpoint.Generation)), slot, Path);
        SyncFile(Path);
        Volatile.Write(ref _generation, checkpoint.Generation);
        return true;
    }

    /// <summary>
    /// Right after a checkpoint is durable (or when nothing was written since the newest one): keep only the regions
    /// written in the window that just ended (md keeps a bit until its region has been idle for a while; hot regions
    /// then never pay a second miss). The blocks are rewritten by the next <see cref="Flush"/>.
    /// </summary>
    public void Shrink()
    {
        lock (_lock)
        {
            for (int w = 0; w < _wanted.Length; w++)
            {
                ulong keep = _touchedBefore[w];
                ulong wanted = _wanted[w] & keep;
                if (wanted != _wanted[w])
                    _dirty[(int)((long)w * 64 / IntentLogLayout.RegionsPerBlock)] = true;
                _wanted[w] = wanted;
                Volatile.Write(ref _durable[w], _durable[w] & keep);
            }
        }
    }

    #endregion

    #region Ending

    /// <summary>
    /// Close the log. With <paramref name="clean"/> (a clean close, the bitmaps stored in the image): write it as the
    /// last checkpoint and clear every intent block first, so the log is left empty. Errors of that last write are thrown
    /// after the file is closed (the image's own store already says everything; a crash-free log is never needed).
    /// </summary>
    public void Close(IntentCheckpoint? clean)
    {
        lock (_lock)
        {
            while (_flushing)
                Monitor.Wait(_lock);
            if (_closed)
                return;
            _closed = true;
            Monitor.PulseAll(_lock);
        }
        try
        {
            if (clean is not null && !_lost)
            {
                Array.Clear(_wanted);
                byte[] slot = IntentLogFormat.EncodeSlot(clean, Layout);
                if (slot.Length <= Layout.SlotCapacity)
                    WriteAt(Layout.SlotOffset(IntentLogLayout.SlotOf(clean.Generation)), slot, Path);
                Volatile.Write(ref _generation, clean.Generation);
                WriteAt(Layout.IntentOffset, EncodeBlocks(0, Layout.IntentBlocks), Path);
                SyncFile(Path);
            }
        }
        finally
        {
            _handle.Dispose();
        }
    }

    /// <summary>
    /// Give the log up after it failed: remove the file and make the removal durable, so that a crash now leaves the
    /// bitmaps inconsistent (the image's store says in use) instead of trusting a log that may miss a write. Throws
    /// BlockException when even that fails (the caller must then refuse the write).
    /// </summary>
    public void Abandon()
    {
        try
        {
            File.Delete(Path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"The write-intent log '{Path}' cannot be written nor removed: {e.Message}", Path, e);
        }
        if (!LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(Path)!) && OperatingSystem.IsLinux())
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                $"The write-intent log '{Path}' cannot be written, and its removal cannot be made durable.", Path);
        lock (_lock)
        {
            _lost = true;
            Monitor.PulseAll(_lock);
        }
        try
        {
            _handle.Dispose();
        }
        catch (IOException)
        {
        }
    }

    /// <summary>Close and remove the log (the node has no crash-safe bitmap any more).</summary>
    public void Delete()
    {
        Close(null);
        TryDelete(Path);
        LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(Path)!);
    }

    public void Dispose() => Close(null);

    #endregion

    #region File I/O

    private void WriteAt(long offset, byte[] data, string name)
    {
        Observer?.Invoke(offset, (byte[])data.Clone());
        Testing.FaultInjection.Check(name, Testing.FaultOperation.FileWrite, offset, data.Length);
        Io(name, "write", () => RandomAccess.Write(_handle, data, offset));
    }

    private void SyncFile(string name)
    {
        Observer?.Invoke(-1, null);
        Testing.FaultInjection.Check(name, Testing.FaultOperation.FileSync, 0, 1);
        Io(name, "flush", () => LinuxFile.DataSync(_handle));
    }

    private static void Io(string path, string what, Action action)
    {
        try
        {
            action();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, e is UnauthorizedAccessException ? BlockErrorCategory.PermissionDenied : BlockErrorCategory.WriteError,
                $"I/O error on the write-intent log '{path}' during {what}: {e.Message}", path, e);
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
        }
    }

    #endregion
}
