using System.Diagnostics;
using System.Text;
using BitmapBackup.Core.Formats.Qcow2;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// qcow2 throughput of our driver (<see cref="Qcow2Image"/>) on a 1 GiB image, side by side in one run with QEMU
/// doing the same work (qemu-img convert, qemu-io, qemu-img bench) and with plain file I/O as the disk's limit.
/// Every metric runs its contenders once per round (random order, sync before each), 5 rounds after a small
/// warm-up; figures are medians, ratios are medians of the per-round ratios (time ours / time theirs: below 1
/// means ours is faster). Everything is in the page cache (drop_caches is not allowed here; see the header).
/// </summary>
public static class Qcow2Bench
{
    private const long ImageBytes = 1L << 30;
    private const int Chunk = 1 << 20;
    private static readonly int Rounds = RunsOr(5);
    private static readonly int RandomRounds = RunsOr(3);
    private const int RandomWrites = 8192;             // 4 KiB writes = 32 MiB (see RandomWrite on why not more)
    private const int RandomReads4K = 65536;           // 4 KiB reads = 256 MiB
    private const long Stride4K = 40503L * 4096;      // odd multiple of 4 KiB: visits distinct 4 KiB blocks
    private const long Stride1M = 397L << 20;          // odd multiple of 1 MiB: a permutation of the 1024 MiB blocks
    private const int Seed = 20251126;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        var tools = new QemuTools();
        using var dir = new TempFolder("qcow2");
        output.WriteLine("== qcow2: our Qcow2Image vs QEMU on a 1 GiB image (64 KiB clusters), same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   {0}", tools.Describe());
        output.WriteLine("   median of {0} rounds (random order per round); ratios = median of per-round time ratios (< 1: ours faster); times include open/create and close", Rounds);
        output.WriteLine("   page cache: {0}", CacheNote("sources and read images are warm in the page cache; every write run ends with fsync (durable) unless marked"));
        if (tools.Img is null)
            output.WriteLine("   qemu-img not on PATH: the qemu-img convert / qemu-img bench comparisons are skipped");
        if (tools.Io is null)
            output.WriteLine("   qemu-io not on PATH: the qemu-io random-write comparisons are skipped");

        string src = dir.File("src.raw");
        WriteRandomFile(src, ImageBytes, Seed);
        long[] randomOffsets = RandomAligned(new Random(Seed), RandomWrites, 4096, ImageBytes);
        long[] strided4K = Strided(RandomWrites, Stride4K, ImageBytes);

        WarmUp(dir);

        string full = SequentialWrite(output, tools, dir, src);
        RandomWrite(output, tools, dir, randomOffsets, strided4K);
        Overwrite(output, tools, dir, full, src, randomOffsets);
        Reads(output, tools, full, src);
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    // ---- Sequential write. ----

