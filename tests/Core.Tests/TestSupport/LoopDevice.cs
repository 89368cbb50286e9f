using System.Diagnostics;
using Xunit;

namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>
/// A loop device on a new sparse file in a scratch folder, detached (and the folder removed) at dispose. Needs root,
/// losetup and /dev/loop-control: <see cref="Create"/> skips the calling test without them.
/// </summary>
public sealed class LoopDevice : IDisposable
{
    private readonly TempDirectory _dir;

    private LoopDevice(TempDirectory dir, string backingFile, string device)
    {
        _dir = dir;
        BackingFile = backingFile;
        Device = device;
    }

    /// <summary>The file the device reads and writes.</summary>
    public string BackingFile { get; }

    /// <summary>The device path, /dev/loopN.</summary>
    public string Device { get; }

    /// <summary>A loop device of <paramref name="size"/> bytes, or a skipped test where loop devices cannot be made.</summary>
    public static LoopDevice Create(long size)
    {
        Assert.SkipUnless(OperatingSystem.IsLinux() && File.Exists("/dev/loop-control") && Environment.UserName == "root",
            "loop devices need Linux, /dev/loop-control and root");
        var dir = new TempDirectory();
        string file = dir.File("backing.img");
        using (var f = new FileStream(file, FileMode.CreateNew))
            f.SetLength(size);
        (int code, string output) = Run("losetup", "-f", "--show", file);
        if (code != 0)
        {
            dir.Dispose();
            Assert.Skip($"losetup failed: {output}");
        }
        return new LoopDevice(dir, file, output.Trim());
    }

    /// <summary>Run a program; its exit code and standard output (standard error appended).</summary>
    public static (int ExitCode, string Output) Run(string program, params string[] args)
    {
        var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using Process p = Process.Start(psi)!;
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout + stderr.Result);
    }

    public void Dispose()
    {
        Run("losetup", "-d", Device);
        _dir.Dispose();
    }
}
