using System.Diagnostics;
using System.Reflection;
using System.Runtime.InteropServices;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Bench;

/// <summary>
/// Stopwatch benchmarks of <see cref="HierarchicalBitmap"/> on the dirty bitmap of a 1 TiB node at 64 KiB
/// granularity (16,777,216 bits). Each metric runs its body once or more to warm up (JIT tiering, caches), then
/// times several repetitions and reports the median and the best; the goal is checked against the median.
/// Inputs (offsets, random bitmaps) are built before timing with fixed seeds.
/// </summary>
public static class BitmapBench
{
    private const long NodeBytes = 1L << 40;                  // 1 TiB
    private const long Granularity = 64 * 1024;               // bytes per bit
    private const int GranularityShift = 16;                  // log2(Granularity)
    private const long Bits = NodeBytes / Granularity;         // 16,777,216
    private const long WriteBytes = 4 * 1024;                  // a tracked guest write
    private const long RangeBytes = 1024 * 1024;               // a 1 MiB range = 16 bits
    private const int Operations = 1 << 20;                    // writes per repetition
    private const int Repetitions = 9;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        output.WriteLine("== bitmap: HierarchicalBitmap, 1 TiB node at 64 KiB granularity ({0:N0} bits) ==", Bits);
        output.WriteLine("   {0}, {1}, {2} CPUs, {3}", RuntimeInformation.FrameworkDescription,
            RuntimeInformation.ProcessArchitecture, Environment.ProcessorCount, BuildKind());
        output.WriteLine("   median (best) of {0} repetitions after warm-up", Repetitions);

        var random = new Random(20240601);
        var map = new HierarchicalBitmap(Bits);

        // -- Set for one 4 KiB write at a random 4 KiB-aligned offset: byte range -> bit range, then Set.
        long[] writeOffsets = RandomOffsets(random, Operations, WriteBytes);
        Timing set4k = Measure(() => map.ResetAll(), () => TrackWrites(map, writeOffsets, WriteBytes));
        Report(output, "Set, one 4 KiB write", set4k.Scale(1e6 / Operations), "ns/write", 50, "<= 50 ns per tracked write");

        // The same with sequential offsets: the leaf words stay in cache, so this is the cost of the code alone
        // (random offsets above mostly pay for a cache miss on the 2 MiB leaf).
        long[] sequentialOffsets = Enumerable.Range(0, Operations).Select(i => i * WriteBytes).ToArray();
        Timing setSequential = Measure(() => map.ResetAll(), () => TrackWrites(map, sequentialOffsets, WriteBytes));
        Report(output, "Set, one 4 KiB write, sequential", setSequential.Scale(1e6 / Operations), "ns/write", null, "(no goal; cache-hot)");

        // -- The whole tracking step of a node write (BlockNode.MarkDirty: node lock, walk of the recording
        // bitmaps, byte range -> bits, Set) on a sparse 1 TiB raw node with one and with three bitmaps.
        TrackThroughNode(output, writeOffsets, bitmaps: 1);
        TrackThroughNode(output, writeOffsets, bitmaps: 3);

        // -- Set for a 1 MiB range at a random 1 MiB-aligned offset (16 bits).
        long[] rangeOffsets = RandomOffsets(random, Operations, RangeBytes);
        Timing set1m = Measure(() => map.ResetAll(), () => TrackWrites(map, rangeOffsets, RangeBytes));
        Report(output, "Set, one 1 MiB range (16 bits)", set1m.Scale(1e6 / Operations), "ns/range", null, "(no goal)");

        // -- Iterate every run.
        HierarchicalBitmap sparse = RandomBitmap(random, 0.01);
        HierarchicalBitmap dense = RandomBitmap(random, 0.50);
        long sparseRuns = 0, denseRuns = 0;
        Timing runs1 = Measure(null, () => sparseRuns = IterateRuns(sparse));
        Report(output, $"Runs, 1% dirty ({sparseRuns:N0} runs)", runs1, "ms", 20, "all extents at 1% in <= 20 ms");
        Timing runs50 = Measure(null, () => denseRuns = IterateRuns(dense));
        Report(output, $"Runs, 50% dirty ({denseRuns:N0} runs)", runs50, "ms", null, "(no goal)");

        // -- Count: a field read. Reading from four bitmaps in turn stops the JIT hoisting it out of the loop.
        HierarchicalBitmap[] maps = [sparse, dense, map, sparse];
        const int countReads = 1 << 24;
        long countSum = 0;
        Timing count = Measure(null, () => countSum = ReadCounts(maps, countReads));
        Report(output, "Count", count.Scale(1e6 / countReads), "ns/read", 5, "O(1): a few ns, independent of size");

        // -- Merge two such bitmaps into a scratch copy (the copy is made outside the timed region).
        var scratch = new HierarchicalBitmap(Bits);
        Timing mergeSparse = Measure(() => scratch.CopyFrom(dense), () => scratch.Merge(sparse));
        Report(output, "Merge, 1% into 50%", mergeSparse, "ms", null, "(no goal)");
        Timing mergeDense = Measure(() => scratch.CopyFrom(sparse), () => scratch.Merge(dense));
        Report(output, "Merge, 50% into 1%", mergeDense, "ms", null, "(no goal)");

