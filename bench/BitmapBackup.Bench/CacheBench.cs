using System.Diagnostics;
using System.Globalization;
using System.Text;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// Durability costs (issue 23): writes through a node (the engine's write path: gate, bitmaps, write-back timer)
/// into a new 1 GiB qcow2 in -Cache WriteBack (window off, the default 5 s, and a 0.2 s window to show what the
/// timer's syncs cost) and -Cache WriteThrough, beside qemu-io -t writeback and -t writethrough doing the same writes
/// in the same run. Every run ends with the image closed (a final sync), as qemu-io's exit does.
/// </summary>
public static class CacheBench
{
    private const long ImageBytes = GiB;
    private static readonly int Rounds = RunsOr(5);
    private const int RandomWrites = 1024;
    private const int Seed = 20261207;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        var tools = new QemuTools();
        using var dir = new TempFolder("cache");
        output.WriteLine("== cache: write-back window and write-through, ours vs qemu-io, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   {0}", tools.Describe());
        output.WriteLine("   median of {0} rounds (random order per round); each run: new 1 GiB qcow2, the writes, close (final sync)", Rounds);

        var random = new Random(Seed);
        long[] randomOffsets = Enumerable.Range(0, RandomWrites).Select(_ => random.NextInt64(ImageBytes / 4096) * 4096).ToArray();
        long[] sequential = Enumerable.Range(0, 256).Select(i => (long)i * MiB).ToArray();
        Metric(output, tools, dir, $"{RandomWrites:N0} random 4 KiB writes", randomOffsets, 4096);
        Metric(output, tools, dir, "256 sequential 1 MiB writes", sequential, (int)MiB);
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    private static void Metric(TextWriter output, QemuTools tools, TempFolder dir, string what, long[] offsets, int size)
    {
        string ours = dir.File("ours.qcow2");
        string qemu = dir.File("qemu.qcow2");
        Action createOurs = () => { DeleteIfExists(ours); BlockEngine.CreateImage(ours, ImageBytes, ImageFormat.Qcow2); };
        Action removeAll = () => { DeleteIfExists(ours); DeleteIfExists(qemu); };
        var wbOff = new Contender("ours WriteBack, window off", () => OursWrites(ours, offsets, size, CacheMode.WriteBack, Timeout.InfiniteTimeSpan), createOurs, removeAll);
        var wb = new Contender("ours WriteBack, window 5 s (default)", () => OursWrites(ours, offsets, size, CacheMode.WriteBack, BlockNode.DefaultWriteBackWindow), createOurs, removeAll);
        var wbShort = new Contender("ours WriteBack, window 0.2 s", () => OursWrites(ours, offsets, size, CacheMode.WriteBack, TimeSpan.FromMilliseconds(200)), createOurs, removeAll);
        var wt = new Contender("ours WriteThrough", () => OursWrites(ours, offsets, size, CacheMode.WriteThrough, BlockNode.DefaultWriteBackWindow), createOurs, removeAll);
        var list = new List<Contender> { wbOff, wb, wbShort, wt };
        Contender? qemuWb = null, qemuWt = null;
        if (tools.Img is { } img && tools.Io is { } io)
        {
            string script = dir.File("writes.qemu-io");
            var sb = new StringBuilder();
            foreach (long o in offsets)
                sb.Append(CultureInfo.InvariantCulture, $"write -q -P 1 {o} {size}\n");
            File.WriteAllText(script, sb.ToString());
            Action createQemu = () => { DeleteIfExists(qemu); RunChecked(img, ["create", "-q", "-f", "qcow2", qemu, ImageBytes.ToString(Inv)]); };
            qemuWb = new Contender("qemu-io -t writeback", () => RunChecked(io, ["-t", "writeback", "-f", "qcow2", qemu], stdinFile: script, discardStdOut: true).Seconds, createQemu, removeAll);
            qemuWt = new Contender("qemu-io -t writethrough", () => RunChecked(io, ["-t", "writethrough", "-f", "qcow2", qemu], stdinFile: script, discardStdOut: true).Seconds, createQemu, removeAll);
            list.Add(qemuWb);
            list.Add(qemuWt);
        }
        BitmapBackup.Bench.Rounds.Run(list, Rounds);
        output.WriteLine("   -- {0} into a new image", what);
        foreach (Contender c in list)
            output.WriteLine("   {0,-38} {1,8} s ({2})", c.Label, F(c.Median), Range(c.Samples));
        output.WriteLine("   {0,-38} window 5 s / off: {1:F3}; window 0.2 s / off: {2:F3}; WriteThrough / WriteBack: {3:F2}",
            "cost (time ratios, paired)", PairedRatio(wb.Samples, wbOff.Samples), PairedRatio(wbShort.Samples, wbOff.Samples), PairedRatio(wt.Samples, wb.Samples));
        if (qemuWb is not null && qemuWt is not null)
            output.WriteLine("   {0,-38} WriteBack / qemu-io writeback: {1:F2}; WriteThrough / qemu-io writethrough: {2:F2} (qemu-io's times include its start, ~10 ms)",
                "vs QEMU", PairedRatio(wb.Samples, qemuWb.Samples), PairedRatio(wt.Samples, qemuWt.Samples));
    }

    private static double OursWrites(string path, long[] offsets, int size, CacheMode cache, TimeSpan window)
    {
        byte[] data = new byte[size];
        Array.Fill(data, (byte)1);
        long start = Stopwatch.GetTimestamp();
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "bench", cache: cache);
        node.WriteBackWindow = window;
        foreach (long offset in offsets)
            node.Write(offset, data);
        engine.Close(node);
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }
}
