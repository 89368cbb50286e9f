using System.Diagnostics;
using System.Text.Json;
using BitmapBackup.Core.Nodes;
using Xunit;

namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>
/// Runs the real qemu-img / qemu-io as the oracle for qcow2 tests, and parses their JSON output.
/// Tests call <see cref="Require"/> first: without the tools they are skipped with a message.
/// </summary>
public static class QemuImg
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private static readonly Lazy<string?> QemuImgPath = new(() => Find("qemu-img"));
    private static readonly Lazy<string?> QemuIoPath = new(() => Find("qemu-io"));

    public static bool Available => QemuImgPath.Value is not null && QemuIoPath.Value is not null;

    /// <summary>Skip the calling test when qemu-img or qemu-io is missing.</summary>
    public static void Require()
        => Assert.SkipUnless(Available, "qemu-img and qemu-io are needed as the qcow2 oracle (install qemu-utils).");

    /// <summary>Run qemu-img with <paramref name="args"/>.</summary>
    /// <remarks>
    /// Creating a LUKS-encrypted image times PBKDF2 with the thread's CPU clock, and QEMU gives up with "Unable to get
    /// accurate CPU usage" when a round measures 0 ms (a coarse clock on a busy machine); that run is retried, twice at most.
    /// </remarks>
    public static QemuResult Run(params string[] args)
    {
        for (int attempt = 1; ; attempt++)
        {
            QemuResult result = Exec(QemuImgPath.Value ?? "qemu-img", args);
            if (result.ExitCode == 0 || attempt == 3 || !result.Stderr.Contains("Unable to get accurate CPU usage", StringComparison.Ordinal))
                return result;
        }
    }

    /// <summary>Run qemu-io with <paramref name="args"/>.</summary>
    public static QemuResult Io(params string[] args) => Exec(QemuIoPath.Value ?? "qemu-io", args);

    /// <summary>Run qemu-img and fail the test unless it exits with 0.</summary>
    public static string RunOk(params string[] args) => Run(args).EnsureSuccess().Stdout;

    /// <summary>Run qemu-io commands (each a -c argument) on a qcow2 image and fail the test unless they all succeed.</summary>
    public static void IoOk(string image, params string[] commands)
    {
        var args = new List<string> { "-f", "qcow2" };
        foreach (string c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(image);
        QemuResult r = Io([.. args]).EnsureSuccess();
        // qemu-io reports command failures on stdout and still exits 0
        Assert.DoesNotContain("failed", r.Stdout, StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>
    /// <c>qemu-img info --output=json</c>. <paramref name="forceShare"/> adds -U: needed while the image is open
    /// here (our image locks make qemu-img refuse it otherwise, as a running QEMU would).
    /// </summary>
    public static JsonElement Info(string image, bool forceShare = false)
        => JsonDocument.Parse(RunOk(["info", "--output=json", .. Shared(forceShare), image])).RootElement.Clone();

    /// <summary><c>qemu-img check --output=json</c> (-U with <paramref name="forceShare"/>); the exit code tells errors (2) and leaks (3) too.</summary>
    public static QemuCheck Check(string image, bool forceShare = false)
    {
        QemuResult r = Run(["check", "--output=json", .. Shared(forceShare), image]);
        Assert.True(r.ExitCode is 0 or 2 or 3, $"qemu-img check failed to run ({r.ExitCode}): {r.Stderr}");
        JsonElement root = JsonDocument.Parse(r.Stdout).RootElement;
        return new QemuCheck(
            r.ExitCode,
            Int(root, "check-errors"),
            Int(root, "corruptions"),
            Int(root, "leaks"),
            Int(root, "corruptions-fixed") + Int(root, "leaks-fixed"),
            r.Stdout + r.Stderr);
    }

    /// <summary>Assert that qemu-img check finds neither errors nor leaks (-U with <paramref name="forceShare"/>: the image is open here).</summary>
    public static void AssertClean(string image, bool forceShare = false)
    {
        QemuCheck c = Check(image, forceShare);
        Assert.True(c.ExitCode == 0 && c.CheckErrors == 0 && c.Corruptions == 0 && c.Leaks == 0,
            $"qemu-img check of '{image}' is not clean: {c.Output}");
    }

    /// <summary><c>qemu-img map --output=json</c> entries.</summary>
    public static IReadOnlyList<QemuMapEntry> Map(string image, bool forceShare = false)
    {
        using JsonDocument doc = JsonDocument.Parse(RunOk(["map", "--output=json", .. Shared(forceShare), image]));
        var entries = new List<QemuMapEntry>();
        foreach (JsonElement e in doc.RootElement.EnumerateArray())
        {
            entries.Add(new QemuMapEntry(
                e.GetProperty("start").GetInt64(),
                e.GetProperty("length").GetInt64(),
                e.GetProperty("depth").GetInt32(),
                !e.TryGetProperty("present", out JsonElement p) || p.GetBoolean(),
                e.GetProperty("zero").GetBoolean(),
                e.GetProperty("data").GetBoolean()));
        }
        return entries;
    }

    /// <summary>
    /// qemu-img map of the top image in our terms: depth &gt; 0 or not present → Unallocated; data → Data;
    /// zero without data → Zero. Adjacent runs with the same state are merged.
    /// </summary>
    public static IReadOnlyList<AllocationExtent> TopLayerMap(string image, bool forceShare = false)
        => Merge(Map(image, forceShare).Select(e => new AllocationExtent(e.Start, e.Length,
            e.Depth > 0 || !e.Present ? AllocationState.Unallocated
            : e.Data ? AllocationState.Data
            : AllocationState.Zero)));

    public static IReadOnlyList<AllocationExtent> Merge(IEnumerable<AllocationExtent> extents)
    {
        var merged = new List<AllocationExtent>();
        foreach (AllocationExtent e in extents)
        {
            if (e.Length == 0)
                continue;
            if (merged.Count > 0 && merged[^1].State == e.State && merged[^1].End == e.Offset)
                merged[^1] = merged[^1] with { Length = merged[^1].Length + e.Length };
            else
                merged.Add(e);
        }
        return merged;
    }

    /// <summary>qemu-img compare exit code: 0 equal, 1 different.</summary>
    public static QemuResult Compare(string a, string b, string? formatA = null, string? formatB = null, bool forceShare = false)
    {
        var args = new List<string> { "compare" };
        args.AddRange(Shared(forceShare));
        if (formatA is not null)
            args.AddRange(["-f", formatA]);
        if (formatB is not null)
            args.AddRange(["-F", formatB]);
        args.AddRange([a, b]);
        return Run([.. args]);
    }

    public static void AssertSameContents(string image, string raw, bool forceShare = false)
    {
        QemuResult r = Compare(image, raw, null, "raw", forceShare);
        Assert.True(r.ExitCode == 0, $"qemu-img compare '{image}' '{raw}' exited {r.ExitCode}: {r.Stdout}{r.Stderr}");
    }

    /// <summary>Convert an image to a raw file with qemu-img and return its bytes.</summary>
    public static byte[] ReadAllAsRaw(string image, string scratchRaw)
    {
        RunOk("convert", "-O", "raw", image, scratchRaw);
        byte[] bytes = File.ReadAllBytes(scratchRaw);
        File.Delete(scratchRaw);
        return bytes;
    }

    /// <summary>qemu-img's -U (force share) when asked: read an image that an open here holds locked.</summary>
    private static string[] Shared(bool forceShare) => forceShare ? ["-U"] : [];

    private static int Int(JsonElement root, string name)
        => root.TryGetProperty(name, out JsonElement v) ? v.GetInt32() : 0;

    private static string? Find(string tool)
    {
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "/usr/bin").Split(Path.PathSeparator).Append("/usr/bin"))
        {
            string candidate = Path.Combine(dir, tool);
            if (File.Exists(candidate))
                return candidate;
        }
        return null;
    }

    private static QemuResult Exec(string tool, string[] args)
    {
        var psi = new ProcessStartInfo(tool)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        psi.Environment["LC_ALL"] = "C";
        using var process = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {tool}");
        process.StandardInput.Close();
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(Timeout))
        {
            process.Kill(entireProcessTree: true);
            Assert.Fail($"{tool} {string.Join(' ', args)} did not finish within {Timeout.TotalSeconds} s");
        }
        process.WaitForExit();
        return new QemuResult(process.ExitCode, stdout.Result, stderr.Result, $"{Path.GetFileName(tool)} {string.Join(' ', args)}");
    }
}

/// <summary>Exit code and output of one qemu-img/qemu-io run.</summary>
public sealed record QemuResult(int ExitCode, string Stdout, string Stderr, string CommandLine)
{
    public QemuResult EnsureSuccess()
    {
        Assert.True(ExitCode == 0, $"'{CommandLine}' exited {ExitCode}: {Stdout}{Stderr}");
        return this;
    }
}

/// <summary>The counts of <c>qemu-img check --output=json</c>.</summary>
public sealed record QemuCheck(int ExitCode, int CheckErrors, int Corruptions, int Leaks, int Fixed, string Output);

/// <summary>One entry of <c>qemu-img map --output=json</c>.</summary>
public sealed record QemuMapEntry(long Start, long Length, int Depth, bool Present, bool Zero, bool Data);
