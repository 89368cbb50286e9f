using System.Numerics;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Bitmaps;

/// <summary>
/// A named record of which parts of a node were written: bit i covers bytes [i*Granularity, (i+1)*Granularity)
/// of the node. Mirrors QEMU's BdrvDirtyBitmap.
///
/// States (QEMU's names in brackets): recording [active], disabled, busy [frozen/locked: in use by one operation
/// that no one else may change it under: a backup owning it through a successor, or an NBD export serving it as
/// <c>qemu:dirty-bitmap:NAME</c> (<see cref="Claim"/>); <see cref="BusyWith"/> says which], inconsistent
/// [persistent bitmap not saved cleanly: only removal is allowed], read-only [loaded from a read-only image: only
/// enable/disable]. <see cref="BitmapUse"/> says which operation refuses
/// which state.
///
/// Successor protocol used by backups: <see cref="CreateSuccessor"/> freezes this bitmap (busy, not written any
/// more) and starts an anonymous successor that takes the writes from then on; at the end either
/// <see cref="Abdicate"/> (the backup succeeded: keep only the new writes) or <see cref="Reclaim"/> (it failed:
/// merge the new writes back, so no bit is lost). Both keep this object's identity: callers holding it stay valid.
///
/// Locking: every field is read and changed under the owning node's <see cref="BlockNode.Sync"/> lock.
/// </summary>
public sealed class DirtyBitmap
{
    private readonly int _shift;
    private HierarchicalBitmap _bits;
    private bool _disabled;

    internal DirtyBitmap(BlockNode node, string? name, long granularity, bool disabled, bool persistent)
    {
        Node = node;
        Name = name;
        Granularity = granularity;
        _shift = BitOperations.Log2((ulong)granularity);
        _bits = new HierarchicalBitmap(BitsFor(node.Size, granularity));
        _disabled = disabled;
        Persistent = persistent;
    }

    public BlockNode Node { get; }

    /// <summary>The bitmap's name; null for the anonymous successor of a busy bitmap.</summary>
    public string? Name { get; }

    /// <summary>Bytes covered by one bit.</summary>
    public long Granularity { get; }

    /// <summary>The successor taking new writes while a backup uses this bitmap, or null.</summary>
    public DirtyBitmap? Successor { get; private set; }

    /// <summary>The bitmap this one is the successor of, or null.</summary>
    internal DirtyBitmap? Parent { get; private set; }

    public bool Busy { get; private set; }

    /// <summary>What holds the bitmap busy ("a running backup", "NBD export 'disk'"), or null when it is not busy.</summary>
    public string? BusyWith { get; private set; }

    public bool Persistent { get; internal set; }

    /// <summary>
    /// Persistent and kept crash-safe by the node's write-intent log: after a crash it loads as a superset of the
    /// writes it recorded instead of inconsistent (BlockNode.CrashSafe.cs).
    /// </summary>
    public bool CrashSafe { get; internal set; }

    /// <summary>
    /// Rebuilt from the write-intent log after a crash (its bits may include regions that were not written), until a
    /// backup re-anchors it or it is cleared.
    /// </summary>
    public bool Recovered { get; internal set; }

    public bool Inconsistent { get; internal set; }

    public bool ReadOnly { get; internal set; }

    /// <summary>False once disabled. A busy bitmap is disabled itself; its successor records for it.</summary>
    public bool Enabled { get { lock (Node.Sync) return !_disabled; } }

    /// <summary>Whether writes to the node are recorded, by this bitmap or by its successor (QEMU's "recording").</summary>
    public bool Recording
    {
        get
        {
            lock (Node.Sync)
                return !_disabled || (Successor is { } s && !s._disabled);
        }
    }

    /// <summary>Number of dirty bits.</summary>
    public long DirtyBits { get { lock (Node.Sync) return _bits.Count; } }

    /// <summary>Dirty bytes as QEMU reports them: dirty bits times granularity.</summary>
    public long Count => DirtyBits * Granularity;

    /// <summary>Number of bits, ceil(node size / granularity).</summary>
    public long Length { get { lock (Node.Sync) return _bits.Length; } }

