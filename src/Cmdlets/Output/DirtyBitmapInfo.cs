using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup;

/// <summary>What Get-DirtyBitmap and the bitmap cmdlets write: a snapshot of one dirty bitmap (QEMU's BlockDirtyInfo).</summary>
public sealed class DirtyBitmapInfo
{
    internal DirtyBitmapInfo(DirtyBitmap bitmap)
    {
        lock (bitmap.Node.Sync)
        {
            Node = bitmap.Node.Name;
            Name = bitmap.Name!;
            Granularity = bitmap.Granularity;
            Count = bitmap.Count;
            Recording = bitmap.Recording;
            Busy = bitmap.Busy;
            Persistent = bitmap.Persistent;
            Inconsistent = bitmap.Inconsistent;
            ReadOnly = bitmap.ReadOnly;
            CrashSafe = bitmap.CrashSafe;
            Recovered = bitmap.Recovered;
        }
    }

    /// <summary>Name of the node the bitmap tracks.</summary>
    public string Node { get; }

    public string Name { get; }

    /// <summary>Bytes covered by one bit.</summary>
    public long Granularity { get; }

    /// <summary>Dirty bytes: dirty bits times granularity, as QEMU reports it.</summary>
    public long Count { get; }

    /// <summary>Whether writes are being recorded (during a backup, by the bitmap's successor).</summary>
    public bool Recording { get; }

    /// <summary>In use by a backup: it can be read but not changed or removed.</summary>
    public bool Busy { get; }

    /// <summary>Stored in the image and loaded again when it is opened.</summary>
    public bool Persistent { get; }

    /// <summary>Not saved cleanly (the last writer crashed): it may have missed writes, and can only be removed.</summary>
    public bool Inconsistent { get; }

    /// <summary>Loaded from a read-only node: only enable and disable are allowed.</summary>
    public bool ReadOnly { get; }

    /// <summary>Persistent and protected by a write-intent log beside the image: a crash leaves it a superset of the writes it recorded, not inconsistent.</summary>
    public bool CrashSafe { get; }

    /// <summary>Rebuilt from its write-intent log after a crash (it may mark regions that were not written), until a backup re-anchors it or it is cleared.</summary>
    public bool Recovered { get; }

    public override string ToString() => $"{Node}/{Name}";
}
