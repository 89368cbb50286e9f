using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// The reference scenario of /work/shared/research/qemu-reference-run.md, run with this engine and with QEMU's
/// backup job in qemu-storage-daemon in the same process run: a 1 GiB source with 50 % data (512 random 1 MiB
/// extents, seeded), raw and qcow2; a full backup that also starts bitmap bm0; then 1 %, 5 % and 25 % of the disk
/// written as distinct random 64 KiB clusters, each followed by an incremental backup on top of the previous one.
/// Both chains are checked with qemu-img compare after every step. Peak memory: ours = VmHWM of this process
/// during the job (reset before it) minus the RSS before it, plus the bytes allocated; QEMU = VmHWM of the daemon.
/// Each step also prints every run's time with the kernel CPU time it cost (this process, or the daemon): on a
/// virtual machine whose host takes free memory back, page-cache pages that are new to the guest cost a host fault
/// on first touch, and that cost lands in the kernel time of whichever engine writes the new target.
/// Before every timed run of the 1 GiB scenario (ours, QEMU's and the plain yardstick alike) the page allocator is warmed
/// (<see cref="BenchSupport.WarmFreePages"/>; BB_BENCH_WARM=0 skips it), so that this cost is the same for all of them.
/// Quick checks: BB_BENCH_BACKUP_FORMATS=raw (or qcow2) runs only those sources and skips the memory and 1 TiB
/// parts; BB_BENCH_WORKERS=n sets our job's workers; BB_BENCH_TRACE=1 prints each job's split and CPU times.
/// </summary>
public static class BackupBench
{
    private const long ImageBytes = 1L << 30;
    private const int Extents = 512;                   // 1 MiB data extents = 50 % of 1 GiB
    private const int ClusterBytes = 65536;
    private static readonly int Runs = RunsOr(5);
    private const int Seed = 20251127;
    private static readonly (string Name, int Writes)[] Steps = [("1%", 164), ("5%", 819), ("25%", 4096)];
    private static readonly TimeSpan QmpTimeout = TimeSpan.FromMinutes(5);

    /// <summary>
    /// One timed backup step. Ours: Create = Prepare (target created + fsync + opened), Part1 = copy (→ Pending),
    /// Part2 = commit (flush + close + rename); Total = all three. QEMU: Create = the qemu-img create process (not in
    /// Total), Part1 = blockdev-add + job (→ BLOCK_JOB_COMPLETED), Part2 = blockdev-del (close); Total = add → del.
    /// Verified: null when this step's chain was not compared (only the first run compares every step).
    /// </summary>
    private sealed record StepResult(double Total, double Create, double Part1, double Part2, long PeakBytes, long AllocatedBytes, long BytesCopied, long BitmapCountBefore, bool? Verified)
    {
        /// <summary>Kernel CPU time of the process during the step (ours: this process; QEMU: the daemon), seconds; NaN when unknown.</summary>
        public double KernelCpu { get; init; } = double.NaN;
    }

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        var tools = new QemuTools();
        bool qemu = tools.Img is not null && tools.Io is not null && tools.StorageDaemon is not null;
        using var dir = new TempFolder("backup");
        output.WriteLine("== backup: full + incremental backups of a 1 GiB source (50 % data), ours vs QEMU's backup job, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   {0}", tools.Describe());
        if (!qemu)
            output.WriteLine("   QEMU comparison skipped: needs qemu-img, qemu-io and qemu-storage-daemon on PATH (missing: {0}); ours is still measured",
                string.Join(", ", new[] { ("qemu-img", tools.Img), ("qemu-io", tools.Io), ("qemu-storage-daemon", tools.StorageDaemon) }.Where(t => t.Item2 is null).Select(t => t.Item1)));
        output.WriteLine("   {0} runs per source format, ours and QEMU alternating which goes first; medians (min–max); ratios = median of per-run ours/QEMU time", Runs);
        output.WriteLine("   ours  = BackupJob Prepare → concluded: target created (+fsync), copied, flushed (fsync), closed, renamed; split copy (→ Pending) + commit (flush+close)");
        output.WriteLine("   QEMU  = blockdev-add → job (command sent → BLOCK_JOB_COMPLETED) → blockdev-del returned (close = qcow2 metadata write-back + flush); target pre-created by qemu-img create (untimed)");
        output.WriteLine("   plain = full: cp --sparse=always of the source + fsync; incremental: pwrite of the dirty 64 KiB clusters into a written 1 GiB file + fsync");
        output.WriteLine("   sources: sparse files copied with cp --sparse=always (/tmp is ext4 mounted with 'discard': deleting the scattered sources between runs costs seconds, untimed)");
        output.WriteLine("   page cache: {0}; guest writes through QEMU's NBD export with qemu-io -t writeback", CacheNote("sources were just copied (warm)"));
        output.WriteLine("   page allocator: {0}", Warm
            ? "before every timed run (ours, QEMU's, plain) a scratch file a little larger than what the run writes is written and deleted, so that each run's new page-cache pages are pages the guest has just used (on a VM whose host takes free memory back, a page new to the guest costs a host fault on first touch; BB_BENCH_WARM=0 skips this)"
            : "not warmed (BB_BENCH_WARM=0): a run's new page-cache pages may cost a host fault each, depending on what the suite deleted before it");

        string baseRaw = dir.File("base.raw");
        string baseQcow2 = dir.File("base.qcow2");
        MakeSource(baseRaw, ImageBytes, Seed);
        if (tools.Img is { } img)
            RunChecked(img, ["convert", "-f", "raw", "-O", "qcow2", baseRaw, baseQcow2]);
        else
            CopyExtentsToQcow2(baseRaw, baseQcow2);
        SyncAll();

        WarmUp(dir);

