using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// Our NBD export against qemu-nbd, serving the same images to the same clients in the same run: the research note's
/// rows R1 (nbdcopy reads 1 GiB of random data), R4 (qemu-img convert of it to a new raw file), W1 (nbdcopy writes
/// 1 GiB into a raw image) and B2 (qemu-img map over a dirty bitmap with every other 64 KiB cluster dirty: 16,384
/// extents, one REQ_ONE round trip each). Each server runs in its own process, started once per row and kept across
/// the rounds: ours is this bench run as "nbd-server" (NbdServerHost), qemu-nbd is qemu-nbd -t -e 8. Each has its
/// own copy of every image (both lock their images, as QEMU does). Figures are the client's whole-process wall time,
/// median of the rounds (contenders in random order per round, one untimed warm-up each); ratios are medians of the
/// per-round ratios (time ours / time qemu-nbd: below 1 means ours is faster). Server CPU is utime+stime of the server
/// process per run; server memory is its peak RSS (VmHWM, reset before each row) and the growth over its idle RSS.
/// </summary>
public static class NbdBench
{
    private const long ImageBytes = 1L << 30;
    private const int ClusterBytes = 65536;
    private static readonly int Rounds = RunsOr(5);
    private const int Seed = 20261207;
    private static readonly double ClockTicks = 100.0; // USER_HZ on Linux

    private sealed record Row(string Id, string What, Contender Ours, Contender Qemu, Server OursServer, Server QemuServer, double Goal);

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var wall = Stopwatch.StartNew();
        var tools = new NbdTools();
        output.WriteLine("== nbd: our NBD export (Start-BlockExport's engine) vs qemu-nbd, same images, same clients, same run ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   {0}", tools.Describe());
        if (tools.Missing is { } missing)
        {
            output.WriteLine("   skipped: {0} not on PATH (Debian packages qemu-utils, libnbd-bin)", missing);
            return;
        }
        output.WriteLine("   median of {0} rounds (random order per round, one untimed warm-up each); client whole-process wall time; ratio = median of per-round ours/qemu-nbd", Rounds);
        output.WriteLine("   servers: ours = 'BitmapBackup.Bench nbd-server' child process (export writable, 8 connections); qemu-nbd -t -e 8 -k SOCK -x disk -f FMT [-B bm0]");
        output.WriteLine("   page cache: {0}", CacheNote("images and sources are warm in the page cache"));
        output.WriteLine("   load when the suite started: {0}", LoadAverage());

        using var dir = new TempFolder("nbd");
        string full = dir.File("full.raw");
        Trace("make full.raw", () => WriteRandomFile(full, ImageBytes, Seed));
        string fullOurs = dir.File("full-ours.raw");
        string fullQemu = dir.File("full-qemu.raw");
        File.Copy(full, fullOurs);
        File.Copy(full, fullQemu);
        string fragOurs = dir.File("frag-ours.qcow2");
        string fragQemu = dir.File("frag-qemu.qcow2");
        MakeFragmentedBitmapImage(tools, dir, fragOurs);
        File.Copy(fragOurs, fragQemu);
        string targetOurs = dir.File("target-ours.raw");
        string targetQemu = dir.File("target-qemu.raw");
        foreach (string t in new[] { targetOurs, targetQemu })
            CreatePreallocated(t, ImageBytes).Dispose();
        SyncAll();

        var summary = new List<string>();

        // R1 and R4 read the same served image.
        using (Server ours = Server.Ours(dir, fullOurs, "r-ours.sock", null))
        using (Server qemu = Server.Qemu(tools, dir, fullQemu, "r-qemu.sock", "raw", null))
        {
            string outOurs = dir.File("r4-ours.raw");
            string outQemu = dir.File("r4-qemu.raw");
            var r1 = new Row("R1", "nbdcopy URI null: (1 GiB random)",
                ours.Contender(() => RunChecked(tools.NbdCopy!, [ours.Uri, "null:"]).Seconds),
                qemu.Contender(() => RunChecked(tools.NbdCopy!, [qemu.Uri, "null:"]).Seconds), ours, qemu, 1.0);
            var r4 = new Row("R4", "qemu-img convert -f raw -O raw URI new-file",
                ours.Contender(() => RunChecked(tools.Img!, ["convert", "-f", "raw", "-O", "raw", ours.Uri, outOurs]).Seconds, () => DeleteIfExists(outOurs)),
                qemu.Contender(() => RunChecked(tools.Img!, ["convert", "-f", "raw", "-O", "raw", qemu.Uri, outQemu]).Seconds, () => DeleteIfExists(outQemu)), ours, qemu, 1.0);
            Measure(output, summary, r1);
            bool same = VerifySame(tools, ours.Uri, full);
            Measure(output, summary, r4);
            output.WriteLine("   {0,-44} verified: data read through our export equals the source (qemu-img compare): {1}", "", same ? "yes" : "NO");
            if (!same)
                summary.Add("   R1/R4: our export did not read back the source [MISSED]");
        }

