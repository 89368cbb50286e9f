using System.Diagnostics;
using System.Text;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// Compressed full backups (issue 13): a 1 GiB raw disk, 50 % of it compressible text-like data in 1 MiB extents
/// (random bytes would not compress at all), backed up compressed by our job (deflate and zstd) and converted by
/// qemu-img convert -c (deflate, and -o compression_type=zstd) in the same run; time and file size side by side.
/// </summary>
public static class CompressBench
{
    private static readonly int Rounds = RunsOr(5);
    private const int Seed = 20261207;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        var tools = new QemuTools();
        using var dir = new TempFolder("compress");
        output.WriteLine("== compress: compressed full backup of a 1 GiB disk (50 % text-like data), ours vs qemu-img convert -c, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   {0}", tools.Describe());
        output.WriteLine("   median of {0} rounds (random order per round); ours = BackupJob Prepare → concluded (read-only node, new qcow2 target, committed)", Rounds);
        string src = dir.File("src.raw");
        MakeTextSource(src, GiB, Seed);
        SyncAll();

        var engine = new BlockEngine();
        BlockNode node = engine.Open(src, "csrc", readOnly: true);
        try
        {
            string oursOut = dir.File("ours.qcow2"), qemuOut = dir.File("qemu.qcow2");
            long oursDeflateSize = 0, oursZstdSize = 0, qemuDeflateSize = 0, qemuZstdSize = 0;
            Action clean = () => { DeleteIfExists(oursOut); DeleteIfExists(qemuOut); };
            var oursDeflate = new Contender("ours -Compress (deflate)", () => Ours(node, oursOut, Qcow2CompressionType.Deflate, ref oursDeflateSize), null, clean);
            var oursZstd = new Contender("ours -Compression Zstd", () => Ours(node, oursOut, Qcow2CompressionType.Zstd, ref oursZstdSize), null, clean);
            var list = new List<Contender> { oursDeflate, oursZstd };
            Contender? qemuDeflate = null, qemuZstd = null;
            if (tools.Img is { } img)
            {
                qemuDeflate = new Contender("qemu-img convert -c", () => Convert(img, src, qemuOut, null, ref qemuDeflateSize), null, clean);
                qemuZstd = new Contender("qemu-img convert -c zstd", () => Convert(img, src, qemuOut, "compression_type=zstd", ref qemuZstdSize), null, clean);
                list.Add(qemuDeflate);
                list.Add(qemuZstd);
            }
            BitmapBackup.Bench.Rounds.Run(list, Rounds);
            output.WriteLine("   {0,-30} {1,8} s ({2}), {3,8} MiB", oursDeflate.Label, F(oursDeflate.Median), Range(oursDeflate.Samples), Mib(oursDeflateSize));
            output.WriteLine("   {0,-30} {1,8} s ({2}), {3,8} MiB", oursZstd.Label, F(oursZstd.Median), Range(oursZstd.Samples), Mib(oursZstdSize));
            if (qemuDeflate is not null && qemuZstd is not null)
            {
                output.WriteLine("   {0,-30} {1,8} s ({2}), {3,8} MiB", qemuDeflate.Label, F(qemuDeflate.Median), Range(qemuDeflate.Samples), Mib(qemuDeflateSize));
                output.WriteLine("   {0,-30} {1,8} s ({2}), {3,8} MiB", qemuZstd.Label, F(qemuZstd.Median), Range(qemuZstd.Samples), Mib(qemuZstdSize));
                double t = PairedRatio(oursDeflate.Samples, qemuDeflate.Samples), size = oursDeflateSize / (double)qemuDeflateSize;
                output.WriteLine("   {0,-30} deflate: time {1:F2}x qemu-img (goal <= 0.5) {2}, size {3:F3}x (goal <= 1.05) {4}", "",
                    t, Verdict(t <= 0.5), size, Verdict(size <= 1.05));
                output.WriteLine("   {0,-30} zstd: time {1:F2}x qemu-img's zstd, size {2:F3}x", "",
                    PairedRatio(oursZstd.Samples, qemuZstd.Samples), oursZstdSize / (double)qemuZstdSize);
            }
        }
        finally
        {
            engine.CloseAll();
        }
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    private static double Ours(BlockNode node, string target, Qcow2CompressionType type, ref long size)
    {
        long start = Stopwatch.GetTimestamp();
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full, Compress = true, Compression = type,
        });
        job.Completion.Wait();
        double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        if (!job.Succeeded)
            throw new InvalidOperationException($"compressed backup failed: {job.Error?.Message}");
        size = new FileInfo(target).Length;
        return seconds;
    }

    private static double Convert(string img, string src, string target, string? options, ref long size)
    {
        string[] args = options is null
            ? ["convert", "-c", "-f", "raw", "-O", "qcow2", src, target]
            : ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, src, target];
        double seconds = RunChecked(img, args).Seconds;
        size = new FileInfo(target).Length;
        return seconds;
    }

    /// <summary>A sparse raw disk whose every other 1 MiB extent holds pseudo-text (words from a seeded vocabulary).</summary>
    private static void MakeTextSource(string path, long size, int seed)
    {
        var random = new Random(seed);
        string[] words = Enumerable.Range(0, 4000).Select(_ => new string(Enumerable.Range(0, random.Next(2, 10)).Select(_ => (char)('a' + random.Next(26))).ToArray())).ToArray();
        var chunk = new byte[MiB];
        using var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.Write);
        RandomAccess.SetLength(handle, size);
        var text = new StringBuilder();
        for (long offset = 0; offset < size; offset += 2 * MiB)
        {
            text.Clear();
            while (text.Length < MiB)
                text.Append(words[random.Next(words.Length)]).Append(random.Next(12) == 0 ? ".\n" : " ");
            Encoding.ASCII.GetBytes(text.ToString(0, (int)MiB), chunk);
            RandomAccess.Write(handle, chunk, offset);
        }
        RandomAccess.FlushToDisk(handle);
    }
}
