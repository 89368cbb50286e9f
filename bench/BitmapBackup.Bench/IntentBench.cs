using System.Diagnostics;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// The cost of a write-intent log (issue 21): the same writes through a node with no bitmap, with a plain persistent
/// bitmap, and with a crash-safe one at several log region sizes, same run, rounds in random order. Each run opens a
/// new sparse 1 GiB raw image, writes, and closes it (the final fdatasync). Two times per run: the writes alone (on
/// the page cache; a crash-safe bitmap's log misses pay their fdatasync here) and the whole run up to the close. The
/// log's misses and syncs are printed: they are the price, one fdatasync of the log per miss.
/// </summary>
public static class IntentBench
{
    private const long ImageBytes = GiB;
    private static readonly int Rounds = RunsOr(3);
    private static readonly int RandomWrites = int.TryParse(Environment.GetEnvironmentVariable("BB_BENCH_INTENT_WRITES"), out int n) && n > 0 ? n : 100_000;
    private static readonly long[] RegionSizes = [MiB, 4 * MiB, 16 * MiB];
    private const int Seed = 20261207;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        using var dir = new TempFolder("intent");
        output.WriteLine("== intent: the cost of a crash-safe bitmap's write-intent log, log on vs off, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   median of {0} rounds (random order per round); each run: new sparse 1 GiB raw image, the writes, close (final fdatasync)", Rounds);

        var random = new Random(Seed);
        long[] randomOffsets = [.. Enumerable.Range(0, RandomWrites).Select(_ => random.NextInt64(ImageBytes / 4096) * 4096)];
        long[] sequential = [.. Enumerable.Range(0, (int)(ImageBytes / MiB)).Select(i => i * MiB)];
        Metric(output, dir, $"{RandomWrites:N0} random 4 KiB writes over 1 GiB", randomOffsets, 4096, goal: 0.15);
        if (Environment.GetEnvironmentVariable("BB_BENCH_INTENT_RANDOM_ONLY") != "1")
            Metric(output, dir, "sequential 1 GiB in 1 MiB writes", sequential, (int)MiB, goal: 0.05);
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    private sealed record Mode(string Label, bool Bitmap, bool CrashSafe, long RegionSize);

    private static void Metric(TextWriter output, TempFolder dir, string what, long[] offsets, int size, double goal)
    {
        string path = dir.File("intent.img");
        var modes = new List<Mode> { new("no bitmap", false, false, 0), new("persistent bitmap, no log", true, false, 0) };
        modes.AddRange(RegionSizes.Select(r => new Mode($"crash-safe, log region {r / 1024} KiB", true, true, r)));
        var writeTimes = new Dictionary<Mode, List<double>>();
        var logStats = new Dictionary<Mode, (long Misses, long Syncs)>();
        var contenders = new List<Contender>();
        foreach (Mode mode in modes)
        {
            writeTimes[mode] = [];
            contenders.Add(new Contender(mode.Label, () =>
                {
                    (double writes, double total, long misses, long syncs) = Once(path, mode, offsets, size);
                    writeTimes[mode].Add(writes);
                    logStats[mode] = (misses, syncs);
                    return total;
                },
                () => { Clean(path); BlockEngine.CreateImage(path, ImageBytes, ImageFormat.Raw); },
                () => Clean(path)));
        }
        BitmapBackup.Bench.Rounds.Run(contenders, Rounds);
        output.WriteLine("   -- {0} (goal: log on at most {1:P0} slower than off)", what, goal);
        output.WriteLine("   {0,-34} {1,10} {2,10} {3,12} {4,12} {5,8} {6,8}", "", "writes s", "+close s", "writes/off", "+close/off", "misses", "syncs");
        Contender off = contenders[1];
        foreach ((Mode mode, Contender c) in modes.Zip(contenders))
        {
            (long misses, long syncs) = logStats.GetValueOrDefault(mode);
            output.WriteLine("   {0,-34} {1,10} {2,10} {3,12} {4,12} {5,8} {6,8}", mode.Label, F(Median(writeTimes[mode])), F(c.Median),
                F(PairedRatio(writeTimes[mode], writeTimes[modes[1]]), "F3"), F(PairedRatio(c.Samples, off.Samples), "F3"),
                mode.CrashSafe ? misses.ToString(Inv) : "", mode.CrashSafe ? syncs.ToString(Inv) : "");
        }
    }

    private static (double Writes, double Total, long Misses, long Syncs) Once(string path, Mode mode, long[] offsets, int size)
    {
        byte[] data = new byte[size];
        Array.Fill(data, (byte)1);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "bench");
        node.IntentRegionSize = mode.CrashSafe ? mode.RegionSize : node.IntentRegionSize;
        if (mode.Bitmap)
            node.AddBitmap("b", 65536, persistent: true, crashSafe: mode.CrashSafe);
        long start = Stopwatch.GetTimestamp();
        foreach (long offset in offsets)
            node.Write(offset, data);
        double writes = Stopwatch.GetElapsedTime(start).TotalSeconds;
        long misses = node.IntentLog?.Misses ?? 0, syncs = node.IntentLog?.Syncs ?? 0;
        engine.Close(node);
        return (writes, Stopwatch.GetElapsedTime(start).TotalSeconds, misses, syncs);
    }

    private static void Clean(string path)
    {
        foreach (string suffix in new[] { "", ".bitmaps", ".intent" })
            DeleteIfExists(path + suffix);
    }
}