        // W1 writes into a served raw target.
        using (Server ours = Server.Ours(dir, targetOurs, "w-ours.sock", null))
        using (Server qemu = Server.Qemu(tools, dir, targetQemu, "w-qemu.sock", "raw", null))
        {
            var w1 = new Row("W1", "nbdcopy full.raw URI (raw target)",
                ours.Contender(() => RunChecked(tools.NbdCopy!, [full, ours.Uri]).Seconds),
                qemu.Contender(() => RunChecked(tools.NbdCopy!, [full, qemu.Uri]).Seconds), ours, qemu, 1.0);
            Measure(output, summary, w1);
            bool same = VerifySame(tools, ours.Uri, full);
            output.WriteLine("   {0,-44} verified: the target read through our export equals the source: {1}", "", same ? "yes" : "NO");
            if (!same)
                summary.Add("   W1: our export's target differs from the source [MISSED]");
        }

        // B2 maps a fragmented dirty bitmap, one extent per round trip.
        using (Server ours = Server.Ours(dir, fragOurs, "b-ours.sock", "bm0"))
        using (Server qemu = Server.Qemu(tools, dir, fragQemu, "b-qemu.sock", "qcow2", "bm0"))
        {
            string[] Map(Server s) => ["map", "--output=json", "--image-opts", $"driver=nbd,server.type=unix,server.path={s.Socket},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:bm0"];
            var b2 = new Row("B2", "qemu-img map x-dirty-bitmap (16,384 extents)",
                ours.Contender(() => RunChecked(tools.Img!, Map(ours), discardStdOut: true).Seconds),
                qemu.Contender(() => RunChecked(tools.Img!, Map(qemu), discardStdOut: true).Seconds), ours, qemu, 1.2);
            Measure(output, summary, b2);
            string mapOurs = RunChecked(tools.Img!, Map(ours)).StdOut;
            string mapQemu = RunChecked(tools.Img!, Map(qemu)).StdOut;
            int entries = mapOurs.Split('\n').Count(l => l.Contains("\"start\"", StringComparison.Ordinal));
            output.WriteLine("   {0,-44} verified: qemu-img map through ours equals qemu-nbd's ({1} entries): {2}", "", entries, mapOurs == mapQemu ? "yes" : "NO");
            if (mapOurs != mapQemu)
                summary.Add("   B2: the maps differ [MISSED]");
        }