        // -- Memory of all levels against a flat bitmap of Bits / 8 bytes.
        double ratio = (double)map.MemoryBytes / (Bits / 8);
        string verdict = ratio <= 1.1 ? "ok" : "MISSED";
        output.WriteLine("   {0,-40} {1,12:N0} bytes, {2:F4}x flat   goal: <= 1.1x flat [{3}]",
            "Memory", map.MemoryBytes, ratio, verdict);

        GC.KeepAlive(countSum);
    }

    // ---- Bodies. ----

    private static void TrackThroughNode(TextWriter output, long[] offsets, int bitmaps)
    {
        string dir = Path.Combine(Path.GetTempPath(), "bb-bench-" + Environment.ProcessId);
        Directory.CreateDirectory(dir);
        string image = Path.Combine(dir, "1tib.img");
        try
        {
            BlockEngine.CreateImage(image, 1L << 40); // sparse: no data is written
            var engine = new BlockEngine();
            BlockNode node = engine.Open(image, "bench");
            var tracked = Enumerable.Range(0, bitmaps).Select(i => node.AddBitmap($"b{i}")).ToArray();
            Timing timing = Measure(() => { foreach (var b in tracked) b.ResetRange(0, node.Size); }, () =>
            {
                foreach (long offset in offsets)
                    node.MarkDirty(offset, WriteBytes);
            });
            Report(output, $"Tracked 4 KiB node write, {bitmaps} bitmap(s)", timing.Scale(1e6 / offsets.Length), "ns/write",
                bitmaps == 1 ? 50 : null, bitmaps == 1 ? "<= 50 ns per tracked write" : "(no goal)");
            engine.CloseAll();
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static void TrackWrites(HierarchicalBitmap map, long[] offsets, long length)
    {
        foreach (long offset in offsets)
        {
            long first = offset >> GranularityShift;
            long last = (offset + length - 1) >> GranularityShift;
            map.Set(first, last - first + 1);
        }
    }

    private static long IterateRuns(HierarchicalBitmap map)
    {
        long runs = 0, bits = 0;
        foreach ((long _, long count) in map.Runs())
        {
            runs++;
            bits += count;
        }

        if (bits != map.Count)
        {
            throw new InvalidOperationException($"Runs covered {bits} bits; Count is {map.Count}.");
        }

        return runs;
    }

    private static long ReadCounts(HierarchicalBitmap[] maps, int reads)
    {
        long sum = 0;
        for (int i = 0; i < reads; i++)
        {
            sum += maps[i & 3].Count;
        }

        return sum;
    }

    // ---- Inputs. ----

    private static long[] RandomOffsets(Random random, int count, long alignment)
    {
        var offsets = new long[count];
        long slots = NodeBytes / alignment;
        for (int i = 0; i < count; i++)
        {
            offsets[i] = random.NextInt64(slots) * alignment;
        }

        return offsets;
    }

    private static HierarchicalBitmap RandomBitmap(Random random, double density)
    {
        var map = new HierarchicalBitmap(Bits);
        for (long bit = 0; bit < Bits; bit++)
        {
            if (random.NextDouble() < density)
            {
                map.Set(bit, 1);
            }
        }

        return map;
    }

    // ---- Harness. ----

    /// <summary>Elapsed milliseconds of the repetitions: median and best.</summary>
    private readonly record struct Timing(double MedianMs, double BestMs)
    {
        public Timing Scale(double factor) => new(MedianMs * factor, BestMs * factor);
    }

    /// <summary>Runs <paramref name="setup"/> (untimed) then <paramref name="body"/> (timed), twice to warm up and
    /// then <see cref="Repetitions"/> times.</summary>
    private static Timing Measure(Action? setup, Action body)
    {
        for (int i = 0; i < 2; i++)
        {
            setup?.Invoke();
            body();
        }

        var samples = new double[Repetitions];
        for (int i = 0; i < Repetitions; i++)
        {
            setup?.Invoke();
            long start = Stopwatch.GetTimestamp();
            body();
            samples[i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        }

        Array.Sort(samples);
        return new Timing(samples[Repetitions / 2], samples[0]);
    }

    private static void Report(TextWriter output, string metric, Timing timing, string unit, double? goal, string goalText)
    {
        string verdict = goal is null ? "" : timing.MedianMs <= goal ? " [ok]" : " [MISSED]";
        output.WriteLine("   {0,-40} {1,12:F3} {2,-9} (best {3:F3})   goal: {4}{5}",
            metric, timing.MedianMs, unit, timing.BestMs, goalText, verdict);
    }

    private static string BuildKind()
    {
        bool optimized = typeof(HierarchicalBitmap).Assembly.GetCustomAttribute<DebuggableAttribute>()?.IsJITOptimizerDisabled != true;
        string kind = optimized ? "optimized build" : "DEBUG BUILD: figures are meaningless, use -c Release";
        return Debugger.IsAttached ? kind + ", debugger attached" : kind;
    }
}
