using System.Diagnostics;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Digests;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// Digest manifests (issue 11): Update-DirtyBitmap's content scan of a 1 GiB and an 8 GiB image full of data, side by
/// side in one run with a plain sequential read (cat &gt; /dev/null) and xxhsum when installed; its memory growth
/// at both sizes; and what maintaining the manifest adds to an incremental backup (the same incremental with and
/// without the previous backup's manifest, paired per round).
/// </summary>
public static class DigestBench
{
    private static readonly int Rounds = RunsOr(5);
    private const int Seed = 20261207;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        using var dir = new TempFolder("digest");
        output.WriteLine("== digest: Update-DirtyBitmap scans and manifest upkeep, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   page cache: {0}", CacheNote("the images are warm in the page cache"));
        string? xxhsum = FindOnPath("xxhsum") ?? FindOnPath("xxh128sum");
        string? b3sum = FindOnPath("b3sum");
        output.WriteLine("   reference hashers: {0}", (xxhsum, b3sum) switch
        {
            (null, null) => "xxhsum and b3sum not installed (comparison with cat only)",
            _ => string.Join(", ", new[] { xxhsum, b3sum }.Where(t => t is not null)),
        });
        foreach (long size in new[] { GiB, 8 * GiB })
            Scan(output, dir, size, xxhsum, b3sum);
        Upkeep(output, dir);
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    // ---- Update-DirtyBitmap vs a plain read. ----

    private static void Scan(TextWriter output, TempFolder dir, long size, string? xxhsum, string? b3sum)
    {
        string image = dir.File($"scan-{size / GiB}g.raw");
        string manifest = image + DigestManifest.Suffix;
        Trace("write image", () => WriteRandomFile(image, size, Seed));
        var engine = new BlockEngine();
        BlockNode node = engine.Open(image, "scan");
        try
        {
            DirtyBitmap bitmap = node.AddBitmap("b");
            Trace("write manifest", () => WriteManifest(node, manifest));
            long growth = 0;
            var ours = new Contender("Update-DirtyBitmap", () =>
            {
                GC.Collect();
                long before = Process.GetCurrentProcess().WorkingSet64;
                long managedBefore = GC.GetTotalMemory(false);
                using var sampler = new PeakSampler();
                long start = Stopwatch.GetTimestamp();
                BitmapContentUpdateResult r = BitmapContentUpdate.Run(node, bitmap, manifest);
                double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
                if (r.Scan.ClustersDiffering != 0)
                    throw new InvalidOperationException("the scan found changes in an unchanged image");
                growth = Math.Max(growth, Math.Max(sampler.Peak - before, GC.GetTotalMemory(false) - managedBefore));
                return seconds;
            });
            var cat = new Contender("cat > /dev/null", () => RunChecked("/bin/sh", ["-c", $"cat '{image}' > /dev/null"]).Seconds);
            var list = new List<Contender> { ours, cat };
            Contender? xxh = xxhsum is null ? null : new Contender("xxhsum -H128", () => RunChecked(xxhsum, ["-H2", image]).Seconds);
            Contender? b3 = b3sum is null ? null : new Contender("b3sum", () => RunChecked(b3sum, [image]).Seconds);
            if (xxh is not null)
                list.Add(xxh);
            if (b3 is not null)
                list.Add(b3);
            Trace("warm", () => { RunChecked("/bin/sh", ["-c", $"cat '{image}' > /dev/null"]); });
            BitmapBackup.Bench.Rounds.Run(list, Rounds);
            double ratio = PairedRatio(ours.Samples, cat.Samples); // time ours / time cat
            output.WriteLine("   -- Update-DirtyBitmap of a {0} GiB raw image full of data (every cluster read and hashed), median of {1}", size / GiB, Rounds);
            output.WriteLine("   {0,-34} {1,8} s ({2}), {3,6:F0} MiB/s", ours.Label, F(ours.Median), Range(ours.Samples), size / MiB / ours.Median);
            output.WriteLine("   {0,-34} {1,8} s ({2}), {3,6:F0} MiB/s", cat.Label, F(cat.Median), Range(cat.Samples), size / MiB / cat.Median);
            foreach (Contender c in new[] { xxh, b3 }.OfType<Contender>())
                output.WriteLine("   {0,-34} {1,8} s ({2}), {3,6:F0} MiB/s", c.Label, F(c.Median), Range(c.Samples), size / MiB / c.Median);
            output.WriteLine("   {0,-34} throughput {1:F2}x the plain read (time ratio {2:F2}); goal >= 0.8x {3}", "", 1 / ratio, ratio, Verdict(1 / ratio >= 0.8));
            output.WriteLine("   {0,-34} memory growth during the scan: {1} MiB (manifest streamed; goal: independent of the image size)", "", Mib(growth));
        }
        finally
        {
            engine.CloseAll();
            DeleteIfExists(image);
            DeleteIfExists(manifest);
        }
    }