        var summary = new List<string>();
        foreach (string format in (Environment.GetEnvironmentVariable("BB_BENCH_BACKUP_FORMATS") ?? "raw,qcow2").Split(','))
        {
            string baseImage = format == "raw" ? baseRaw : baseQcow2;
            var ours = new List<StepResult[]>();
            var theirs = new List<StepResult[]>();
            var plain = new List<double[]>();
            var guestWrites = new List<double>();
            for (int run = 0; run < Runs; run++)
            {
                long[][] offsets = Steps.Select((s, i) => DistinctClusters(new Random(Seed + (run * 10) + i), s.Writes, ImageBytes)).ToArray();
                bool qemuFirst = qemu && run % 2 == 1;
                bool verifyAll = run == 0; // later runs compare the last chain only (each compare reads 1 GiB twice)
                if (qemuFirst)
                    theirs.Add(QemuScenario(tools, dir, baseImage, format, offsets, guestWrites, verifyAll));
                ours.Add(OursScenario(tools, dir, baseImage, format, offsets, verifyAll));
                if (qemu && !qemuFirst)
                    theirs.Add(QemuScenario(tools, dir, baseImage, format, offsets, guestWrites, verifyAll));
                plain.Add(PlainYardsticks(dir, baseImage, offsets));
            }
            Print(output, tools, format, ours, theirs, plain, guestWrites, summary);
        }

        if (Environment.GetEnvironmentVariable("BB_BENCH_BACKUP_FORMATS") is null) // a quick check of some formats skips the rest
        {
            MemoryScaling(output, tools, qemu, dir, summary);
            HugeSparse(output, tools, qemu, dir, summary);
        }
        output.WriteLine("   -- summary");
        foreach (string line in summary)
            output.WriteLine(line);
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    // ---- Our engine. ----

    private static StepResult[] OursScenario(QemuTools tools, TempFolder dir, string baseImage, string format, long[][] offsets, bool verifyAll)
    {
        string src = dir.File("o-src." + format);
        CopySparse(baseImage, src);
        var results = new StepResult[Steps.Length + 1];
        var engine = new BlockEngine();
        try
        {
            BlockNode node = engine.Open(src, "src");
            DirtyBitmap bitmap = node.AddBitmap("bm0", ClusterBytes);
            string previous = "o-full.qcow2";
            results[0] = OursJob(node, new BackupRequest
            {
                Source = node, Target = dir.File(previous), Sync = BackupSyncMode.Full, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess,
            }, 0, WarmBytes(0)) with { Verified = verifyAll ? VerifyOurs(tools, node, format, dir.File(previous)) : null };
            for (int i = 0; i < Steps.Length; i++)
            {
                Trace("guest writes ours", () => GuestWritesOurs(node, offsets[i], Pattern(i)));
                long count = bitmap.Count;
                string target = $"o-inc{i + 1}.qcow2";
                results[i + 1] = OursJob(node, new BackupRequest
                {
                    Source = node, Target = dir.File(target), Sync = BackupSyncMode.Incremental, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess, BackingFile = previous,
                }, count, WarmBytes(i + 1));
                bool countsOk = count == offsets[i].Length * (long)ClusterBytes && bitmap.Count == 0;
                bool compare = verifyAll || i == Steps.Length - 1;
                results[i + 1] = results[i + 1] with { Verified = compare ? countsOk && VerifyOurs(tools, node, format, dir.File(target)) : countsOk ? null : false };
                previous = target;
            }
        }
        finally
        {
            engine.CloseAll();
        }
        DeleteScenarioFiles(dir, "o-");
        return results;
    }

    /// <summary>Run one backup job (as BackupJob.Start does, with a status hook) and measure it.</summary>
    private static StepResult OursJob(BlockNode node, BackupRequest request, long bitmapCount, long warmBytes = 0)
    {
        if (int.TryParse(Environment.GetEnvironmentVariable("BB_BENCH_WORKERS"), out int workers) && workers > 0)
            request = request with { Workers = workers }; // a quick comparison of worker counts
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        Settle();
        WarmFreePages(Path.GetDirectoryName(request.Target)!, warmBytes);
        int pid = Environment.ProcessId;
        long rssBefore = ProcStatusBytes(pid, "VmRSS");
        ResetPeakRss(pid);
        long allocatedBefore = GC.GetTotalAllocatedBytes(precise: true);
        long pending = 0;
        double userBefore = CpuSeconds(pid, kernel: false), sysBefore = CpuSeconds(pid, kernel: true);
        long start = Stopwatch.GetTimestamp();
        BackupJob job = BackupJob.Prepare(request);
        long prepared = Stopwatch.GetTimestamp();
        using (node.Quiesce())
            job.Freeze();
        job.StatusChanged += (_, status) =>
        {
            if (status == BlockJobStatus.Pending)
                Interlocked.Exchange(ref pending, Stopwatch.GetTimestamp());
        };
        job.Run();
        job.Completion.Wait();
        long end = Stopwatch.GetTimestamp();
        long peak = ProcStatusBytes(pid, "VmHWM");
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - allocatedBefore;
        if (!job.Succeeded)
            throw new InvalidOperationException($"Our backup into {request.Target} failed: {job.Error?.Message}");
        long p = Interlocked.Read(ref pending);
        double total = Stopwatch.GetElapsedTime(start, end).TotalSeconds;
        double create = Stopwatch.GetElapsedTime(start, prepared).TotalSeconds;
        double copy = p == 0 ? double.NaN : Stopwatch.GetElapsedTime(prepared, p).TotalSeconds;
        double kernel = CpuSeconds(pid, kernel: true) - sysBefore;
        TraceNote(string.Format(Inv, "ours job {0}: total {1:F1} ms = create {2:F1} + copy {3:F1} + commit {4:F1}; CPU user {5:F0} ms, kernel {6:F0} ms; CLOCK_MONOTONIC {7:F6}–{8:F6} s (for perf record -k CLOCK_MONOTONIC --time)",
            Path.GetFileName(request.Target), total * 1000, create * 1000, copy * 1000, (total - create - copy) * 1000,
            (CpuSeconds(pid, kernel: false) - userBefore) * 1000, kernel * 1000, start / (double)Stopwatch.Frequency, end / (double)Stopwatch.Frequency));
        return new StepResult(total, create, copy, total - create - copy, rssBefore < 0 || peak < 0 ? -1 : Math.Max(0, peak - rssBefore), allocated, job.BytesTotal, bitmapCount, null)
        {
            KernelCpu = kernel,
        };
    }

