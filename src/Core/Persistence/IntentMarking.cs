namespace BitmapBackup.Core.Persistence;

/*
 * Which intent regions a write that misses (touches a region not yet durable in the log) marks, beyond its own.
 *
 * Every miss costs one fdatasync of the log before the write may go on (a few milliseconds on a real disk), so the
 * number of misses, not the number of regions, is the price of the log. Marking more than the write touches is always
 * correct (the log only has to be a superset of what was written); it only costs precision after a crash (what the
 * next incremental reads). Two rules trade a bounded loss of precision for far fewer misses:
 *
 *   - ahead (sequential writers): when the regions just before the write were written recently, mark as many regions
 *     after the write as that run is long, at most MaxAheadBytes. A stream pays one miss per doubling and then one per
 *     MaxAheadBytes; what it marks ahead is never more than what it has written (at most 2x its own run).
 *   - density (writers spread over an area): mark the largest aligned group of regions (2 regions up to MaxGroupBytes)
 *     around a missed region of which at least 1/Density was written recently (before this write). Writes scattered
 *     over a large disk never meet the threshold; random writes over a small area cost one miss per dense group.
 *     Density 2 (half the group written) keeps what a crash makes the next incremental read within 2x the regions
 *     written, the bound; a sparser threshold (1/8 was tried) saves a few misses but can mark 8x.
 *
 * "Recently" is the log's touched sets: regions written since the last checkpoint or in the window before it.
 */

/// <summary>The marking rules of a write-intent log (see the design comment above).</summary>
internal static class IntentMarking
{
    /// <summary>The farthest a sequential stream is marked ahead.</summary>
    public const long MaxAheadBytes = 256L << 20;

    /// <summary>The largest group the density rule marks at once.</summary>
    public const long MaxGroupBytes = 64L << 20;

    /// <summary>A group is marked whole once this fraction of it (1/Density) was written recently.</summary>
    public const int Density = 2;

    /// <summary>
    /// Add to <paramref name="wanted"/> the regions a miss on [<paramref name="first"/>, <paramref name="last"/>] marks;
    /// <paramref name="recent"/> tells whether a region was written recently (before this write).
    /// </summary>
    public static void Expand(long first, long last, long regions, long regionSize, Func<long, bool> recent, Action<long, long> mark)
    {
        mark(first, last - first + 1);
        long maxAhead = Math.Max(1, MaxAheadBytes / regionSize);
        long run = 0;
        for (long r = first - 1; r >= 0 && run < maxAhead && recent(r); r--)
            run++;
        if (run > 0 && last + 1 < regions)
            mark(last + 1, Math.Min(run, regions - last - 1));

        int maxLevel = System.Numerics.BitOperations.Log2((ulong)Math.Max(1, MaxGroupBytes / regionSize));
        for (long r = first; r <= last; r++)
        {
            for (int level = maxLevel; level >= 1; level--)
            {
                long size = 1L << level;
                long start = r & ~(size - 1);
                if (start + size > regions)
                    continue;
                long written = 0;
                for (long x = start; x < start + size; x++)
                {
                    if ((x < first || x > last) && recent(x))
                        written++;
                }
                if (written * Density >= size)
                {
                    mark(start, size);
                    r = Math.Max(r, start + size - 1); // the rest of the write inside this group is marked with it
                    break;
                }
            }
        }
    }
}