        output.WriteLine("   -- summary");
        foreach (string line in summary)
            output.WriteLine(line);
        output.WriteLine("   load when the suite ended: {0}", LoadAverage());
        output.WriteLine("   suite wall time {0:F0} s", wall.Elapsed.TotalSeconds);
    }

    private static void Measure(TextWriter output, List<string> summary, Row row)
    {
        row.OursServer.ResetPeak();
        row.QemuServer.ResetPeak();
        row.Ours.RunOnce(); // warm-up: JIT, pools, page cache of the output paths
        row.Qemu.RunOnce();
        row.Ours.Samples.Clear();
        row.Qemu.Samples.Clear();
        row.OursServer.CpuSeconds.Clear();
        row.QemuServer.CpuSeconds.Clear();
        BitmapBackup.Bench.Rounds.Run([row.Ours, row.Qemu], Rounds);
        double ratio = PairedRatio(row.Ours.Samples, row.Qemu.Samples);
        long oursPeak = row.OursServer.PeakRss;
        long oursGrowth = oursPeak - row.OursServer.IdleRss;
        long qemuPeak = row.QemuServer.PeakRss;
        bool okTime = ratio <= row.Goal;
        bool okMemory = oursGrowth < 64 * MiB;
        output.WriteLine(string.Format(Inv, "   {0} {1,-40} ours {2} s ({3}) | qemu-nbd {4} s ({5}) | ours/qemu-nbd {6}   goal <= {7:F1} {8}",
            row.Id, row.What, F(row.Ours.Median), Range(row.Ours.Samples), F(row.Qemu.Median), Range(row.Qemu.Samples), F(ratio, "F2"), row.Goal, Verdict(okTime)));
        output.WriteLine(string.Format(Inv, "   {0,-44} server CPU per run: ours {1} s, qemu-nbd {2} s | peak RSS: ours {3} MiB (idle {4} MiB, growth {5} MiB) {6}, qemu-nbd {7} MiB",
            "", F(Median(row.OursServer.CpuSeconds)), F(Median(row.QemuServer.CpuSeconds)), Mib(oursPeak), Mib(row.OursServer.IdleRss), Mib(oursGrowth),
            okMemory ? "[ok: growth < 64 MiB]" : "[MISSED: growth >= 64 MiB]", Mib(qemuPeak)));
        summary.Add(string.Format(Inv, "   {0}: ours {1} s, qemu-nbd {2} s, ratio {3} (goal <= {4:F1}) {5}; ours peak RSS {6} MiB, growth {7} MiB {8}",
            row.Id, F(row.Ours.Median), F(row.Qemu.Median), F(ratio, "F2"), row.Goal, Verdict(okTime), Mib(oursPeak), Mib(oursGrowth), Verdict(okMemory)));
    }

    /// <summary>qemu-img compare of what an export serves with a file.</summary>
    private static bool VerifySame(NbdTools tools, string uri, string reference)
        => RunProcess(tools.Img!, ["compare", "-f", "raw", "-F", "raw", uri, reference]).ExitCode == 0;

    /// <summary>A 1 GiB qcow2 whose persistent bitmap bm0 has every other 64 KiB cluster dirty (written by qemu-io).</summary>
    private static void MakeFragmentedBitmapImage(NbdTools tools, TempFolder dir, string path)
    {
        RunChecked(tools.Img!, ["create", "-q", "-f", "qcow2", path, ImageBytes.ToString(Inv)]);
        RunChecked(tools.Img!, ["bitmap", "--add", "-f", "qcow2", path, "bm0"]);
        string script = dir.File("frag.qemu-io");
        var sb = new StringBuilder();
        for (long offset = 0; offset < ImageBytes; offset += 2 * ClusterBytes)
            sb.Append(Inv, $"write -q -P 1 {offset} {ClusterBytes}\n");
        File.WriteAllText(script, sb.ToString());
        RunChecked(tools.Io!, ["-f", "qcow2", path], stdinFile: script, discardStdOut: true);
    }

    private static string LoadAverage()
    {
        try
        {
            string[] parts = File.ReadAllText("/proc/loadavg").Split(' ');
            return $"{parts[0]} {parts[1]} {parts[2]} (1/5/15 min, {Environment.ProcessorCount} CPUs)";
        }
        catch (IOException)
        {
            return "n/a";
        }
    }

    /// <summary>The clients and qemu-nbd, found on PATH.</summary>
    private sealed class NbdTools
    {
        public string? Img { get; } = FindOnPath("qemu-img");
        public string? Io { get; } = FindOnPath("qemu-io");
        public string? QemuNbd { get; } = FindOnPath("qemu-nbd");
        public string? NbdCopy { get; } = FindOnPath("nbdcopy");

        public string? Missing
        {
            get
            {
                string[] missing = new[] { ("qemu-img", Img), ("qemu-io", Io), ("qemu-nbd", QemuNbd), ("nbdcopy", NbdCopy) }.Where(t => t.Item2 is null).Select(t => t.Item1).ToArray();
                return missing.Length == 0 ? null : string.Join(", ", missing);
            }
        }

        public string Describe() => $"{ToolVersion(QemuNbd) ?? "qemu-nbd: not found"}; {ToolVersion(NbdCopy) ?? "nbdcopy: not found"}";
    }

    /// <summary>A server process (ours or qemu-nbd) serving one image on a unix socket.</summary>
    private sealed class Server : IDisposable
    {
        private readonly Process _process;

        private Server(Process process, string socket, string label)
        {
            _process = process;
            Socket = socket;
            Label = label;
            WaitUntilServing();
            IdleRss = ProcStatusBytes(process.Id, "VmRSS");
        }

        public string Label { get; }

        public string Socket { get; }

        public string Uri => $"nbd+unix:///disk?socket={Socket}";

        public long IdleRss { get; }

        public long PeakRss => ProcStatusBytes(_process.Id, "VmHWM");

        public List<double> CpuSeconds { get; } = [];

        public static Server Ours(TempFolder dir, string image, string socket, string? bitmap)
        {
            string self = Environment.ProcessPath ?? throw new InvalidOperationException("no process path");
            var psi = new ProcessStartInfo(self) { UseShellExecute = false, RedirectStandardInput = true, RedirectStandardOutput = true };
            if (self.EndsWith("dotnet", StringComparison.Ordinal))
                psi.ArgumentList.Add(typeof(NbdBench).Assembly.Location);
            foreach (string a in new[] { "nbd-server", image, dir.File(socket) }.Concat(bitmap is null ? [] : [bitmap]))
                psi.ArgumentList.Add(a);
            Process p = Process.Start(psi) ?? throw new InvalidOperationException("Cannot start our NBD server.");
            if (p.StandardOutput.ReadLine() != "ready")
                throw new InvalidOperationException("Our NBD server did not start.");
            return new Server(p, dir.File(socket), "ours");
        }

        public static Server Qemu(NbdTools tools, TempFolder dir, string image, string socket, string format, string? bitmap)
        {
            var psi = new ProcessStartInfo(tools.QemuNbd!) { UseShellExecute = false, RedirectStandardInput = true, RedirectStandardError = true };
            foreach (string a in new[] { "-t", "-e", "8", "-k", dir.File(socket), "-x", "disk", "-f", format }.Concat(bitmap is null ? [] : ["-B", bitmap]).Append(image))
                psi.ArgumentList.Add(a);
            Process p = Process.Start(psi) ?? throw new InvalidOperationException("Cannot start qemu-nbd.");
            p.ErrorDataReceived += (_, _) => { }; // "option negotiation failed" of the readiness probe
            p.BeginErrorReadLine();
            return new Server(p, dir.File(socket), "qemu-nbd");
        }

        /// <summary>A contender whose timed body also records the server's CPU time of the run.</summary>
        public Contender Contender(Func<double> timed, Action? cleanup = null)
            => new(Label, () =>
            {
                double before = CpuTime();
                double seconds = timed();
                CpuSeconds.Add(CpuTime() - before);
                return seconds;
            }, null, cleanup);

        public void ResetPeak() => ResetPeakRss(_process.Id);

        /// <summary>utime + stime of the server process, in seconds (/proc/PID/stat fields 14 and 15).</summary>
        private double CpuTime()
        {
            string stat = File.ReadAllText($"/proc/{_process.Id}/stat");
            string[] fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return (long.Parse(fields[11], CultureInfo.InvariantCulture) + long.Parse(fields[12], CultureInfo.InvariantCulture)) / ClockTicks;
        }

        private void WaitUntilServing()
        {
            var deadline = DateTime.UtcNow.AddSeconds(30);
            while (true)
            {
                try
                {
                    using var s = new System.Net.Sockets.Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                    s.Connect(new UnixDomainSocketEndPoint(Socket));
                    byte[] greeting = new byte[18];
                    int n = 0;
                    while (n < greeting.Length && s.Receive(greeting, n, greeting.Length - n, SocketFlags.None) is int r && r > 0)
                        n += r;
                    if (n == greeting.Length)
                        return;
                }
                catch (SocketException) when (DateTime.UtcNow < deadline && !_process.HasExited)
                {
                }
                if (DateTime.UtcNow >= deadline || _process.HasExited)
                    throw new InvalidOperationException($"{Label} did not serve {Socket}.");
                Thread.Sleep(20);
            }
        }

        public void Dispose()
        {
            if (Label == "ours")
                _process.StandardInput.Close();
            else
                _process.Kill();
            if (!_process.WaitForExit(30_000))
                _process.Kill();
            _process.WaitForExit();
            _process.Dispose();
        }
    }
}