    /// <summary>Returns the path of a fully written qcow2 (ours, last round) for the later metrics.</summary>
    private static string SequentialWrite(TextWriter output, QemuTools tools, TempFolder dir, string src)
    {
        string oursOut = dir.File("seq-ours.qcow2");
        string qemuOut = dir.File("seq-qemu.qcow2");
        string plainOut = dir.File("seq-plain.raw");
        // every contender deletes its output right after its run, so each run starts just after a 1 GiB file was
        // deleted: writing right after a delete is measurably faster here (ext4 reuses the freed blocks), so a
        // contender that deleted its own file just before running would be favoured
        var ours = new Contender("ours", () => OursCopyToQcow2(src, oursOut, ImageBytes), null, () => DeleteIfExists(oursOut));
        var plain = new Contender(".NET copy+fsync", () => PlainCopy(src, plainOut), null, () => DeleteIfExists(plainOut));
        var list = new List<Contender> { ours, plain };
        Contender? convertWb = null, convertUnsafe = null;
        if (tools.Img is { } img)
        {
            convertWb = new Contender("qemu-img convert -t writeback", () => RunChecked(img, ["convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", src, qemuOut]).Seconds, null, () => DeleteIfExists(qemuOut));
            convertUnsafe = new Contender("qemu-img convert (default -t unsafe, no flush)", () => RunChecked(img, ["convert", "-f", "raw", "-O", "qcow2", src, qemuOut]).Seconds, null, () => DeleteIfExists(qemuOut));
            list.Add(convertWb);
            list.Add(convertUnsafe);
        }
        Rounds_Run(list);
        DeleteIfExists(oursOut);
        OursCopyToQcow2(src, oursOut, ImageBytes);
        SyncAll();

        output.WriteLine("   -- sequential write: 1 GiB of random data from src.raw (page cache) into a new image, 1 MiB writes, then flush + close");
        bool okPlain = PairedRatio(ours.Samples, plain.Samples) <= 1 / 0.9;
        bool okQemu = convertWb is null || PairedRatio(ours.Samples, convertWb.Samples) <= 1.0;
        Line(output, "seq write, ours vs convert -t writeback", ours, convertWb, plain, ImageBytes,
            "speed >= 0.9x plain copy (time ratio <= 1.11) and >= qemu-img convert", convertWb is null ? null : okPlain && okQemu,
            convertWb is null ? "qemu-img missing: compared with the plain copy only" : null);
        if (convertWb is null)
            output.WriteLine("   {0,-44} goal part 'speed >= 0.9x plain copy' {1}", "", Verdict(okPlain));
        if (convertUnsafe is not null)
            Line(output, "  info: vs convert default (-t unsafe)", ours, convertUnsafe, plain, ImageBytes, "(info: convert does not flush)", null, null);
        return oursOut;
    }

    private static void Rounds_Run(List<Contender> list) => BitmapBackup.Bench.Rounds.Run(list, Rounds);

    // Why only 8,192 random writes and 3 rounds into new images: /tmp is ext4 mounted with "discard", and the images
    // QEMU writes this way (fallocate ZERO_RANGE of each new cluster, then the 4 KiB) are split into tens of
    // thousands of extents; deleting one such 1 GiB file issues one discard per extent (66,000 discards measured
    // for 32,768 writes: 10-36 s per file). Fewer writes keep the untimed clean-up within the suite's budget.