    private static void GuestWritesOurs(BlockNode node, long[] offsets, byte pattern)
    {
        byte[] data = new byte[ClusterBytes];
        Array.Fill(data, pattern);
        foreach (long offset in offsets)
            node.Write(offset, data);
    }

    /// <summary>The chain just written equals the source now (qemu-img compare, or our own reader without qemu-img).</summary>
    private static bool VerifyOurs(QemuTools tools, BlockNode node, string format, string top)
    {
        node.Flush(); // our metadata on disk, so another reader sees the source as it is
        if (tools.Img is { } img) // -U: the node holds its image locked against qemu-img, as a running QEMU would
            return Trace("compare ours", () => RunProcess(img, ["compare", "-q", "-U", "-f", format, "-F", "qcow2", node.Path, top]).ExitCode == 0);
        using IBlockImage chain = BlockEngine.OpenImage(top, readOnly: true);
        byte[] a = new byte[MiB], b = new byte[MiB];
        for (long offset = 0; offset < node.Size; offset += MiB)
        {
            node.Read(offset, a);
            chain.Read(offset, b);
            if (!a.AsSpan().SequenceEqual(b))
                return false;
        }
        return true;
    }

    // ---- QEMU: qemu-storage-daemon driven over QMP. ----

    private sealed class Daemon : IDisposable
    {
        private readonly Process _process;

        public Daemon(string qsd, TempFolder dir, string source, string format)
        {
            QmpPath = dir.File("qsd.qmp");
            NbdPath = dir.File("qsd.nbd");
            DeleteIfExists(QmpPath);
            DeleteIfExists(NbdPath);
            var psi = new ProcessStartInfo(qsd) { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (string a in new[]
            {
                "--blockdev", $"driver=file,node-name=src-file,filename={source},cache.direct=off",
                "--blockdev", $"driver={format},node-name=src,file=src-file",
                "--nbd-server", $"addr.type=unix,addr.path={NbdPath}",
                "--export", "type=nbd,id=exp0,node-name=src,name=disk,writable=on",
                "--chardev", $"socket,id=qmp0,path={QmpPath},server=on,wait=off",
                "--monitor", "chardev=qmp0",
            })
                psi.ArgumentList.Add(a);
            _process = Process.Start(psi) ?? throw new InvalidOperationException("Cannot start qemu-storage-daemon.");
            _process.OutputDataReceived += (_, _) => { };
            _process.ErrorDataReceived += (_, e) => { if (e.Data is not null) Errors.AppendLine(e.Data); };
            _process.BeginOutputReadLine();
            _process.BeginErrorReadLine();
            Qmp = QmpClient.Connect(QmpPath, TimeSpan.FromSeconds(20));
            IdleRss = ProcStatusBytes(Pid, "VmRSS");
        }

        public StringBuilder Errors { get; } = new();
        public string QmpPath { get; }
        public string NbdPath { get; }
        public QmpClient Qmp { get; }
        public int Pid => _process.Id;
        public long IdleRss { get; }
        public string NbdUri => $"nbd+unix:///disk?socket={NbdPath}";

        public void Dispose()
        {
            try
            {
                Qmp.Execute("quit");
            }
            catch (Exception e) when (e is QmpException or IOException or EndOfStreamException or System.Net.Sockets.SocketException or TimeoutException)
            {
            }
            Qmp.Dispose();
            if (!_process.WaitForExit(10_000))
                _process.Kill();
            _process.WaitForExit();
            _process.Dispose();
        }
    }

    private static StepResult[] QemuScenario(QemuTools tools, TempFolder dir, string baseImage, string format, long[][] offsets, List<double> guestWrites, bool verifyAll)
    {
        string img = tools.Img!;
        string src = dir.File("q-src." + format);
        CopySparse(baseImage, src);
        var results = new StepResult[Steps.Length + 1];
        using (var daemon = new Daemon(tools.StorageDaemon!, dir, src, format))
        {
            string previous = "q-full.qcow2";
            double create = RunChecked(img, ["create", "-q", "-f", "qcow2", dir.File(previous), ImageBytes.ToString(Inv)]).Seconds;
            results[0] = QemuJob(daemon, dir.File(previous), "tgt0", "job0", full: true, WarmBytes(0)) with { Create = create };
            results[0] = results[0] with { Verified = verifyAll ? VerifyQemu(img, daemon, dir.File(previous)) : null };
            for (int i = 0; i < Steps.Length; i++)
            {
                string script = dir.File($"q-writes{i}.qemu-io");
                File.WriteAllText(script, string.Concat(offsets[i].Select(o => string.Create(Inv, $"write -q -P {Pattern(i)} {o} {ClusterBytes}\n"))));
                guestWrites.Add(Trace("guest writes qemu-io", () => RunChecked(tools.Io!, ["-t", "writeback", "-f", "raw", daemon.NbdUri], stdinFile: script, discardStdOut: true).Seconds));
                long count = BitmapCount(daemon.Qmp);
                string target = $"q-inc{i + 1}.qcow2";
                create = RunChecked(img, ["create", "-q", "-f", "qcow2", "-b", previous, "-F", "qcow2", target], workingDirectory: dir.Path).Seconds;
                results[i + 1] = QemuJob(daemon, dir.File(target), $"tgt{i + 1}", $"job{i + 1}", full: false, WarmBytes(i + 1)) with { BitmapCountBefore = count, Create = create };
                bool countsOk = count == offsets[i].Length * (long)ClusterBytes && BitmapCount(daemon.Qmp) == 0;
                bool compare = verifyAll || i == Steps.Length - 1;
                results[i + 1] = results[i + 1] with { Verified = compare ? countsOk && VerifyQemu(img, daemon, dir.File(target)) : countsOk ? null : false };
                previous = target;
            }
        }
        DeleteScenarioFiles(dir, "q-");
        return results;
    }

