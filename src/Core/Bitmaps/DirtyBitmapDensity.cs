namespace BitmapBackup.Core.Bitmaps;

/*
 * How dirty each part of a bitmap is, for a picture of it: the bitmap's L bits are cut into W cells of consecutive
 * bits, cell c holding bits [floor(c L / W), floor((c+1) L / W)) (sizes differ by at most one bit), and the dirty
 * bits of each cell are counted.
 *
 * The count walks the runs of set bits (HierarchicalBitmap.Runs: NextSet/NextClear over the summary levels), never
 * the bits: each run adds its overlap to the cells it spans, so the cost is O(runs + W) plus the runs' own walk,
 * whatever the size of the disk. The cells' first bits are computed once, in 128-bit arithmetic (c L overflows 64 bits
 * for large bitmaps and wide pictures); the runs come in order, so each only moves a cell cursor forward.
 */

/// <summary>Dirty bits per cell of a bitmap cut into equal cells, counted by walking its runs.</summary>
public static class DirtyBitmapDensity
{
    /// <summary>
    /// The dirty bits of each of <paramref name="cells"/> cells of <paramref name="bits"/> (at most one cell per bit),
    /// and the number of runs of dirty bits. The caller holds the lock that guards <paramref name="bits"/>.
    /// </summary>
    public static long[] Count(HierarchicalBitmap bits, int cells, out long runs)
    {
        ArgumentNullException.ThrowIfNull(bits);
        ArgumentOutOfRangeException.ThrowIfLessThan(cells, 1);
        long length = bits.Length;
        int w = (int)Math.Min(cells, Math.Max(1, length));
        var counts = new long[w];
        runs = 0;
        if (length == 0)
            return counts;
        // The cells' first bits, once (W 128-bit divisions); then each run only compares with them.
        var bounds = new long[w + 1];
        for (int c = 0; c <= w; c++)
            bounds[c] = CellStart(c, w, length);
        int cell = 0;
        foreach ((long start, long count) in bits.Runs())
        {
            runs++;
            while (bounds[cell + 1] <= start)
                cell++;
            long position = start;
            long end = start + count;
            while (position < end)
            {
                long cellEnd = bounds[cell + 1];
                long take = Math.Min(end, cellEnd) - position;
                counts[cell] += take;
                position += take;
                if (position == cellEnd && cell + 1 < w)
                    cell++;
            }
        }
        return counts;
    }

    /// <summary>First bit of cell <paramref name="cell"/> (the bitmap's length for cell <paramref name="cells"/>).</summary>
    public static long CellStart(int cell, int cells, long length) => (long)((Int128)cell * length / cells);

    /// <summary>The cell that holds bit <paramref name="bit"/>.</summary>
    public static int CellOf(long bit, int cells, long length) => (int)((((Int128)bit + 1) * cells - 1) / length);
}
