using System.Diagnostics;

namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>
/// The open-file-description locks the kernel lists in /proc/locks for one file (by device and inode: tests running
/// in parallel on other file systems have files with the same inode numbers), as the sorted list of
/// the bytes they cover: what QEMU's image locking sees. Linux only; tests call <see cref="Require"/> first.
/// </summary>
public static class ProcLocks
{
    public static void Require()
        => Assert.SkipUnless(OperatingSystem.IsLinux() && File.Exists("/proc/locks"), "QEMU's image locks are OFD locks, listed in /proc/locks on Linux only.");

    /// <summary>Every byte some open holds a shared OFD lock on (each lock is listed once per holder; duplicates kept).</summary>
    public static int[] SharedBytes(string path)
    {
        string id = DeviceAndInode(path);
        var bytes = new List<int>();
        foreach (string line in File.ReadAllLines("/proc/locks"))
        {
            string[] f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            // "1: OFDLCK ADVISORY  READ -1 fe:00:11657845 203 203"; waiters are listed with "->" and are not held
            if (f.Length < 8 || f[1] != "OFDLCK" || f[3] != "READ" || !string.Equals(f[5], id, StringComparison.OrdinalIgnoreCase))
                continue;
            for (long b = long.Parse(f[6]); b <= long.Parse(f[7]); b++)
                bytes.Add((int)b);
        }
        bytes.Sort();
        return [.. bytes];
    }

    /// <summary>Wait until some lock is listed on the file (a child process has opened it); false after the timeout.</summary>
    public static bool WaitForAny(string path, TimeSpan timeout)
    {
        var watch = Stopwatch.StartNew();
        while (watch.Elapsed < timeout)
        {
            if (SharedBytes(path).Length > 0)
                return true;
            Thread.Sleep(20);
        }
        return false;
    }

    /// <summary>The file's "major:minor:inode" as /proc/locks prints it (major and minor in hex, inode in decimal).</summary>
    private static string DeviceAndInode(string path)
    {
        var psi = new ProcessStartInfo("stat") { RedirectStandardOutput = true, UseShellExecute = false };
        psi.ArgumentList.Add("-L");
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("%d %i");
        psi.ArgumentList.Add(path);
        using Process p = Process.Start(psi)!;
        string[] output = p.StandardOutput.ReadToEnd().Trim().Split(' ');
        p.WaitForExit();
        Assert.True(p.ExitCode == 0 && output.Length == 2, $"stat of '{path}' failed");
        ulong dev = ulong.Parse(output[0]);
        ulong major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfffUL);
        ulong minor = (dev & 0xff) | ((dev >> 12) & ~0xffUL);
        return $"{major:x2}:{minor:x2}:{output[1]}";
    }
}