    private static double OursCopyToQcow2(string src, string target, long bytes)
    {
        long start = Stopwatch.GetTimestamp();
        Qcow2Image.Create(target, bytes);
        byte[] buffer = new byte[Chunk];
        using (var input = File.OpenHandle(src, FileMode.Open, FileAccess.Read))
        using (Qcow2Image image = Qcow2Image.Open(target, readOnly: false))
        {
            for (long offset = 0; offset < bytes; offset += Chunk)
            {
                int n = RandomAccess.Read(input, buffer, offset);
                image.Write(offset, buffer.AsSpan(0, n));
            }
            image.Flush();
        }
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    private static double PlainCopy(string src, string target)
    {
        long start = Stopwatch.GetTimestamp();
        byte[] buffer = new byte[Chunk];
        using (var input = File.OpenHandle(src, FileMode.Open, FileAccess.Read))
        using (var outputHandle = File.OpenHandle(target, FileMode.CreateNew, FileAccess.Write))
        {
            long length = RandomAccess.GetLength(input);
            for (long offset = 0; offset < length; offset += Chunk)
            {
                int n = RandomAccess.Read(input, buffer, offset);
                RandomAccess.Write(outputHandle, buffer.AsSpan(0, n), offset);
            }
            RandomAccess.FlushToDisk(outputHandle);
        }
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    // ---- Random writes into a new image. ----

    private static void RandomWrite(TextWriter output, QemuTools tools, TempFolder dir, long[] randomOffsets, long[] strided)
    {
        string oursImg = dir.File("rand-ours.qcow2");
        string qemuImg = dir.File("rand-qemu.qcow2");
        string plainImg = dir.File("rand-plain.raw");
        string script = dir.File("rand-writes.qemu-io");
        WriteQemuIoScript(script, randomOffsets, 4096, pattern: 1);
        Action createOurs = () => { DeleteIfExists(oursImg); Qcow2Image.Create(oursImg, ImageBytes); };
        Action createPlain = () => { DeleteIfExists(plainImg); CreatePreallocated(plainImg, ImageBytes).Dispose(); };
        Action removeAll = () => { DeleteIfExists(oursImg); DeleteIfExists(qemuImg); DeleteIfExists(plainImg); };

        var oursRandom = new Contender("ours", () => OursWrites(oursImg, randomOffsets, 4096), createOurs, removeAll);
        var oursStrided = new Contender("ours strided", () => OursWrites(oursImg, strided, 4096), createOurs, removeAll);
        var plainRandom = new Contender("plain", () => PlainWrites(plainImg, randomOffsets, 4096), createPlain, removeAll);
        var plainStrided = new Contender("plain strided", () => PlainWrites(plainImg, strided, 4096), createPlain, removeAll);
        var list = new List<Contender> { oursRandom, oursStrided, plainRandom, plainStrided };
        Contender? qemuIo = null, qemuBench = null;
        if (tools.Img is { } img)
        {
            Action createQemu = () => { DeleteIfExists(qemuImg); RunChecked(img, ["create", "-q", "-f", "qcow2", qemuImg, ImageBytes.ToString(Inv)]); };
            if (tools.Io is { } io)
            {
                qemuIo = new Contender("qemu-io -t writeback (script on stdin)",
                    () => RunChecked(io, ["-t", "writeback", "-f", "qcow2", qemuImg], stdinFile: script, discardStdOut: true).Seconds, createQemu, removeAll);
                list.Add(qemuIo);
            }
            qemuBench = new Contender("qemu-img bench -w -d 1",
                () => RunChecked(img, ["bench", "-w", "-t", "writeback", "-f", "qcow2", "-d", "1", "-c", strided.Length.ToString(Inv), "-s", "4096", "-S", Stride4K.ToString(Inv), qemuImg]).Seconds,
                createQemu, removeAll);
            list.Add(qemuBench);
        }
        BitmapBackup.Bench.Rounds.Run(list, RandomRounds);

        output.WriteLine("   -- random 4 KiB writes into a new empty image ({0:N0} writes = {1} MiB, then flush + close; plain = pwrite into a new preallocated raw file + fsync); median of {2} rounds", RandomWrites, Mib(RandomWrites * 4096L), RandomRounds);
        Line(output, "rand 4K write, random offsets (qemu-io)", oursRandom, qemuIo, plainRandom, RandomWrites * 4096L, "(no goal)", null,
            qemuIo is null ? "qemu-io missing: comparison skipped" : null);
        Line(output, "rand 4K write, strided (qemu-img bench)", oursStrided, qemuBench, plainStrided, strided.Length * 4096L, "(no goal)", null,
            qemuBench is null ? "qemu-img missing: comparison skipped" : null);
        output.WriteLine("   {0,-44} {1:N0} of 16,384 clusters allocated by the random offsets, {2:N0} by the strided ones (ours writes whole 64 KiB clusters: {3} MiB)",
            "", randomOffsets.Select(o => o >> 16).Distinct().Count(), strided.Select(o => o >> 16).Distinct().Count(), randomOffsets.Select(o => o >> 16).Distinct().Count() / 16);
    }

    private static double OursWrites(string path, long[] offsets, int size)
    {
        byte[] data = new byte[size];
        Array.Fill(data, (byte)1);
        long start = Stopwatch.GetTimestamp();
        using (Qcow2Image image = Qcow2Image.Open(path, readOnly: false))
        {
            foreach (long offset in offsets)
                image.Write(offset, data);
            image.Flush();
        }
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    private static double PlainWrites(string path, long[] offsets, int size)
    {
        byte[] data = new byte[size];
        Array.Fill(data, (byte)1);
        long start = Stopwatch.GetTimestamp();
        using (var handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite))
        {
            foreach (long offset in offsets)
                RandomAccess.Write(handle, data, offset);
            RandomAccess.FlushToDisk(handle);
        }
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    // ---- Random overwrites of a fully written image (no allocation). ----

    private static void Overwrite(TextWriter output, QemuTools tools, TempFolder dir, string full, string src, long[] randomOffsets)
    {
        string script = dir.File("overwrite.qemu-io");
        WriteQemuIoScript(script, randomOffsets, 4096, pattern: 2);
        var ours = new Contender("ours", () => OursWrites(full, randomOffsets, 4096));
        var plain = new Contender("plain", () => PlainWrites(src, randomOffsets, 4096));
        var list = new List<Contender> { ours, plain };
        Contender? qemuIo = null;
        if (tools.Io is { } io)
        {
            qemuIo = new Contender("qemu-io", () => RunChecked(io, ["-t", "writeback", "-f", "qcow2", full], stdinFile: script, discardStdOut: true).Seconds);
            list.Add(qemuIo);
        }
        Rounds_Run(list);
        output.WriteLine("   -- random 4 KiB overwrites of the fully written image (in place, no allocation; plain = the raw source file)");
        Line(output, "rand 4K overwrite (qemu-io)", ours, qemuIo, plain, RandomWrites * 4096L, "(no goal)", null,
            qemuIo is null ? "qemu-io missing: comparison skipped" : null);
    }

    // ---- Reads of the fully written image. ----

    private static void Reads(TextWriter output, QemuTools tools, string full, string src)
    {
        output.WriteLine("   -- reads of the fully written image (page cache), one request at a time; QEMU = qemu-img bench -t writeback -d 1 (read mode)");
        ReadMetric(output, tools, full, src, "seq 1 MiB reads, 1 GiB", Chunk, (int)(ImageBytes / Chunk), Chunk);
        ReadMetric(output, tools, full, src, "seq 4 KiB reads, first 256 MiB", 4096, (int)(ImageBytes / 4 / 4096), 4096);
        ReadMetric(output, tools, full, src, "strided 4 KiB reads (random-like)", 4096, RandomReads4K, Stride4K, depth8: true);
        ReadMetric(output, tools, full, src, "strided 1 MiB reads (random order)", Chunk, (int)(ImageBytes / Chunk), Stride1M);
    }

    private static void ReadMetric(TextWriter output, QemuTools tools, string full, string src, string metric, int size, int count, long step, bool depth8 = false)
    {
        long[] offsets = Strided(count, step, ImageBytes);
        var ours = new Contender("ours", () => OursReads(full, offsets, size));
        var plain = new Contender("plain", () => PlainReads(src, offsets, size));
        var list = new List<Contender> { ours, plain };
        Contender? bench = null, bench8 = null;
        if (tools.Img is { } img)
        {
            string[] Args(int depth) => ["bench", "-t", "writeback", "-f", "qcow2", "-d", depth.ToString(Inv), "-c", count.ToString(Inv), "-s", size.ToString(Inv), "-S", step.ToString(Inv), full];
            bench = new Contender("qemu-img bench -d 1", () => RunChecked(img, Args(1)).Seconds);
            list.Add(bench);
            if (depth8)
            {
                bench8 = new Contender("qemu-img bench -d 8", () => RunChecked(img, Args(8)).Seconds);
                list.Add(bench8);
            }
        }
        Rounds_Run(list);
        long bytes = (long)count * size;
        Line(output, $"{metric} ({count:N0})", ours, bench, plain, bytes, "(no goal)", null, bench is null ? "qemu-img missing: comparison skipped" : null);
        if (bench8 is not null)
            Line(output, "  info: vs qemu-img bench -d 8", ours, bench8, plain, bytes, "(info: 8 requests in flight)", null, null);
    }

    private static double OursReads(string path, long[] offsets, int size)
    {
        byte[] buffer = new byte[size];
        long start = Stopwatch.GetTimestamp();
        using (Qcow2Image image = Qcow2Image.Open(path, readOnly: true))
        {
            foreach (long offset in offsets)
                image.Read(offset, buffer);
        }
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    private static double PlainReads(string path, long[] offsets, int size)
    {
        byte[] buffer = new byte[size];
        long start = Stopwatch.GetTimestamp();
        using (var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read))
        {
            foreach (long offset in offsets)
                RandomAccess.Read(handle, buffer, offset);
        }
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }

    // ---- Warm-up: every body of ours once on 64 MiB (JIT tiers, pools). ----

    private static void WarmUp(TempFolder dir)
    {
        const long small = 64L << 20;
        string src = dir.File("warm.raw");
        string img = dir.File("warm.qcow2");
        WriteRandomFile(src, small, Seed + 1);
        long[] offsets = RandomAligned(new Random(1), 4096, 4096, small);
        for (int i = 0; i < 2; i++)
        {
            DeleteIfExists(img);
            OursCopyToQcow2(src, img, small);
            OursWrites(img, offsets, 4096);
            OursReads(img, Strided(4096, Stride4K, small), 4096);
            OursReads(img, Strided(64, Stride1M, small), Chunk);
            DeleteIfExists(img);
            Qcow2Image.Create(img, small);
            OursWrites(img, offsets, 4096);
            PlainReads(src, offsets, 4096);
        }
        DeleteIfExists(img);
        DeleteIfExists(src);
    }

    // ---- Inputs. ----

    private static long[] RandomAligned(Random random, int count, long alignment, long size)
    {
        var offsets = new long[count];
        for (int i = 0; i < count; i++)
            offsets[i] = random.NextInt64(size / alignment) * alignment;
        return offsets;
    }

    /// <summary>qemu-img bench's offsets (QEMU 7.2): the first at 0, then offset = (offset + step) % size.</summary>
    private static long[] Strided(int count, long step, long size)
    {
        var offsets = new long[count];
        long offset = 0;
        for (int i = 0; i < count; i++)
        {
            offsets[i] = offset;
            offset = (offset + step) % size;
        }
        return offsets;
    }

    private static void WriteQemuIoScript(string path, long[] offsets, int size, int pattern)
    {
        var sb = new StringBuilder();
        foreach (long offset in offsets)
            sb.Append(Inv, $"write -q -P {pattern} {offset} {size}\n");
        sb.Append("flush\n");
        File.WriteAllText(path, sb.ToString());
    }

    // ---- Printing. ----

    /// <summary>
    /// One line: ours, QEMU's and the plain yardstick (median s and MiB/s), then the paired time ratios, then the
    /// goal. <paramref name="ok"/> null prints no verdict.
    /// </summary>
    private static void Line(TextWriter output, string metric, Contender ours, Contender? qemu, Contender? plain, long bytes, string goal, bool? ok, string? skipped)
    {
        var sb = new StringBuilder();
        sb.Append(Inv, $"   {metric,-44} ours {F(ours.Median)} s {Speed(bytes, ours.Median),6} MiB/s");
        if (qemu is not null)
            sb.Append(Inv, $" | {qemu.Label} {F(qemu.Median)} s");
        if (plain is not null)
            sb.Append(Inv, $" | {plain.Label} {F(plain.Median)} s");
        if (qemu is not null)
            sb.Append(Inv, $" | ours/QEMU {F(PairedRatio(ours.Samples, qemu.Samples), "F2")}");
        if (plain is not null)
            sb.Append(Inv, $" | ours/plain {F(PairedRatio(ours.Samples, plain.Samples), "F2")}");
        sb.Append(Inv, $"   goal: {goal}");
        if (ok is { } v)
            sb.Append(' ').Append(Verdict(v));
        if (skipped is not null)
            sb.Append(Inv, $" [{skipped}]");
        output.WriteLine(sb.ToString());
        output.WriteLine("   {0,-44} ours range {1} s{2}{3}", "", Range(ours.Samples),
            qemu is null ? "" : $", QEMU range {Range(qemu.Samples)} s",
            plain is null ? "" : $", plain range {Range(plain.Samples)} s");
    }

    private static string Speed(long bytes, double seconds) => (bytes / (double)MiB / seconds).ToString("F0", Inv);
}
