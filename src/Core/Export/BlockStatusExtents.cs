using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Export;

/*
 * Engine state to BLOCK_STATUS extents, the way qemu-nbd 7.2 presents them (checked against it with nbdinfo --map):
 *
 *   engine                                     base:allocation flags
 *   Data (stored somewhere in the chain)       0
 *   Zero (a hole, a zero cluster)              3 = HOLE | ZERO
 *   Unallocated (stored nowhere in the chain)  3 = HOLE | ZERO
 *
 *   dirty bit set                              qemu:dirty-bitmap:NAME flags 1 (dirty), clear 0
 *
 * The spec's rules are kept here, once: extents are consecutive from the request's offset, never run past the
 * window asked for (the spec allows the last to, QEMU does not, neither do we), neighbours with equal flags are
 * merged, there are at most `max` of them (1 with REQ_ONE), and there is always at least one. The window is at
 * most ExportPolicy.MaxStatusWindow (1 GiB), so every length fits the u32 field.
 */

/// <summary>Conversion of allocation maps and dirty bitmaps into BLOCK_STATUS extents.</summary>
public static class BlockStatusExtents
{
    /// <summary>base:allocation extents from the chain's allocation of the window, merged, at most <paramref name="max"/>.</summary>
    public static List<NbdExtent> FromAllocation(IEnumerable<AllocationExtent> allocation, int max)
    {
        var extents = new List<NbdExtent>();
        long pendingLength = 0;
        uint pendingFlags = 0;
        foreach (AllocationExtent e in allocation)
        {
            if (e.Length <= 0)
                continue;
            uint flags = e.State == AllocationState.Data ? 0 : NbdState.Hole | NbdState.Zero;
            if (pendingLength > 0 && flags == pendingFlags)
            {
                pendingLength += e.Length;
                continue;
            }
            if (pendingLength > 0)
            {
                extents.Add(new NbdExtent(checked((uint)pendingLength), pendingFlags));
                if (extents.Count == max)
                    return extents;
            }
            pendingLength = e.Length;
            pendingFlags = flags;
        }
        if (pendingLength > 0)
            extents.Add(new NbdExtent(checked((uint)pendingLength), pendingFlags));
        return extents;
    }

    /// <summary>qemu:dirty-bitmap extents from the bitmap's runs of the window (already merged and capped by the bitmap).</summary>
    public static List<NbdExtent> FromBitmap(IReadOnlyList<(long Length, bool Dirty)> runs)
    {
        var extents = new List<NbdExtent>(runs.Count);
        foreach ((long length, bool dirty) in runs)
            extents.Add(new NbdExtent(checked((uint)length), dirty ? NbdState.Dirty : 0));
        return extents;
    }
}