    internal bool IsRecordingItself => !_disabled;

    internal static long BitsFor(long size, long granularity) => (size + granularity - 1) / granularity;

    /// <summary>Throw the error QEMU gives when this bitmap's state forbids <paramref name="use"/>.</summary>
    public void Check(BitmapUse use)
    {
        lock (Node.Sync)
        {
            if ((use & BitmapUse.RefuseBusy) != 0 && Busy)
                Throw.Block(ErrorIds.BitmapBusy, BlockErrorCategory.ResourceBusy,
                    $"Bitmap '{Name}' on node '{Node.Name}' is currently in use by another operation ({BusyWith}) and cannot be used.", Name);
            if ((use & BitmapUse.RefuseReadOnly) != 0 && ReadOnly)
                Throw.Block(ErrorIds.BitmapReadOnly, BlockErrorCategory.PermissionDenied,
                    $"Bitmap '{Name}' on node '{Node.Name}' is read-only because the node was opened read-only; it can only be enabled or disabled.", Name);
            if ((use & BitmapUse.RefuseInconsistent) != 0 && Inconsistent)
                Throw.Block(ErrorIds.BitmapInconsistent, BlockErrorCategory.InvalidOperation,
                    $"Bitmap '{Name}' on node '{Node.Name}' is inconsistent (it was not saved cleanly and may have missed writes) and cannot be used. Start a new chain with a full backup that re-anchors it: Start-IncrementalBackup -Sync Full -Bitmap '{Name}' -BitmapMode OnSuccess (the bitmap is consistent again once it succeeds); or remove it with Remove-DirtyBitmap.", Name);
        }
    }

    /// <summary>Whether the cluster holding byte <paramref name="offset"/> is dirty.</summary>
    public bool IsDirty(long offset)
    {
        lock (Node.Sync)
            return _bits.Get(offset >> _shift);
    }

    /// <summary>
    /// The dirty extents as byte ranges (maximal runs of dirty bits), clipped to the node's size, in order.
    /// The list is a snapshot taken under the lock.
    /// </summary>
    public IReadOnlyList<(long Offset, long Length)> GetDirtyRanges()
    {
        var ranges = new List<(long, long)>();
        lock (Node.Sync)
        {
            long size = Node.Size;
            foreach ((long start, long count) in _bits.Runs())
            {
                long offset = start << _shift;
                long end = Math.Min((start + count) << _shift, size);
                ranges.Add((offset, end - offset));
            }
        }
        return ranges;
    }

    /// <summary>
    /// The bitmap cut into <paramref name="cells"/> cells (at most one per bit): dirty bits per cell, the number of runs
    /// of dirty bits, the dirty bits and the bits in all, counted under the lock by walking the runs (<see cref="DirtyBitmapDensity"/>).
    /// </summary>
    public (long[] Counts, long Runs, long DirtyBits, long Bits) CountPerCell(int cells)
    {
        lock (Node.Sync)
        {
            long[] counts = DirtyBitmapDensity.Count(_bits, cells, out long runs);
            return (counts, runs, _bits.Count, _bits.Length);
        }
    }

    /// <summary>A copy of the bits, taken under the lock.</summary>
    public HierarchicalBitmap Snapshot()
    {
        lock (Node.Sync)
            return _bits.Clone();
    }

    /// <summary>QEMU serialization of the whole bitmap (bit N = bit N%8 of byte N/8).</summary>
    public byte[] Serialize()
    {
        lock (Node.Sync)
        {
            byte[] bytes = new byte[HierarchicalBitmap.SerializedSize(_bits.Length)];
            _bits.Serialize(bytes, 0, _bits.Length);
            return bytes;
        }
    }

    // Every change below that a crash must not undo goes through Node.ChangeBitmap: for a crash-safe bitmap it is made
    // and checkpointed in the write-intent log under the node's write gate before the call returns.

