using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Bench;

/// <summary>
/// Shared pieces of the side-by-side suites (qcow2, backup): a temp folder under /tmp, the QEMU tools found on
/// PATH, timed child processes, page-cache settling, peak-memory probes and the statistics/printing helpers.
/// </summary>
internal static class BenchSupport
{
    public const long MiB = 1L << 20;
    public const long GiB = 1L << 30;

    public static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    // ---- Environment. ----

    public static string Describe()
        => string.Format(Inv, "{0}, {1}, {2} CPUs, {3}", RuntimeInformation.FrameworkDescription,
            RuntimeInformation.ProcessArchitecture, Environment.ProcessorCount, BuildKind());

    public static string BuildKind()
    {
        bool optimized = typeof(BlockEngine).Assembly.GetCustomAttribute<DebuggableAttribute>()?.IsJITOptimizerDisabled != true;
        string kind = optimized ? "optimized build" : "DEBUG BUILD: figures are meaningless, use -c Release";
        return Debugger.IsAttached ? kind + ", debugger attached" : kind;
    }

    /// <summary>Full path of an executable on PATH, or null.</summary>
    public static string? FindOnPath(string name)
    {
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, name);
            if (File.Exists(candidate))
                return candidate;
        }
        return null;
    }

    /// <summary>First line of "tool --version", or null.</summary>
    public static string? ToolVersion(string? tool)
    {
        if (tool is null)
            return null;
        ProcessResult r = RunProcess(tool, ["--version"]);
        return r.ExitCode == 0 ? r.StdOut.Split('\n')[0].Trim() : null;
    }

    // ---- Page cache and durability. ----

    [DllImport("libc", EntryPoint = "sync")]
    private static extern void LibcSync();

    /// <summary>sync(2): write back every dirty page, so that earlier work is not flushed inside the next timing.</summary>
    public static void SyncAll() => LibcSync();

    private static readonly bool Tracing = Environment.GetEnvironmentVariable("BB_BENCH_TRACE") == "1";

    /// <summary>BB_BENCH_TRACE=1: print how long an untimed helper step took (to stderr), to see where the wall time goes.</summary>
    public static T Trace<T>(string what, Func<T> body)
    {
        if (!Tracing)
            return body();
        long start = Stopwatch.GetTimestamp();
        T result = body();
        Console.Error.WriteLine(string.Format(Inv, "      [trace] {0,-28} {1,8:F3} s", what, Stopwatch.GetElapsedTime(start).TotalSeconds));
        return result;
    }

    public static void Trace(string what, Action body) => Trace(what, () => { body(); return 0; });

    /// <summary>
    /// User or kernel CPU time of a process so far, in seconds (utime or stime of /proc/PID/stat, in clock ticks of
    /// 1/100 s); NaN when unreadable. Kernel time shows where this machine's cost of fresh page-cache pages lands.
    /// </summary>
    public static double CpuSeconds(int pid, bool kernel)
    {
        try
        {
            string stat = File.ReadAllText($"/proc/{pid}/stat");
            string[] fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' '); // fields from the 3rd (state) on
            return long.Parse(fields[kernel ? 12 : 11], NumberStyles.Integer, Inv) / 100.0;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException)
        {
            return double.NaN;
        }
    }

    /// <summary>BB_BENCH_TRACE=1: print a note on one timed run (to stderr).</summary>
    public static void TraceNote(string note)
    {
        if (Tracing)
            Console.Error.WriteLine("      [trace] " + note);
    }

    /// <summary>Rounds/runs per metric: <paramref name="fallback"/>, or BB_BENCH_RUNS when set (quick checks).</summary>
    public static int RunsOr(int fallback)
        => int.TryParse(Environment.GetEnvironmentVariable("BB_BENCH_RUNS"), NumberStyles.Integer, Inv, out int n) && n > 0 ? n : fallback;

    /// <summary>BB_BENCH_COLD=1: drop the page cache before every timed run instead of only syncing.</summary>
    public static bool Cold { get; } = Environment.GetEnvironmentVariable("BB_BENCH_COLD") == "1";

    /// <summary>Before a timed run: sync(2), and with <see cref="Cold"/> also drop the page cache.</summary>
    public static void Settle() => Trace("settle (sync)", () =>
    {
        if (!(Cold && TryDropCaches()))
            SyncAll();
    });

    /// <summary>BB_BENCH_WARM=0: do not warm the page allocator before each timed backup (see <see cref="WarmFreePages"/>).</summary>
    public static bool Warm { get; } = Environment.GetEnvironmentVariable("BB_BENCH_WARM") != "0";

    /// <summary>
    /// Right before a timed run that writes a new file: write <paramref name="bytes"/> into a scratch file in
    /// <paramref name="folder"/> and delete it again (its dirty pages are dropped unwritten: no disk I/O). The pages it
    /// took go back to the allocator, which hands them to the run's new page-cache pages next. Why: on a virtual machine
    /// whose host takes free memory back (free page reporting), a page-cache page that is new to the guest costs a host
    /// fault on first touch (measured here: about 9 µs a page, two thirds of a 5 % incremental's time), and whether a run
    /// gets such pages depends on what the suite deleted seconds before, not on the engine. Done the same way before
    /// every timed run, ours, QEMU's and the plain yardstick's, so that each starts from the same allocator state.
    /// </summary>
    public static void WarmFreePages(string folder, long bytes)
    {
        if (!Warm || bytes <= 0)
            return;
        Trace("warm free pages", () =>
        {
            string path = Path.Combine(folder, "warm-pages.tmp");
            byte[] chunk = new byte[MiB];
            chunk.AsSpan().Fill(0x5A);
            using (var handle = File.OpenHandle(path, FileMode.Create, FileAccess.Write))
            {
                for (long offset = 0; offset < bytes; offset += MiB)
                    RandomAccess.Write(handle, chunk, offset);
            }
            File.Delete(path);
        });
    }

    /// <summary>The page-cache rule of this run, for the suite headers.</summary>
    public static string CacheNote(string warmWhat)
    {
        if (Cold)
            return TryDropCaches()
                ? "BB_BENCH_COLD=1: sync + drop_caches before every timed run (cold reads from disk)"
                : "BB_BENCH_COLD=1 asked, but /proc/sys/vm/drop_caches is not writable: sync only, " + warmWhat;
        return "sync(2) before every timed run; " + warmWhat + " (set BB_BENCH_COLD=1 to drop caches before every run"
            + (CanDropCaches() ? ")" : "; not writable here)");
    }

    private static bool CanDropCaches()
    {
        try
        {
            using var f = new FileStream("/proc/sys/vm/drop_caches", FileMode.Open, FileAccess.Write);
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>Drop the page cache if the machine lets us (usually not in a container); returns whether it worked.</summary>
    public static bool TryDropCaches()
    {
        try
        {
            SyncAll();
            File.WriteAllText("/proc/sys/vm/drop_caches", "3");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    // ---- Memory. ----

    /// <summary>A field of /proc/&lt;pid&gt;/status in bytes (VmRSS, VmHWM), or -1.</summary>
    public static long ProcStatusBytes(int pid, string field)
    {
        try
        {
            foreach (string line in File.ReadLines($"/proc/{pid}/status"))
            {
                if (line.StartsWith(field + ":", StringComparison.Ordinal))
                {
                    string kb = line[(field.Length + 1)..].Trim().Split(' ')[0];
                    return long.Parse(kb, Inv) * 1024;
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
        }
        return -1;
    }

    /// <summary>Reset the peak RSS (VmHWM) of a process to its current RSS (write "5" to clear_refs).</summary>
    public static bool ResetPeakRss(int pid)
    {
        try
        {
            File.WriteAllText($"/proc/{pid}/clear_refs", "5");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    // ---- Child processes. ----

    public sealed record ProcessResult(int ExitCode, string StdOut, string StdErr, double Seconds);

    /// <summary>
    /// Run a program to completion; Seconds is the wall time from start to exit (process start-up included).
    /// Standard input comes from <paramref name="stdinFile"/> when given (streamed while the process runs).
    /// </summary>
    public static ProcessResult RunProcess(string file, IEnumerable<string> args, string? stdinFile = null, string? workingDirectory = null, bool discardStdOut = false)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = stdinFile is not null,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory ?? "",
        };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        long start = Stopwatch.GetTimestamp();
        using Process p = Process.Start(psi) ?? throw new InvalidOperationException($"Cannot start {file}.");
        Task<string> stdout = discardStdOut ? Drain(p.StandardOutput) : p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        if (stdinFile is not null)
        {
            using (FileStream input = File.OpenRead(stdinFile))
                input.CopyTo(p.StandardInput.BaseStream, 1 << 16);
            p.StandardInput.Close();
        }
        p.WaitForExit();
        double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        return new ProcessResult(p.ExitCode, stdout.Result, stderr.Result, seconds);
    }

    private static async Task<string> Drain(StreamReader reader)
    {
        var buffer = new char[1 << 16];
        while (await reader.ReadAsync(buffer).ConfigureAwait(false) > 0)
        {
        }
        return "";
    }

    /// <summary>Run and throw with the tool's message unless it exits 0.</summary>
    public static ProcessResult RunChecked(string file, IEnumerable<string> args, string? stdinFile = null, string? workingDirectory = null, bool discardStdOut = false)
    {
        string[] list = args.ToArray();
        ProcessResult r = RunProcess(file, list, stdinFile, workingDirectory, discardStdOut);
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"{Path.GetFileName(file)} {string.Join(' ', list)} exited with {r.ExitCode}: {r.StdErr.Trim()} {r.StdOut.Trim()}");
        return r;
    }

    // ---- Statistics. ----

    public static double Median(IReadOnlyList<double> samples)
    {
        if (samples.Count == 0)
            return double.NaN;
        double[] s = samples.Order().ToArray();
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[(s.Length / 2) - 1] + s[s.Length / 2]) / 2;
    }

    /// <summary>Median over rounds of a[i] / b[i] (paired: both measured in the same round).</summary>
    public static double PairedRatio(IReadOnlyList<double> a, IReadOnlyList<double> b)
    {
        int n = Math.Min(a.Count, b.Count);
        var r = new List<double>(n);
        for (int i = 0; i < n; i++)
        {
            if (b[i] > 0)
                r.Add(a[i] / b[i]);
        }
        return Median(r);
    }

    public static string Range(IReadOnlyList<double> samples, string format = "F3")
        => samples.Count == 0 ? "" : string.Format(Inv, "{0}–{1}", samples.Min().ToString(format, Inv), samples.Max().ToString(format, Inv));

    public static string F(double value, string format = "F3") => double.IsNaN(value) ? "n/a" : value.ToString(format, Inv);

    public static string Mib(long bytes) => (bytes / (double)MiB).ToString("F1", Inv);

    public static string Verdict(bool ok) => ok ? "[ok]" : "[MISSED]";

    // ---- Data. ----

    /// <summary>Fill <paramref name="buffer"/> with pseudo-random bytes, never a whole zero 512-byte sector.</summary>
    public static void FillRandom(Random random, Span<byte> buffer)
    {
        random.NextBytes(buffer);
        for (int i = 0; i < buffer.Length; i += 512)
            buffer[i] |= 1;
    }

    /// <summary>A 1 GiB-ish file of pseudo-random non-zero data, written in 1 MiB chunks and fsynced.</summary>
    public static void WriteRandomFile(string path, long size, int seed)
    {
        var random = new Random(seed);
        var chunk = new byte[MiB];
        using var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.Write);
        for (long offset = 0; offset < size; offset += chunk.Length)
        {
            int n = (int)Math.Min(chunk.Length, size - offset);
            FillRandom(random, chunk.AsSpan(0, n));
            RandomAccess.Write(handle, chunk.AsSpan(0, n), offset);
        }
        RandomAccess.FlushToDisk(handle);
    }

    /// <summary>
    /// A new file of <paramref name="size"/> bytes whose blocks are preallocated (unwritten extents: they read as
    /// zeros and SEEK_DATA/qemu-img map report them as holes, like a sparse file). Why not sparse: this file system
    /// is mounted with "discard", and deleting a file whose blocks are scattered (random writes into a sparse file)
    /// issues one discard per extent, tens of seconds for a few thousand extents. Preallocated blocks are
    /// contiguous, so deleting is instant.
    /// </summary>
    public static Microsoft.Win32.SafeHandles.SafeFileHandle CreatePreallocated(string path, long size)
    {
        var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, FileOptions.None, preallocationSize: size);
        RandomAccess.SetLength(handle, size);
        return handle;
    }

    /// <summary>Delete a file if it exists.</summary>
    public static void DeleteIfExists(string path)
    {
        if (File.Exists(path))
            Trace("delete " + Path.GetFileName(path), () => File.Delete(path));
    }
}

/// <summary>A scratch folder under /tmp, removed (with everything in it) when disposed.</summary>
internal sealed class TempFolder : IDisposable
{
    public TempFolder(string suite)
    {
        Path = System.IO.Path.Combine("/tmp", $"bb-bench-{suite}-{Environment.ProcessId}");
        if (Directory.Exists(Path))
            Directory.Delete(Path, recursive: true);
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>The QEMU tools found on PATH (any may be missing: the comparison is then skipped, ours still runs).</summary>
internal sealed class QemuTools
{
    public string? Img { get; } = BenchSupport.FindOnPath("qemu-img");
    public string? Io { get; } = BenchSupport.FindOnPath("qemu-io");
    public string? StorageDaemon { get; } = BenchSupport.FindOnPath("qemu-storage-daemon");

    public string Describe()
    {
        var sb = new StringBuilder();
        sb.Append(BenchSupport.ToolVersion(Img) ?? "qemu-img: not found");
        sb.Append("; qemu-io ").Append(Io is null ? "not found" : "found");
        sb.Append("; qemu-storage-daemon ").Append(StorageDaemon is null ? "not found" : "found");
        return sb.ToString();
    }
}
