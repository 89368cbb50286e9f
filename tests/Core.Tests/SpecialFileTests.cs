using System.Diagnostics;
using System.Net.Sockets;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Paths that are not disk images (issue 17): a FIFO, a socket, a character device and a folder are refused with
/// their own error ids at once, never by an open that waits on them, and the engine goes on serving other opens.
/// Every call runs under a timeout, so that a regression fails the test instead of hanging the run.
/// </summary>
public sealed class SpecialFileTests
{
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    public static TheoryData<string> Kinds => new() { "fifo", "socket", "chardev", "folder" };

    [Theory]
    [MemberData(nameof(Kinds))]
    public void ASpecialFile_IsRefusedWithItsOwnId_AtOnce_AndTheEngineGoesOn(string kind)
    {
        Assert.SkipUnless(OperatingSystem.IsLinux(), "FIFOs, sockets and /dev/zero are made the Linux way here.");
        using var dir = new TempDirectory();
        using Socket? socket = kind == "socket" ? new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) : null;
        (string path, string id) = kind switch
        {
            "fifo" => (MakeFifo(dir.File("pipe")), ErrorIds.ImageIsFifo),
            "socket" => (Bind(socket!, dir.File("sock")), ErrorIds.ImageIsSocket),
            "chardev" => ("/dev/zero", ErrorIds.ImageIsCharacterDevice),
            _ => (Directory.CreateDirectory(dir.File("folder")).FullName, ErrorIds.ImageIsFolder),
        };
        var engine = new BlockEngine();
        var watch = Stopwatch.StartNew();
        Assert.Equal(id, ErrorIdWithin(() => engine.Open(path, "special")));
        Assert.Equal(id, ErrorIdWithin(() => engine.Open(path, "special", readOnly: true)));
        Assert.Equal(id, ErrorIdWithin(() => ImageProbe.Detect(path)));
        Assert.Equal(id, ErrorIdWithin(() => engine.ReadStoredBitmaps(path)));
        Assert.Equal(id, ErrorIdWithin(() => Qcow2Checker.Check(path)));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(1), $"refusing '{path}' five times took {watch.Elapsed}");

        string img = dir.File("ok.qcow2");
        BlockEngine.CreateImage(img, 1 << 20, ImageFormat.Qcow2);
        BlockNode node = engine.Open(img, "special"); // the name is free again, and the engine was never held
        Assert.Equal(ImageFormat.Qcow2, node.Format);
        engine.CloseAll();
    }

    [Fact]
    public void AFifoPutInPlaceOfAFile_DoesNotBlockTheOpen()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux(), "mkfifo");
        using var dir = new TempDirectory();
        // The sidecar's temporary file is opened without a type check first (it may not exist): what is opened is
        // checked afterwards, and O_NONBLOCK keeps that open from waiting for a writer, as for a FIFO that replaces
        // an image between the check and the open.
        string fifo = MakeFifo(dir.File("x.bitmaps.tmp"));
        Assert.Equal(ErrorIds.ImageIsFifo, ErrorIdWithin(() => ImageFiles.OpenToRewrite(fifo).Dispose()));
        Assert.Equal(ErrorIds.ImageAlreadyExists, ErrorIdWithin(() => ImageFiles.CreateNew(fifo).Dispose()));
    }

    [Fact]
    public void ABackingFileThatIsAFifo_IsRefused_NotWaitedFor()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux(), "mkfifo");
        using var dir = new TempDirectory();
        string raw = dir.File("base.raw");
        BlockEngine.CreateImage(raw, 1 << 20);
        string top = dir.File("top.qcow2");
        BlockEngine.CreateImage(top, 1 << 20, ImageFormat.Qcow2, backingFile: "base.raw");
        File.Delete(raw);
        MakeFifo(raw);
        Assert.Equal(ErrorIds.ImageIsFifo, ErrorIdWithin(() => new BlockEngine().Open(top, "t", readOnly: true)));
    }

    private static string ErrorIdWithin(Action action)
    {
        Task<string> attempt = Task.Factory.StartNew(() =>
        {
            try
            {
                action();
                return "(no error)";
            }
            catch (BlockException e)
            {
                return e.ErrorId;
            }
        }, TaskCreationOptions.LongRunning);
        Assert.True(attempt.Wait(Patience), $"the call did not return within {Patience.TotalSeconds} s: it blocks on the special file");
        return attempt.Result;
    }

    private static string MakeFifo(string path)
    {
        using Process p = Process.Start("mkfifo", [path])!;
        p.WaitForExit();
        Assert.Equal(0, p.ExitCode);
        return path;
    }

    private static string Bind(Socket socket, string path)
    {
        socket.Bind(new UnixDomainSocketEndPoint(path));
        socket.Listen();
        return path;
    }
}
