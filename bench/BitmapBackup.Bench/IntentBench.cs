using System.Diagnostics;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Digests;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// The cost of a write-intent log (issue 21): the same writes through a node with no bitmap, with a plain persistent
/// bitmap, and with a crash-safe one at several log region sizes, same run, rounds in random order. Each run opens a
/// new sparse 1 GiB raw image, writes, and closes it (the final fdatasync). Two times per run: the writes alone (on
/// the page cache; a crash-safe bitmap's log misses pay their fdatasync here) and the whole run up to the close. The
/// log's misses and syncs are printed: they are the price, one fdatasync of the log per miss. Then what the first
/// backup after a simulated kill -9 reads (<see cref="CrashRead"/>). BB_BENCH_INTENT_RANDOM_ONLY=1 skips the sequential
/// metric, BB_BENCH_INTENT_CRASH_ONLY=1 runs only the crash read, BB_BENCH_INTENT_WRITES sets the random writes.
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

        if (Environment.GetEnvironmentVariable("BB_BENCH_INTENT_CRASH_ONLY") == "1")
        {
            CrashRead(output, dir);
            return;
        }
        var random = new Random(Seed);
        long[] randomOffsets = [.. Enumerable.Range(0, RandomWrites).Select(_ => random.NextInt64(ImageBytes / 4096) * 4096)];
        long[] sequential = [.. Enumerable.Range(0, (int)(ImageBytes / MiB)).Select(i => i * MiB)];
        Metric(output, dir, $"{RandomWrites:N0} random 4 KiB writes over 1 GiB", randomOffsets, 4096, goal: 0.15);
        if (Environment.GetEnvironmentVariable("BB_BENCH_INTENT_RANDOM_ONLY") != "1")
            Metric(output, dir, "sequential 1 GiB in 1 MiB writes", sequential, (int)MiB, goal: 0.05);
        CrashRead(output, dir);
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    /// <summary>
    /// What the first backup after a crash reads: a 64 GiB sparse raw node with 1 GiB of data (1 MiB every 64 MiB),
    /// a full backup, then 1 % of that data rewritten (160 scattered 64 KiB writes), then a simulated kill -9. The
    /// crash-safe bitmap's incremental and Update-DirtyBitmap's narrowing read what the log marked; a plain persistent
    /// bitmap loads inconsistent, and Update-DirtyBitmap must read all the data to rebuild it.
    /// </summary>
    private static void CrashRead(TextWriter output, TempFolder dir)
    {
        CrashRead(output, dir, 160, anywhere: false);
        CrashRead(output, dir, (int)(64 * GiB / 100 / 65536), anywhere: true); // the case: 1 % of the 64 GiB node
    }

    private static void CrashRead(TextWriter output, TempFolder dir, int writes, bool anywhere)
    {
        const long size = 64 * GiB;
        string path = dir.File("crash.img");
        string full = dir.File("crash-full.qcow2");
        string previousState = Environment.GetEnvironmentVariable("BITMAPBACKUP_STATE_HOME") ?? "";
        Environment.SetEnvironmentVariable("BITMAPBACKUP_STATE_HOME", dir.File("state"));
        try
        {
            BlockEngine.CreateImage(path, size, ImageFormat.Raw);
            var engine = new BlockEngine();
            BlockNode node = engine.Open(path, "crash");
            byte[] mib = new byte[MiB];
            var random = new Random(Seed);
            for (long offset = 0; offset < size; offset += 64 * MiB)
            {
                FillRandom(random, mib);
                node.Write(offset, mib);
            }
            node.AddBitmap("safe", 65536, persistent: true, crashSafe: true);
            node.AddBitmap("plain", 65536, persistent: true);
            RunBackup(node, full, BackupSyncMode.Full, BitmapSyncMode.OnSuccess, null);
            node.GetBitmap("plain").Clear(); // both start from the full backup's point in time (nothing wrote since)
            byte[] small = new byte[65536];
            var regions = new HashSet<long>();
            for (int i = 0; i < writes; i++)
            {
                long offset = anywhere
                    ? random.NextInt64(size / 65536) * 65536 // scattered over the whole node, holes included
                    : (random.NextInt64(size / (64 * MiB)) * 64 * MiB) + (random.Next(16) * 65536); // into the data
                FillRandom(random, small);
                node.Write(offset, small);
                regions.Add(offset / node.IntentRegionSize);
            }
            node.Flush();
            node.SimulateCrash();

            var after = new BlockEngine();
            BlockNode reopened = after.Open(path, "crash");
            DirtyBitmap safe = reopened.GetBitmap("safe");
            DirtyBitmap plain = reopened.GetBitmap("plain");
            long marked = safe.DirtyBits * safe.Granularity;
            bool recovered = safe.Recovered, inconsistent = plain.Inconsistent;
            long start = Stopwatch.GetTimestamp();
            BitmapContentUpdateResult narrow = BitmapContentUpdate.Run(reopened, safe, DigestManifest.PathFor(full), whatIf: true);
            double narrowSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            start = Stopwatch.GetTimestamp();
            BackupJob inc = RunBackup(reopened, dir.File("crash-inc.qcow2"), BackupSyncMode.Incremental, BitmapSyncMode.OnSuccess, "crash-full.qcow2");
            double incSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            start = Stopwatch.GetTimestamp();
            BitmapContentUpdateResult rebuild = BitmapContentUpdate.Run(reopened, plain, DigestManifest.PathFor(full));
            double rebuildSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            after.Close(reopened);

            long writtenRegions = regions.Count * WriteIntentLogRegion(reopened);
            output.WriteLine("   -- after a kill -9: 64 GiB sparse raw node, 1 GiB of data, {0:N0} scattered 64 KiB writes ({1} MiB{2}) since the last backup",
                writes, Mib(writes * 65536L), anywhere ? ", 1 % of the node, anywhere in it" : ", into the data");
            output.WriteLine("   {0,-52} {1,10} MiB", "written", Mib(writes * 65536L));
            output.WriteLine("   {0,-52} {1,10} MiB ({2} regions of {3} KiB)", "regions written", Mib(writtenRegions), regions.Count, WriteIntentLogRegion(reopened) / 1024);
            output.WriteLine("   {0,-52} {1,10} MiB (Recovered {2}; the plain bitmap: Inconsistent {3})", "crash-safe bitmap after recovery", Mib(marked), recovered, inconsistent);
            output.WriteLine("   {0,-52} {1,10} MiB read in {2} s; goal <= 2x regions written {3}", "incremental from the recovered bitmap", Mib(inc.BytesRead), F(incSeconds),
                Verdict(inc.BytesRead <= 2 * writtenRegions));
            output.WriteLine("   {0,-52} {1,10} MiB read in {2} s (narrowed {3})", "Update-DirtyBitmap -WhatIf of the recovered bitmap", Mib(narrow.Scan.BytesRead), F(narrowSeconds), narrow.Narrowed);
            output.WriteLine("   {0,-52} {1,10} MiB read in {2} s", "Update-DirtyBitmap of the plain one (full read)", Mib(rebuild.Scan.BytesRead), F(rebuildSeconds));
        }
        finally
        {
            Environment.SetEnvironmentVariable("BITMAPBACKUP_STATE_HOME", previousState.Length > 0 ? previousState : null);
            foreach (string f in new[] { path, path + ".bitmaps", path + ".intent", full, DigestManifest.PathFor(full), dir.File("crash-inc.qcow2"), DigestManifest.PathFor(dir.File("crash-inc.qcow2")) })
                DeleteIfExists(f);
        }
    }

    private static long WriteIntentLogRegion(BlockNode node) => node.IntentRegionSize;

    private static BackupJob RunBackup(BlockNode node, string target, BackupSyncMode sync, BitmapSyncMode mode, string? backing)
    {
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = sync, BitmapName = "safe", BitmapMode = mode, BackingFile = backing,
        });
        job.Completion.Wait();
        if (!job.Succeeded)
            throw new InvalidOperationException($"backup failed: {job.Error?.Message}");
        return job;
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
