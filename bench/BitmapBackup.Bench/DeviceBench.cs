using System.Diagnostics;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// Full backup of a block device (issue 17): a 1 GiB loop device on a sparse file of the test disk, 25 % of it random
/// data in 1 MiB extents (seeded), opened as a node as QEMU's host_device opens it, backed up in full into a new qcow2
/// file by our job, and converted by qemu-img convert -O qcow2 from the same device, in the same run, in random order
/// per round. A device reports all of itself as data: both read the whole GiB, and both keep the target sparse by
/// zero detection. Needs root, losetup and /dev/loop-control; the loop device is always detached.
/// </summary>
public static class DeviceBench
{
    private static readonly int Rounds = RunsOr(5);
    private const int Seed = 20261217;
    private const int DataExtents = 256; // 1 MiB each: 25 % of 1 GiB

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        var tools = new QemuTools();
        output.WriteLine("== devices: full backup of a 1 GiB loop device (25 % data), ours vs qemu-img convert of the same device, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   {0}", tools.Describe());
        string? losetup = FindOnPath("losetup");
        if (losetup is null || !File.Exists("/dev/loop-control") || Environment.UserName != "root")
        {
            output.WriteLine("   skipped: needs root, losetup and /dev/loop-control");
            return;
        }
        using var dir = new TempFolder("devices");
        string backing = dir.File("backing.raw");
        MakeSource(backing, GiB, Seed);
        SyncAll();
        string device = RunChecked(losetup, ["-f", "--show", backing]).StdOut.Trim();
        try
        {
            output.WriteLine("   device {0} on {1}; median of {2} rounds (random order per round); page cache: {3}", device, backing, Rounds,
                CacheNote("the device and its file were read by the previous round (warm)"));
            output.WriteLine("   ours = BackupJob Start → concluded (read-only node on the device, new qcow2 target, flushed, committed)");
            output.WriteLine("   qemu-img = convert -f raw -O qcow2 <device> <target> (process start to exit), then an fsync of the target (ours syncs before it commits)");
            var engine = new BlockEngine();
            BlockNode node = engine.Open(device, "dev", readOnly: true);
            try
            {
                string oursOut = dir.File("ours.qcow2"), qemuOut = dir.File("qemu.qcow2");
                Action clean = () => { DeleteIfExists(oursOut); DeleteIfExists(qemuOut); };
                long oursSize = 0, qemuSize = 0;
                var ours = new Contender("ours full backup", () => Ours(node, oursOut, ref oursSize), null, clean);
                var list = new List<Contender> { ours };
                Contender? qemu = null;
                if (tools.Img is { } img)
                {
                    qemu = new Contender("qemu-img convert", () => Convert(img, device, qemuOut, ref qemuSize), null, clean);
                    list.Add(qemu);
                }
                BitmapBackup.Bench.Rounds.Run(list, Rounds);
                output.WriteLine("   {0,-22} {1,8} s ({2}), {3,8} MiB file, {4,7} MiB/s", ours.Label, F(ours.Median), Range(ours.Samples), Mib(oursSize), F(1024 / ours.Median, "F0"));
                if (qemu is not null)
                {
                    output.WriteLine("   {0,-22} {1,8} s ({2}), {3,8} MiB file, {4,7} MiB/s", qemu.Label, F(qemu.Median), Range(qemu.Samples), Mib(qemuSize), F(1024 / qemu.Median, "F0"));
                    bool same = Ours(node, oursOut, ref oursSize) > 0
                        && RunProcess(tools.Img!, ["compare", "-q", "-f", "qcow2", "-F", "raw", oursOut, device]).ExitCode == 0;
                    clean();
                    output.WriteLine("   {0,-22} time {1:F2}x qemu-img convert (paired median); our backup equals the device (qemu-img compare) {2}", "",
                        PairedRatio(ours.Samples, qemu.Samples), Verdict(same));
                }
            }
            finally
            {
                engine.CloseAll();
            }
        }
        finally
        {
            RunProcess(losetup, ["-d", device]);
        }
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    private static double Ours(BlockNode node, string target, ref long size)
    {
        long start = Stopwatch.GetTimestamp();
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full,
        });
        job.Completion.Wait();
        double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        if (!job.Succeeded)
            throw new InvalidOperationException($"backup of the device failed: {job.Error?.Message}");
        size = new FileInfo(target).Length;
        return seconds;
    }

    private static double Convert(string img, string device, string target, ref long size)
    {
        long start = Stopwatch.GetTimestamp();
        RunChecked(img, ["convert", "-f", "raw", "-O", "qcow2", device, target]);
        using (var handle = File.OpenHandle(target, FileMode.Open, FileAccess.ReadWrite))
            RandomAccess.FlushToDisk(handle);
        double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        size = new FileInfo(target).Length;
        return seconds;
    }

    /// <summary>A sparse 1 GiB file with <see cref="DataExtents"/> random 1 MiB extents at seeded places, the rest holes.</summary>
    private static void MakeSource(string path, long size, int seed)
    {
        var random = new Random(seed);
        var chosen = new SortedSet<long>();
        while (chosen.Count < DataExtents)
            chosen.Add(random.NextInt64(size / MiB));
        byte[] chunk = new byte[MiB];
        using var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.Write);
        RandomAccess.SetLength(handle, size);
        foreach (long slot in chosen)
        {
            FillRandom(random, chunk);
            RandomAccess.Write(handle, chunk, slot * MiB);
        }
        RandomAccess.FlushToDisk(handle);
    }
}