    public void Enable() => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            Check(BitmapUse.AllowReadOnly);
            _disabled = false;
            Node.RecordingChanged();
        }
    });

    public void Disable() => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            Check(BitmapUse.AllowReadOnly);
            _disabled = true;
            Node.RecordingChanged();
        }
    });

    /// <summary>Clear every bit. Returns the previous bits so a transaction can put them back.</summary>
    public HierarchicalBitmap Clear() => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            Check(BitmapUse.Default);
            HierarchicalBitmap old = _bits;
            _bits = new HierarchicalBitmap(old.Length);
            Recovered = false;
            return old;
        }
    });

    /// <summary>Take bits loaded from the image; a bitmap of another length (the image was resized) is fitted.</summary>
    internal void LoadBits(HierarchicalBitmap bits)
    {
        lock (Node.Sync)
        {
            if (bits.Length != _bits.Length)
                bits.Resize(_bits.Length);
            _bits = bits;
        }
    }

    /// <summary>Put back bits returned by <see cref="Clear"/> or <see cref="MergeFrom"/> (transaction rollback).</summary>
    public void Restore(HierarchicalBitmap bits) => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            if (bits.Length != _bits.Length)
                throw new InvalidOperationException("The node was resized since the bits were taken.");
            _bits = bits;
        }
    });

    /// <summary>
    /// Make this bitmap the union of itself and every source (QEMU's block-dirty-bitmap-merge). Sources may
    /// belong to other nodes of the same size and may have other granularities. Everything is checked before
    /// anything changes. Returns the previous bits for rollback.
    /// </summary>
    public HierarchicalBitmap MergeFrom(IReadOnlyList<DirtyBitmap> sources) => Node.ChangeBitmap(this, () => MergeFromCore(sources));

    private HierarchicalBitmap MergeFromCore(IReadOnlyList<DirtyBitmap> sources)
    {
        if (sources.Count == 0)
            Throw.Block(ErrorIds.MergeSourceMissing, BlockErrorCategory.InvalidArgument,
                $"Merging into bitmap '{Name}' on node '{Node.Name}' needs at least one source bitmap.", Name);
        Check(BitmapUse.Default);
        var snapshots = new List<(HierarchicalBitmap Bits, long Granularity)>(sources.Count);
        foreach (DirtyBitmap source in sources)
        {
            source.Check(BitmapUse.AllowReadOnly);
            if (source.Node.Size != Node.Size)
                Throw.Block(ErrorIds.BitmapSizeMismatch, BlockErrorCategory.InvalidArgument,
                    $"Bitmaps are of different sizes (destination '{Name}' on node '{Node.Name}' covers {Node.Size} bytes, source '{source.Name}' on node '{source.Node.Name}' covers {source.Node.Size} bytes) and can't be merged.", source.Name);
            snapshots.Add((source.Snapshot(), source.Granularity));
        }
        lock (Node.Sync)
        {
            Check(BitmapUse.Default);
            HierarchicalBitmap old = _bits.Clone();
            foreach ((HierarchicalBitmap bits, long granularity) in snapshots)
            {
                if (bits.Length != _bits.Length && granularity == Granularity)
                    Throw.Block(ErrorIds.BitmapSizeMismatch, BlockErrorCategory.InvalidArgument,
                        $"A source of the merge into bitmap '{Name}' was resized while merging.", Name);
                if (granularity == Granularity)
                    _bits.Merge(bits);
                else
                    _bits.Merge(bits, granularity, Granularity);
            }
            return old;
        }
    }

    /// <summary>Add bits of another granularity without state checks (a backup giving back what it did not copy).</summary>
    internal void MergeInternal(HierarchicalBitmap bits, long granularity) => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            if (granularity == Granularity)
                _bits.Merge(bits);
            else
                _bits.Merge(bits, granularity, Granularity);
        }
    });

    /// <summary>Record a write of [offset, offset+length). Caller holds the node's Sync lock.</summary>
    internal void MarkLocked(long offset, long length)
    {
        long first = offset >> _shift;
        long last = (offset + length - 1) >> _shift;
        _bits.Set(first, last - first + 1);
    }

    /// <summary>Set dirty the clusters covering [offset, offset+length) (tests, backups re-marking uncopied data).</summary>
    public void MarkDirty(long offset, long length)
    {
        if (length <= 0)
            return;
        Node.ChangeBitmap(this, () =>
        {
            lock (Node.Sync)
                MarkLocked(offset, length);
        });
    }

    /// <summary>Reset the clusters wholly inside [offset, offset+length).</summary>
    public void ResetRange(long offset, long length)
    {
        lock (Node.Sync)
        {
            long first = (offset + Granularity - 1) >> _shift;
            long end = Math.Min((offset + length) >> _shift, _bits.Length);
            if ((offset + length) >= Node.Size)
                end = _bits.Length;
            if (end > first)
                _bits.Reset(first, end - first);
        }
    }

    internal void ResizeLocked(long newNodeSize) => _bits.Resize(BitsFor(newNodeSize, Granularity));

    /// <summary>
    /// Freeze this bitmap for a backup: it becomes busy and stops recording; an anonymous successor with the
    /// same granularity and recording state takes every later write. Call while no write is in flight
    /// (<see cref="BlockNode.Quiesce"/>) so each write lands wholly before or after the point in time.
    /// </summary>
    /// <param name="repair">
    /// For a full backup that re-anchors an inconsistent bitmap: allowed although it is inconsistent, the
    /// successor records from the start, and a successful <see cref="Abdicate"/> makes the bitmap consistent again.
    /// </param>
    public DirtyBitmap CreateSuccessor(bool repair = false)
    {
        lock (Node.Sync)
        {
            Check(repair ? BitmapUse.RefuseBusy : BitmapUse.AllowReadOnly);
            bool recordsFromNow = repair && Inconsistent;
            var successor = new DirtyBitmap(Node, null, Granularity, recordsFromNow ? false : _disabled, persistent: false) { Parent = this };
            Successor = successor;
            _disabled = true;
            Busy = true;
            BusyWith = "a running backup";
            Node.AttachLocked(successor);
            return successor;
        }
    }

    /// <summary>
    /// Make the bitmap busy for an operation that reads it as it is and keeps it recording (an NBD export, QEMU's
    /// bdrv_dirty_bitmap_set_busy): every change is refused with BitmapBusy until <see cref="Release"/>. Refused
    /// when busy already or inconsistent.
    /// </summary>
    /// <param name="user">What holds it, for messages: "NBD export 'disk'".</param>
    public void Claim(string user)
    {
        lock (Node.Sync)
        {
            Check(BitmapUse.AllowReadOnly);
            Busy = true;
            BusyWith = user;
        }
    }

    /// <summary>End a <see cref="Claim"/>.</summary>
    public void Release()
    {
        lock (Node.Sync)
        {
            if (Successor is not null)
                throw new InvalidOperationException($"Bitmap '{Name}' on node '{Node.Name}' is held by a backup, not claimed.");
            Busy = false;
            BusyWith = null;
        }
    }

    /// <summary>
    /// The state of [offset, offset+length) as consecutive runs of equal state, at most <paramref name="maxExtents"/>:
    /// the first run starts at <paramref name="offset"/> (mid-granule if it is), the last ends at the range's end or
    /// where the limit cut it. Each run is the dirty or clean stretch of whole bits clipped to the range. Taken
    /// under the lock, without copying the bitmap: O(runs) searches through the summary levels.
    /// </summary>
    public List<(long Length, bool Dirty)> GetExtents(long offset, long length, int maxExtents)
    {
        var extents = new List<(long, bool)>();
        lock (Node.Sync)
        {
            long end = Math.Min(offset + length, Node.Size);
            long endBit = Math.Min(((end - 1) >> _shift) + 1, _bits.Length); // bits that touch the range
            long position = offset;
            while (position < end && extents.Count < maxExtents)
            {
                long bit = position >> _shift;
                if (bit >= endBit)
                {
                    extents.Add((end - position, false));
                    break;
                }
                bool dirty = _bits.Get(bit);
                long change = dirty ? _bits.NextClear(bit, endBit) : _bits.NextSet(bit, endBit);
                long runEnd = change < 0 ? end : Math.Min(change << _shift, end);
                extents.Add((runEnd - position, dirty));
                position = runEnd;
            }
        }
        return extents;
    }

    /// <summary>The backup succeeded: keep only the writes made since the successor was created.</summary>
    public void Abdicate() => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            DirtyBitmap successor = RequireSuccessor();
            _bits = successor._bits;
            Inconsistent = false; // re-anchored by a full backup: exactly the writes since its point in time
            Recovered = false;
            EndSuccession(successor);
        }
    });

    /// <summary>The backup failed or was cancelled: merge the successor's writes back; no bit is lost.</summary>
    public void Reclaim() => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            DirtyBitmap successor = RequireSuccessor();
            _bits.Merge(successor._bits);
            EndSuccession(successor);
        }
    });

    /// <summary>
    /// End a content scan (Update-DirtyBitmap) that ran with a successor: the bits become the old ones (or, for an
    /// inconsistent bitmap, none: its old bits cannot be trusted), plus the writes made during the scan, plus the
    /// clusters the scan found changed (<paramref name="changed"/>, one bit per <paramref name="changedGranularity"/>
    /// bytes). An inconsistent bitmap is consistent again: nothing written since its last backup is missing.
    /// </summary>
    public void CompleteScan(HierarchicalBitmap changed, long changedGranularity) => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            DirtyBitmap successor = RequireSuccessor();
            if (Inconsistent)
            {
                _bits = successor._bits;
                Inconsistent = false;
            }
            else
            {
                _bits.Merge(successor._bits);
            }
            if (changedGranularity == Granularity && changed.Length == _bits.Length)
                _bits.Merge(changed);
            else
                _bits.Merge(changed, changedGranularity, Granularity);
            EndSuccession(successor);
        }
    });

    /// <summary>
    /// End a narrowing scan of a recovered bitmap (Update-DirtyBitmap reading only its marked clusters): every bit
    /// whose clusters were all read and found equal to the last backup is cleared (the bitmap was consistent, so
    /// nothing outside its bits changed); the bits of the clusters that differ stay; the writes made during the scan
    /// are added. <paramref name="scanned"/> and <paramref name="changed"/> have one bit per <paramref name="clusterSize"/> bytes.
    /// </summary>
    public void CompleteNarrowing(HierarchicalBitmap scanned, HierarchicalBitmap changed, long clusterSize) => Node.ChangeBitmap(this, () =>
    {
        lock (Node.Sync)
        {
            DirtyBitmap successor = RequireSuccessor();
            long size = Node.Size;
            foreach ((long start, long count) in scanned.Runs())
            {
                for (long c = start; c < start + count;)
                {
                    if (changed.Get(c))
                    {
                        c++;
                        continue;
                    }
                    long end = changed.NextSet(c, start + count);
                    if (end < 0 || end > start + count)
                        end = start + count;
                    long offset = c * clusterSize;
                    long stop = Math.Min(end * clusterSize, size);
                    long first = (offset + Granularity - 1) >> _shift;
                    long last = stop >= size ? _bits.Length : stop >> _shift; // bits wholly inside the equal clusters
                    if (last > first)
                        _bits.Reset(first, last - first);
                    c = end;
                }
            }
            _bits.Merge(successor._bits);
            EndSuccession(successor);
        }
    });

    /// <summary>The bits a checkpoint holds: this bitmap's, with its successor's (a backup in progress comes back as a failed one). Caller holds Sync.</summary>
    internal HierarchicalBitmap CheckpointBitsLocked()
    {
        HierarchicalBitmap bits = _bits.Clone();
        if (Successor is { } s)
            bits.Merge(s._bits);
        return bits;
    }

    private DirtyBitmap RequireSuccessor()
        => Successor ?? throw new InvalidOperationException($"Bitmap '{Name}' on node '{Node.Name}' has no successor.");

    private void EndSuccession(DirtyBitmap successor)
    {
        _disabled = Inconsistent || successor._disabled; // an inconsistent bitmap never records
        Busy = false;
        BusyWith = null;
        Successor = null;
        successor.Parent = null;
        Node.DetachLocked(successor);
    }

    public override string ToString() => $"{Node.Name}/{Name ?? "(successor)"}";
}