    private static StepResult QemuJob(Daemon daemon, string target, string nodeName, string jobId, bool full, long warmBytes = 0)
    {
        QmpClient qmp = daemon.Qmp;
        qmp.ClearEvents();
        Settle();
        WarmFreePages(Path.GetDirectoryName(target)!, warmBytes);
        ResetPeakRss(daemon.Pid);
        double sysBefore = CpuSeconds(daemon.Pid, kernel: true);
        long t0 = Stopwatch.GetTimestamp();
        qmp.Execute("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2",
            ["node-name"] = nodeName,
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = target },
        });
        if (full)
        {
            qmp.Execute("transaction", new JsonObject
            {
                ["actions"] = new JsonArray(
                    new JsonObject { ["type"] = "block-dirty-bitmap-add", ["data"] = new JsonObject { ["node"] = "src", ["name"] = "bm0", ["granularity"] = ClusterBytes } },
                    new JsonObject { ["type"] = "blockdev-backup", ["data"] = new JsonObject { ["job-id"] = jobId, ["device"] = "src", ["target"] = nodeName, ["sync"] = "full" } }),
            });
        }
        else
        {
            qmp.Execute("blockdev-backup", new JsonObject { ["job-id"] = jobId, ["device"] = "src", ["target"] = nodeName, ["sync"] = "incremental", ["bitmap"] = "bm0" });
        }
        JsonObject completed = qmp.WaitEvent("BLOCK_JOB_COMPLETED", d => (string?)d["device"] == jobId, QmpTimeout);
        long t2 = Stopwatch.GetTimestamp();
        qmp.WaitEvent("JOB_STATUS_CHANGE", d => (string?)d["id"] == jobId && (string?)d["status"] == "null", QmpTimeout);
        long t3 = Stopwatch.GetTimestamp();
        qmp.Execute("blockdev-del", new JsonObject { ["node-name"] = nodeName });
        long t4 = Stopwatch.GetTimestamp();
        long peak = ProcStatusBytes(daemon.Pid, "VmHWM");
        if (completed["data"]?["error"] is JsonNode error)
            throw new InvalidOperationException($"QEMU backup {jobId} failed: {error}");
        long len = (long?)completed["data"]?["len"] ?? 0;
        double kernel = CpuSeconds(daemon.Pid, kernel: true) - sysBefore;
        TraceNote(string.Format(Inv, "QEMU job {0}: total {1:F1} ms = add+job {2:F1} + close {3:F1}; daemon kernel CPU {4:F0} ms; CLOCK_MONOTONIC {5:F6}–{6:F6} s", jobId, Stopwatch.GetElapsedTime(t0, t4).TotalMilliseconds,
            Stopwatch.GetElapsedTime(t0, t2).TotalMilliseconds, Stopwatch.GetElapsedTime(t3, t4).TotalMilliseconds, kernel * 1000, t0 / (double)Stopwatch.Frequency, t4 / (double)Stopwatch.Frequency));
        return new StepResult(Stopwatch.GetElapsedTime(t0, t4).TotalSeconds, 0, Stopwatch.GetElapsedTime(t0, t2).TotalSeconds,
            Stopwatch.GetElapsedTime(t3, t4).TotalSeconds, peak, 0, len, 0, null) { KernelCpu = kernel };
    }

    private static long BitmapCount(QmpClient qmp)
    {
        JsonNode? nodes = qmp.Execute("query-named-block-nodes", new JsonObject { ["flat"] = true });
        foreach (JsonNode? node in nodes?.AsArray() ?? [])
        {
            if ((string?)node?["node-name"] != "src")
                continue;
            foreach (JsonNode? b in node?["dirty-bitmaps"]?.AsArray() ?? [])
            {
                if ((string?)b?["name"] == "bm0")
                    return (long?)b?["count"] ?? -1;
            }
        }
        return -1;
    }

    private static bool VerifyQemu(string img, Daemon daemon, string top)
        => Trace("compare QEMU (NBD)", () => RunProcess(img, ["compare", "-q", "-f", "raw", "-F", "qcow2", daemon.NbdUri, top]).ExitCode == 0);

    // ---- Plain yardsticks. ----

    private static double[] PlainYardsticks(TempFolder dir, string baseImage, long[][] offsets)
    {
        var times = new double[Steps.Length + 1];
        string copy = dir.File("p-copy");
        Settle();
        WarmFreePages(dir.Path, WarmBytes(0));
        long start0 = Stopwatch.GetTimestamp();
        RunChecked("cp", ["--sparse=always", baseImage, copy]);
        using (var handle = File.OpenHandle(copy, FileMode.Open, FileAccess.Write))
            RandomAccess.FlushToDisk(handle); // fsync, as "sync FILE" does
        times[0] = Stopwatch.GetElapsedTime(start0).TotalSeconds;
        DeleteIfExists(copy);
        string scratch = PlainScratch(dir);
        byte[] data = new byte[ClusterBytes];
        for (int i = 0; i < Steps.Length; i++)
        {
            Array.Fill(data, Pattern(i));
            Settle();
            WarmFreePages(dir.Path, WarmBytes(i + 1));
            long start = Stopwatch.GetTimestamp();
            using (var handle = File.OpenHandle(scratch, FileMode.Open, FileAccess.Write))
            {
                foreach (long offset in offsets[i])
                    RandomAccess.Write(handle, data, offset);
                RandomAccess.FlushToDisk(handle);
            }
            times[i + 1] = Stopwatch.GetElapsedTime(start).TotalSeconds;
        }
        return times;
    }

    /// <summary>
    /// A fully written 1 GiB file, made once and overwritten in place by the incremental yardsticks. Not a new
    /// file per step: on this ext4 mounted with "discard", deleting a file with thousands of scattered writes
    /// costs seconds (one discard per extent).
    /// </summary>
    private static string PlainScratch(TempFolder dir)
    {
        string scratch = dir.File("plain-scratch.raw");
        if (!File.Exists(scratch))
        {
            byte[] zeros = new byte[MiB];
            using var handle = File.OpenHandle(scratch, FileMode.CreateNew, FileAccess.Write);
            for (long offset = 0; offset < ImageBytes; offset += MiB)
                RandomAccess.Write(handle, zeros, offset);
            RandomAccess.FlushToDisk(handle);
        }
        return scratch;
    }

    // ---- Memory against image size. ----

    private static void MemoryScaling(TextWriter output, QemuTools tools, bool qemu, TempFolder dir, List<string> summary)
    {
        output.WriteLine("   -- peak memory of a full backup against image size (raw sparse source, the same 512 MiB of data spread over the disk)");
        var oursPeak = new Dictionary<long, long>();
        foreach (long size in new[] { 1L << 30, 4L << 30, 8L << 30 })
        {
            string src = dir.File("m-src.raw");
            MakeSource(src, size, Seed + 7);
            var engine = new BlockEngine();
            StepResult ours;
            try
            {
                BlockNode node = engine.Open(src, "msrc");
                node.AddBitmap("bm0", ClusterBytes);
                ours = OursJob(node, new BackupRequest
                {
                    Source = node, Target = dir.File("m-ours.qcow2"), Sync = BackupSyncMode.Full, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess,
                }, 0);
            }
            finally
            {
                engine.CloseAll();
            }
            DeleteIfExists(dir.File("m-ours.qcow2"));
            oursPeak[size] = ours.PeakBytes;
            string qemuText = "QEMU skipped";
            if (qemu)
            {
                using var daemon = new Daemon(tools.StorageDaemon!, dir, src, "raw");
                RunChecked(tools.Img!, ["create", "-q", "-f", "qcow2", dir.File("m-qemu.qcow2"), size.ToString(Inv)]);
                StepResult q = QemuJob(daemon, dir.File("m-qemu.qcow2"), "mtgt", "mjob", full: true);
                qemuText = $"QEMU {F(q.Total)} s, daemon VmRSS idle {Mib(daemon.IdleRss)} MiB → VmHWM {Mib(q.PeakBytes)} MiB";
                DeleteIfExists(dir.File("m-qemu.qcow2"));
            }
            output.WriteLine("   {0,-44} ours {1} s, peak RSS +{2} MiB over idle, allocated {3} MiB | {4}",
                $"full backup, {size >> 30} GiB image", F(ours.Total), Mib(ours.PeakBytes), Mib(ours.AllocatedBytes), qemuText);
            DeleteIfExists(src);
        }
        long p1 = oursPeak[1L << 30], p8 = oursPeak[8L << 30];
        bool ok = p8 <= p1 + (8 * MiB);
        string line = string.Format(Inv, "   {0,-44} ours peak +{1} MiB at 1 GiB, +{2} MiB at 8 GiB   goal: peak memory independent of image size (8 GiB <= 1 GiB + 8 MiB) {3}",
            "memory vs image size", Mib(p1), Mib(p8), Verdict(ok));
        output.WriteLine(line);
        summary.Add(line);
    }

    // ---- Printing. ----

    /// <summary>Only the 1 TiB sparse scenario (it is also part of the whole suite).</summary>
    public static void RunHuge(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var tools = new QemuTools();
        bool qemu = tools.Img is not null && tools.Io is not null && tools.StorageDaemon is not null;
        using var dir = new TempFolder("huge");
        output.WriteLine("== huge: a 1 TiB sparse qcow2, ours vs QEMU's backup job ==");
        output.WriteLine("   {0}", Describe());
        HugeSparse(output, tools, qemu, dir, []);
    }

    /// <summary>
    /// A disk as users have them: a 1 TiB qcow2 holding 7 MiB. Full backup (cost must follow the data, not the size),
    /// then 10 MiB written and an incremental, ours and QEMU's job in the same run; qemu-img convert as the floor.
    /// </summary>
    private static void HugeSparse(TextWriter output, QemuTools tools, bool qemu, TempFolder dir, List<string> summary)
    {
        const long Huge = 1L << 40;
        int runs = Math.Max(3, Runs);
        output.WriteLine("   -- a 1 TiB qcow2 holding 7 MiB: full backup, then 10 MiB written and an incremental; median of {0} runs", runs);
        string src = dir.File("h-src.qcow2");
        var random = new Random(Seed + 11);
        long[] data = Enumerable.Range(0, 7).Select(_ => random.NextInt64(Huge / MiB) * MiB).ToArray();
        long[][] writes = Enumerable.Range(0, runs).Select(_ => Enumerable.Range(0, 10).Select(_ => random.NextInt64(Huge / MiB) * MiB).ToArray()).ToArray();
        var oursFull = new List<double>();
        var oursInc = new List<double>();
        var oursPeak = new List<long>();
        var qemuFull = new List<double>();
        var qemuInc = new List<double>();
        var convert = new List<double>();
        for (int run = 0; run < runs; run++)
        {
            MakeHuge(tools, src, Huge, data);
            var engine = new BlockEngine();
            try
            {
                BlockNode node = engine.Open(src, "hsrc");
                node.AddBitmap("bm0", ClusterBytes);
                StepResult full = OursJob(node, new BackupRequest
                {
                    Source = node, Target = dir.File("h-o-full.qcow2"), Sync = BackupSyncMode.Full, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess,
                }, 0);
                var chunk = new byte[MiB];
                foreach (long offset in writes[run])
                {
                    new Random((int)(offset >> 20)).NextBytes(chunk);
                    node.Write(offset, chunk);
                }
                StepResult inc = OursJob(node, new BackupRequest
                {
                    Source = node, Target = dir.File("h-o-inc.qcow2"), Sync = BackupSyncMode.Incremental, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess, BackingFile = "h-o-full.qcow2",
                }, 10 * MiB);
                oursFull.Add(full.Total);
                oursInc.Add(inc.Total);
                oursPeak.Add(Math.Max(full.PeakBytes, inc.PeakBytes));
                if (run == 0 && tools.Img is { } img && !VerifyOurs(tools, node, "qcow2", dir.File("h-o-inc.qcow2")))
                    throw new InvalidOperationException("our 1 TiB chain does not equal its source");
            }
            finally
            {
                engine.CloseAll();
                DeleteIfExists(dir.File("h-o-full.qcow2"));
                DeleteIfExists(dir.File("h-o-inc.qcow2"));
                DeleteIfExists(dir.File("h-o-full.qcow2") + Core.Digests.DigestManifest.Suffix);
                DeleteIfExists(dir.File("h-o-inc.qcow2") + Core.Digests.DigestManifest.Suffix);
            }
            if (qemu)
            {
                MakeHuge(tools, src, Huge, data);
                using (var daemon = new Daemon(tools.StorageDaemon!, dir, src, "qcow2"))
                {
                    RunChecked(tools.Img!, ["create", "-q", "-f", "qcow2", dir.File("h-q-full.qcow2"), Huge.ToString(Inv)]);
                    qemuFull.Add(QemuJob(daemon, dir.File("h-q-full.qcow2"), "htgt0", "hjob0", full: true).Total);
                    string script = dir.File("h-writes.qemu-io");
                    File.WriteAllText(script, string.Concat(writes[run].Select(o => string.Create(Inv, $"write -q -P 0x5a {o} {MiB}\n"))));
                    RunChecked(tools.Io!, ["-t", "writeback", "-f", "raw", daemon.NbdUri], stdinFile: script, discardStdOut: true);
                    RunChecked(tools.Img!, ["create", "-q", "-f", "qcow2", "-b", "h-q-full.qcow2", "-F", "qcow2", "h-q-inc.qcow2"], workingDirectory: dir.Path);
                    qemuInc.Add(QemuJob(daemon, dir.File("h-q-inc.qcow2"), "htgt1", "hjob1", full: false).Total);
                }
                DeleteIfExists(dir.File("h-q-full.qcow2"));
                DeleteIfExists(dir.File("h-q-inc.qcow2"));
                MakeHuge(tools, src, Huge, data);
                convert.Add(RunChecked(tools.Img!, ["convert", "-f", "qcow2", "-O", "qcow2", src, dir.File("h-convert.qcow2")]).Seconds);
                DeleteIfExists(dir.File("h-convert.qcow2"));
            }
        }
        DeleteIfExists(src);
        double fullMedian = Median(oursFull), incMedian = Median(oursInc);
        output.WriteLine("   {0,-44} ours {1} s ({2}) | QEMU job {3} s ({4}) | qemu-img convert {5} s", "full backup, 1 TiB / 7 MiB",
            F(fullMedian), Range(oursFull), F(Median(qemuFull)), Range(qemuFull), F(Median(convert)));
        output.WriteLine("   {0,-44} ours {1} s ({2}) | QEMU job {3} s ({4}) | ratio {5}", "incremental of 10 MiB on it",
            F(incMedian), Range(oursInc), F(Median(qemuInc)), Range(qemuInc), qemuInc.Count > 0 ? F(PairedRatio(oursInc, qemuInc), "F2") : "n/a");
        long peak = oursPeak.Max();
        string line = string.Format(Inv, "   {0,-44} full {1} s (goal <= 1 s) {2}; incremental {3}x QEMU (goal <= 0.6) {4}; peak +{5} MiB (goal < 32) {6}",
            "1 TiB sparse", F(fullMedian), Verdict(fullMedian <= 1.0), qemuInc.Count > 0 ? F(PairedRatio(oursInc, qemuInc), "F2") : "n/a",
            qemuInc.Count > 0 ? Verdict(PairedRatio(oursInc, qemuInc) <= 0.6) : "", Mib(peak), Verdict(peak < 32 * MiB));
        output.WriteLine(line);
        summary.Add(line);
    }

    private static void MakeHuge(QemuTools tools, string path, long size, long[] data)
    {
        DeleteIfExists(path);
        Qcow2Image.Create(path, size);
        using var image = Qcow2Image.Open(path, readOnly: false);
        var chunk = new byte[MiB];
        foreach (long offset in data)
        {
            new Random((int)(offset >> 20)).NextBytes(chunk);
            image.Write(offset, chunk);
        }
        image.Flush();
    }

    /// <summary>Issue 13's goals: full and 25 % at most 0.75 of QEMU's time, 5 % at most 0.7, 1 % at most 0.6.</summary>
    private static double Goal(int step) => step switch { 1 => 0.6, 2 => 0.7, _ => 0.75 };

    /// <summary>Each run's time and kernel CPU time of one step: "41 (33), 17 (9), ..." in milliseconds.</summary>
    private static string PerRun(List<StepResult[]> runs, int step)
        => string.Join(", ", runs.Select(r => string.Format(Inv, "{0:F0} ({1:F0})", r[step].Total * 1000, r[step].KernelCpu * 1000)));

    private static double Med(List<StepResult[]> runs, int step, Func<StepResult, double> field) => Median(runs.Select(r => field(r[step])).ToArray());

    private static void Print(TextWriter output, QemuTools tools, string format, List<StepResult[]> ours, List<StepResult[]> theirs, List<double[]> plain, List<double> guestWrites, List<string> summary)
    {
        output.WriteLine("   -- {0} source: 1 GiB, 512 MiB data{1}", format,
            format != "qcow2" ? "" : tools.Img is null ? " (the raw source's data written by our qcow2 driver)" : " (qemu-img convert -O qcow2 of the raw source)");
        bool haveQemu = theirs.Count > 0;
        var perMiBOurs = new double[Steps.Length];
        var perMiBQemu = new double[Steps.Length];
        for (int s = 0; s <= Steps.Length; s++)
        {
            double[] o = ours.Select(r => r[s].Total).ToArray();
            double[] q = theirs.Select(r => r[s].Total).ToArray();
            double[] p = plain.Select(r => r[s]).ToArray();
            long dirty = s == 0 ? 0 : Steps[s - 1].Writes * (long)ClusterBytes;
            string metric = s == 0 ? "full (1024 MiB, 512 MiB data)" : $"incremental {Steps[s - 1].Name} ({Mib(dirty)} MiB dirty)";
            var sb = new StringBuilder();
            sb.Append(Inv, $"   {format + " " + metric,-44} ours {F(Median(o))} s (create {F(Med(ours, s, r => r.Create))} + copy {F(Med(ours, s, r => r.Part1))} + commit {F(Med(ours, s, r => r.Part2))})");
            if (haveQemu)
                sb.Append(Inv, $" | QEMU {F(Median(q))} s (add+job {F(Med(theirs, s, r => r.Part1))} + close {F(Med(theirs, s, r => r.Part2))}; qemu-img create {F(Med(theirs, s, r => r.Create))} untimed)");
            sb.Append(Inv, $" | plain {F(Median(p))} s");
            double ratio = haveQemu ? PairedRatio(o, q) : double.NaN;
            if (haveQemu)
                sb.Append(Inv, $" | ours/QEMU {F(ratio, "F2")}");
            sb.Append(Inv, $" | ours/plain {F(PairedRatio(o, p), "F2")}");
            if (s > 0)
            {
                double mib = dirty / (double)MiB;
                perMiBOurs[s - 1] = Median(o) * 1000 / mib;
                perMiBQemu[s - 1] = haveQemu ? Median(q) * 1000 / mib : double.NaN;
                sb.Append(Inv, $" | ms/dirty MiB ours {F(perMiBOurs[s - 1], "F2")}{(haveQemu ? $", QEMU {F(perMiBQemu[s - 1], "F2")}" : "")}");
            }
            sb.Append(Inv, $" | peak ours +{Mib((long)Median(ours.Select(r => (double)r[s].PeakBytes).ToArray()))} MiB (alloc {Mib((long)Median(ours.Select(r => (double)r[s].AllocatedBytes).ToArray()))} MiB)");
            if (haveQemu)
                sb.Append(Inv, $", QEMU VmHWM {Mib((long)Median(theirs.Select(r => (double)r[s].PeakBytes).ToArray()))} MiB");
            double goal = Goal(s);
            sb.Append(Inv, $"   goal: ours/QEMU <= {goal:F2} ");
            sb.Append(haveQemu ? Verdict(ratio <= goal) : "[QEMU skipped]");
            output.WriteLine(sb.ToString());
            output.WriteLine("   {0,-44} ours range {1} s{2}, plain range {3} s",
                "", Range(o), haveQemu ? $", QEMU range {Range(q)} s" : "", Range(p));
            output.WriteLine("   {0,-44} per run, ms (kernel CPU ms): ours {1}{2}",
                "", PerRun(ours, s), haveQemu ? "; QEMU " + PerRun(theirs, s) : "");
            if (haveQemu)
            {
                double[] perRun = o.Zip(q, (a, b) => a / b).ToArray();
                summary.Add(string.Format(Inv, "   {0,-44} ours/QEMU {1} (per-run {2}–{3}; ours {4} s, QEMU {5} s) goal <= {6:F2} {7}", format + " " + metric, F(ratio, "F2"),
                    F(perRun.Min(), "F2"), F(perRun.Max(), "F2"), F(Median(o)), F(Median(q)), goal, Verdict(ratio <= goal)));
            }
        }

        // Proportionality: per dirty MiB, the 25 % step may not cost more than twice or less than half the 5 % step.
        double ratio25to5 = perMiBOurs[2] / perMiBOurs[1];
        bool proportional = ratio25to5 is >= 0.5 and <= 2.0;
        string prop = string.Format(Inv, "   {0,-44} ours ms/dirty MiB {1} / {2} / {3} (1%/5%/25%), 25% vs 5% per MiB {4}x{5}   goal: time proportional to dirty data (per-MiB cost at 25% within 0.5x–2x of 5%) {6}",
            format + " incremental proportionality", F(perMiBOurs[0], "F2"), F(perMiBOurs[1], "F2"), F(perMiBOurs[2], "F2"), F(ratio25to5, "F2"),
            haveQemu ? $"; QEMU {F(perMiBQemu[0], "F2")} / {F(perMiBQemu[1], "F2")} / {F(perMiBQemu[2], "F2")}" : "", Verdict(proportional));
        output.WriteLine(prop);
        summary.Add(prop);

        int oursOk = ours.Sum(r => r.Count(x => x.Verified == true)), oursAll = ours.Sum(r => r.Count(x => x.Verified is not null));
        int qemuOk = theirs.Sum(r => r.Count(x => x.Verified == true)), qemuAll = theirs.Sum(r => r.Count(x => x.Verified is not null));
        string verify = string.Format(Inv, "   {0,-44} {5} chain == source: ours {1}/{2}{3} (every step in run 1, the last chain in later runs); bm0 count == writes x 64 KiB before each incremental and 0 after (in the check){4}",
            format + " verification", oursOk, oursAll, haveQemu ? $", QEMU {qemuOk}/{qemuAll}" : "",
            haveQemu ? $"; qemu-io guest writes per batch median {F(Median(guestWrites))} s" : "",
            tools.Img is null ? "our chain reader (qemu-img missing):" : "qemu-img compare:");
        output.WriteLine(verify);
        if (oursOk != oursAll || qemuOk != qemuAll)
            summary.Add(verify + " [MISSED]");
    }

    /// <summary>
    /// What <see cref="WarmFreePages"/> writes before step <paramref name="step"/> (0 = full): a little more than the
    /// step writes into its new target (the full backup's 512 MiB of data, or the dirty clusters), plus metadata.
    /// </summary>
    private static long WarmBytes(int step)
        => (step == 0 ? Extents * MiB : Steps[step - 1].Writes * (long)ClusterBytes) * 5 / 4 + (16 * MiB);

    // ---- Inputs and files. ----

    private static byte Pattern(int step) => (byte)(0x41 + step);

    /// <summary>A sparse raw image with 512 random 1 MiB extents of random data, each 64 KiB cluster starting with its index.</summary>
    private static void MakeSource(string path, long size, int seed)
    {
        var random = new Random(seed);
        long slots = size / MiB;
        var chosen = new SortedSet<long>();
        while (chosen.Count < Extents)
            chosen.Add(random.NextInt64(slots));
        byte[] chunk = new byte[MiB];
        using var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.Write);
        RandomAccess.SetLength(handle, size); // sparse: the holes are real holes
        foreach (long slot in chosen)
        {
            FillRandom(random, chunk);
            long offset = slot * MiB;
            for (int c = 0; c < chunk.Length; c += ClusterBytes)
                BitConverter.TryWriteBytes(chunk.AsSpan(c, 8), (offset + c) / ClusterBytes);
            RandomAccess.Write(handle, chunk, offset);
        }
        RandomAccess.FlushToDisk(handle);
    }

    /// <summary>The qcow2 source without qemu-img: our driver writes only the data extents.</summary>
    private static void CopyExtentsToQcow2(string raw, string qcow2)
    {
        Qcow2Image.Create(qcow2, ImageBytes);
        using IBlockImage source = BlockEngine.OpenImage(raw, readOnly: true);
        using Qcow2Image target = Qcow2Image.Open(qcow2, readOnly: false);
        byte[] chunk = new byte[MiB];
        foreach (AllocationExtent e in source.GetAllocation(0, source.Size).Where(e => e.State == AllocationState.Data))
        {
            for (long offset = e.Offset; offset < e.End; offset += chunk.Length)
            {
                int n = (int)Math.Min(chunk.Length, e.End - offset);
                source.Read(offset, chunk.AsSpan(0, n));
                target.Write(offset, chunk.AsSpan(0, n));
            }
        }
        target.Flush();
    }

    private static long[] DistinctClusters(Random random, int count, long size)
    {
        var chosen = new HashSet<long>();
        var order = new List<long>(count);
        while (order.Count < count)
        {
            long cluster = random.NextInt64(size / ClusterBytes);
            if (chosen.Add(cluster))
                order.Add(cluster * ClusterBytes);
        }
        return order.ToArray();
    }

    /// <summary>
    /// A sparse copy (cp --sparse=always): holes must stay real holes. A preallocated copy would read the same,
    /// but ext4 reports unwritten extents whose pages readahead brought into the page cache as data (SEEK_DATA),
    /// so the data/zero map of the source would drift from run to run.
    /// </summary>
    private static void CopySparse(string from, string to)
    {
        DeleteIfExists(to);
        Trace("cp --sparse=always", () => RunChecked("cp", ["--sparse=always", from, to]));
    }

    private static void DeleteScenarioFiles(TempFolder dir, string prefix)
    {
        foreach (string file in Directory.GetFiles(dir.Path, prefix + "*"))
            DeleteIfExists(file);
    }

    // ---- Warm-up: one small scenario of ours (JIT tiers, pools, thread pool). ----

    private static void WarmUp(TempFolder dir)
    {
        const long size = 64L << 20;
        string src = dir.File("w-src.raw");
        var random = new Random(1);
        byte[] chunk = new byte[MiB];
        using (var handle = CreatePreallocated(src, size))
        {
            for (long offset = 0; offset < size; offset += 2 * MiB)
            {
                FillRandom(random, chunk);
                RandomAccess.Write(handle, chunk, offset);
            }
        }
        for (int round = 0; round < 2; round++)
        {
            var engine = new BlockEngine();
            try
            {
                BlockNode node = engine.Open(src, "warm");
                node.AddBitmap("bm0", ClusterBytes);
                string previous = $"w-full{round}.qcow2";
                OursJob(node, new BackupRequest { Source = node, Target = dir.File(previous), Sync = BackupSyncMode.Full, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess }, 0);
                for (int i = 0; i < 3; i++)
                {
                    GuestWritesOurs(node, DistinctClusters(random, 64, size), Pattern(i));
                    string target = $"w-inc{round}-{i}.qcow2";
                    OursJob(node, new BackupRequest { Source = node, Target = dir.File(target), Sync = BackupSyncMode.Incremental, BitmapName = "bm0", BitmapMode = BitmapSyncMode.OnSuccess, BackingFile = previous }, 0);
                    previous = target;
                }
            }
            finally
            {
                engine.CloseAll();
            }
        }
        DeleteScenarioFiles(dir, "w-");
    }
}