    /// <summary>The manifest a full backup of the node would write (made here without copying the disk).</summary>
    private static void WriteManifest(BlockNode node, string path)
    {
        var info = new DigestManifestInfo(node.Path, "b", 65536, node.Size, 65536, "bench.qcow2", DateTimeOffset.Now);
        using DigestManifestWriter writer = DigestManifestWriter.Create(path, info, previous: null);
        var hasher = new ClusterHasher(65536, node.Size, writer.Write);
        var buffer = new byte[4 * MiB];
        for (long pos = 0; pos < node.Size; pos += buffer.Length)
        {
            Span<byte> chunk = buffer.AsSpan(0, (int)Math.Min(buffer.Length, node.Size - pos));
            node.Read(pos, chunk);
            hasher.Data(pos, chunk);
        }
        writer.Commit(DateTimeOffset.Now);
    }

    // ---- What the manifest costs an incremental backup. ----

    private static void Upkeep(TextWriter output, TempFolder dir)
    {
        string image = dir.File("inc.qcow2");
        BlockEngine.CreateImage(image, GiB, ImageFormat.Qcow2);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(image, "inc");
        try
        {
            var random = new Random(Seed);
            var chunk = new byte[MiB];
            for (long offset = 0; offset < GiB; offset += 2 * MiB) // 50 % data
            {
                FillRandom(random, chunk);
                node.Write(offset, chunk);
            }
            node.AddBitmap("b");
            string full = dir.File("full.qcow2");
            Backup(node, full, BackupSyncMode.Full, BitmapSyncMode.OnSuccess, null);
            string fullManifest = DigestManifest.PathFor(full);
            for (long offset = 0; offset < GiB; offset += 4 * MiB) // 25 % dirty: long enough to time the difference
            {
                FillRandom(random, chunk);
                node.Write(offset + (3 * MiB / 2), chunk);
            }
            string target = dir.File("inc1.qcow2");
            string stash = fullManifest + ".away";
            var with = new Contender("incremental, manifest kept up", () => Backup(node, target, BackupSyncMode.Bitmap, BitmapSyncMode.Never, "full.qcow2"),
                null, () => { DeleteIfExists(target); DeleteIfExists(DigestManifest.PathFor(target)); });
            var without = new Contender("incremental, no manifest", () => Backup(node, target, BackupSyncMode.Bitmap, BitmapSyncMode.Never, "full.qcow2"),
                () => File.Move(fullManifest, stash), () => { DeleteIfExists(target); File.Move(stash, fullManifest); });
            BitmapBackup.Bench.Rounds.Run([with, without], Rounds + 2);
            double ratio = PairedRatio(with.Samples, without.Samples);
            output.WriteLine("   -- an incremental backup of 25 % of a 1 GiB qcow2 (50 % data), with and without keeping the manifest, median of {0}", Rounds + 2);
            output.WriteLine("   {0,-34} {1,8} s ({2})", with.Label, F(with.Median), Range(with.Samples));
            output.WriteLine("   {0,-34} {1,8} s ({2})", without.Label, F(without.Median), Range(without.Samples));
            output.WriteLine("   {0,-34} time ratio {1:F3}; goal <= 1.05 {2}", "", ratio, Verdict(ratio <= 1.05));
        }
        finally
        {
            engine.CloseAll();
        }
    }

    private static double Backup(BlockNode node, string target, BackupSyncMode sync, BitmapSyncMode mode, string? backing)
    {
        long start = Stopwatch.GetTimestamp();
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = sync, BitmapName = "b", BitmapMode = mode, BackingFile = backing,
        });
        job.Completion.Wait();
        if (!job.Succeeded)
            throw new InvalidOperationException($"backup failed: {job.Error?.Message}");
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    /// <summary>Samples this process's RSS every 5 ms while it lives: the peak of a timed section.</summary>
    private sealed class PeakSampler : IDisposable
    {
        private readonly CancellationTokenSource _stop = new();
        private readonly Task _task;

        public PeakSampler()
        {
            Peak = Process.GetCurrentProcess().WorkingSet64;
            _task = Task.Run(async () =>
            {
                while (!_stop.IsCancellationRequested)
                {
                    long rss = ProcStatusBytes(Environment.ProcessId, "VmRSS");
                    if (rss > Peak)
                        Peak = rss;
                    try
                    {
                        await Task.Delay(5, _stop.Token).ConfigureAwait(false);
                    }
                    catch (OperationCanceledException)
                    {
                    }
                }
            });
        }

        public long Peak { get; private set; }

        public void Dispose()
        {
            _stop.Cancel();
            _task.Wait();
            _stop.Dispose();
        }
    }
}
