using System.Diagnostics;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// QEMU's image locks (ImageLocks): the bytes each kind of open holds, compared with what qemu-io holds; the
/// conflicts between opens of one process, named in QEMU's words; refusals that leave nothing behind; file
/// systems without the locks; and the engine's lock never held while a node closes.
/// </summary>
public sealed class ImageLocksTests
{
    private const long MiB = 1 << 20;
    private static readonly int[] WriterBytes = [100, 101, 103, 201, 203];
    private static readonly int[] ReaderBytes = [100, 201, 203];

    private static BlockException Refused(Action action) => Assert.Throws<BlockException>(action);

    [Fact]
    public void EachKindOfOpen_HoldsQemusBytes_AndClosingReleasesThem()
    {
        ProcLocks.Require();
        using var dir = new TempDirectory();
        string raw = dir.File("d.raw");
        RawImage.Create(raw, MiB);
        using (RawImage writer = RawImage.Open(raw, readOnly: false))
            Assert.Equal(WriterBytes, ProcLocks.SharedBytes(raw));
        Assert.Empty(ProcLocks.SharedBytes(raw));
        using (RawImage reader = RawImage.Open(raw, readOnly: true))
            Assert.Equal(ReaderBytes, ProcLocks.SharedBytes(raw));
        using (RawImage shared = RawImage.Open(raw, readOnly: true, forceShare: true))
            Assert.Empty(ProcLocks.SharedBytes(raw));
        Assert.Equal(ErrorIds.ForceShareRequiresReadOnly, Refused(() => RawImage.Open(raw, readOnly: false, forceShare: true)).ErrorId);
        Assert.Empty(ProcLocks.SharedBytes(raw));
    }

    [Fact]
    public void OurWriterAndReader_HoldWhatQemuIoHolds()
    {
        ProcLocks.Require();
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("q.qcow2");
        Qcow2Image.Create(img, MiB);
        int[] qemuWriter, qemuReader;
        using (QemuIoHolder.Start(img))
            qemuWriter = ProcLocks.SharedBytes(img);
        using (QemuIoHolder.Start(img, "-r"))
            qemuReader = ProcLocks.SharedBytes(img);
        Assert.Equal(WriterBytes, qemuWriter);
        Assert.Equal(ReaderBytes, qemuReader);
        using (Qcow2Image writer = Qcow2Image.Open(img, readOnly: false))
            Assert.Equal(qemuWriter, ProcLocks.SharedBytes(img));
        using (Qcow2Image reader = Qcow2Image.Open(img, readOnly: true))
            Assert.Equal(qemuReader, ProcLocks.SharedBytes(img));
    }

    [Fact]
    public void OpensInOneProcess_ConflictLikeProcesses_NamingThePermissionInQemusWords()
    {
        ProcLocks.Require();
        using var dir = new TempDirectory();
        string img = dir.File("c.raw");
        RawImage.Create(img, MiB);

        using (RawImage writer = RawImage.Open(img, readOnly: false))
        {
            BlockException second = Refused(() => RawImage.Open(img, readOnly: false));
            Assert.Equal(ErrorIds.ImageInUse, second.ErrorId);
            Assert.Equal(BlockErrorCategory.ResourceBusy, second.Category);
            Assert.Contains("Failed to get \"write\" lock", second.Message);
            Assert.Contains("another process holds the image", second.Message);
            Assert.Contains($"'{img}'", second.Message);
            BlockException reader = Refused(() => RawImage.Open(img, readOnly: true));
            Assert.Equal(ErrorIds.ImageInUse, reader.ErrorId);
            Assert.Contains("Failed to get shared \"write\" lock", reader.Message);
            Assert.Equal(WriterBytes, ProcLocks.SharedBytes(img)); // the refused opens took nothing
            using RawImage shared = RawImage.Open(img, readOnly: true, forceShare: true);
        }

        using (RawImage reader1 = RawImage.Open(img, readOnly: true))
        using (RawImage reader2 = RawImage.Open(img, readOnly: true))
        {
            Assert.Equal([100, 100, 201, 201, 203, 203], ProcLocks.SharedBytes(img));
            BlockException writer = Refused(() => RawImage.Open(img, readOnly: false));
            Assert.Equal(ErrorIds.ImageInUse, writer.ErrorId);
            Assert.Contains("Failed to get \"write\" lock", writer.Message);
            Assert.Equal([100, 100, 201, 201, 203, 203], ProcLocks.SharedBytes(img));
        }
        using RawImage again = RawImage.Open(img, readOnly: false); // nothing was left behind
    }

    [Fact]
    public void BackingFiles_AreHeldAsReaders_SoTwoChainsShareTheirBase()
    {
        ProcLocks.Require();
        using var dir = new TempDirectory();
        string baseImage = dir.File("base.qcow2");
        Qcow2Image.Create(baseImage, MiB);
        string a = dir.File("a.qcow2"), b = dir.File("b.qcow2");
        Qcow2Image.Create(a, MiB, backingFile: "base.qcow2");
        Qcow2Image.Create(b, MiB, backingFile: "base.qcow2");

        using (Qcow2Image top = Qcow2Image.Open(a, readOnly: false))
        {
            Assert.Equal(WriterBytes, ProcLocks.SharedBytes(a));
            Assert.Equal(ReaderBytes, ProcLocks.SharedBytes(baseImage));
            BlockException write = Refused(() => Qcow2Image.Open(baseImage, readOnly: false));
            Assert.Equal(ErrorIds.ImageInUse, write.ErrorId);
            Assert.Contains("Failed to get \"write\" lock", write.Message);
            using Qcow2Image other = Qcow2Image.Open(b, readOnly: true); // the same base under a second chain
            using IBlockImage probe = ImageProbe.Open(baseImage, readOnly: true);
        }
        Assert.Empty(ProcLocks.SharedBytes(baseImage));
    }

    [Fact]
    public void AFileSystemWithoutOfdLocks_OpensWithoutThem_AndWarnsOnce()
    {
        ProcLocks.Require();
        using var dir = new TempDirectory();
        string img = dir.File("nolocks.raw");
        RawImage.Create(img, MiB);
        EngineWarnings.TakePending();
        ImageLocks.SimulatedErrno = LinuxFile.EINVAL;
        try
        {
            using (RawImage first = RawImage.Open(img, readOnly: false))
            {
                Assert.Empty(ProcLocks.SharedBytes(img));
                using RawImage second = RawImage.Open(img, readOnly: false); // nothing to conflict with, as in QEMU's locking=auto
            }
            IReadOnlyList<string> warnings = EngineWarnings.TakePending();
            string warning = Assert.Single(warnings);
            Assert.Contains("does not support QEMU's image locks", warning);
            Assert.Contains(img, warning);
            using (RawImage third = RawImage.Open(img, readOnly: true))
                Assert.Empty(EngineWarnings.TakePending()); // once per file system
        }
        finally
        {
            ImageLocks.SimulatedErrno = null;
        }
        using RawImage locked = RawImage.Open(img, readOnly: false);
        Assert.Equal(WriterBytes, ProcLocks.SharedBytes(img));
    }

    [Fact]
    public void TheBitmapSidecarsTemporaryFile_IsWrittenUnderAWriterLock()
    {
        ProcLocks.Require();
        using var dir = new TempDirectory();
        string img = dir.File("s.raw");
        BlockEngine.CreateImage(img, MiB);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(img, "s");
        string temp = img + ".bitmaps.tmp";
        using (RawImage holder = RawImage.Open(WithFile(temp), readOnly: true))
        {
            BlockException e = Refused(() => node.AddBitmap("b", persistent: true));
            Assert.Equal(ErrorIds.ImageInUse, e.ErrorId);
            Assert.Contains(temp, e.Message);
        }
        node.AddBitmap("b", persistent: true);
        engine.Close(node);
        Assert.False(File.Exists(temp));
        Assert.Equal("b", Assert.Single(engine.ReadStoredBitmaps(img)).Name);
    }

    [Fact]
    public void ClosingANodeThatWaits_DoesNotHoldUpTheEngine()
    {
        using var dir = new TempDirectory();
        string a = dir.File("a.raw"), b = dir.File("b.raw");
        BlockEngine.CreateImage(a, MiB);
        BlockEngine.CreateImage(b, MiB);
        var engine = new BlockEngine();
        BlockNode nodeA = engine.Open(a, "a");
        Task closing;
        using (nodeA.Quiesce()) // the close waits for this, as it waits for writes in flight
        {
            closing = Task.Run(() => engine.Close(nodeA));
            Assert.False(closing.Wait(200));
            Task<BlockNode> opening = Task.Run(() => engine.Open(b, "b"));
            Assert.True(opening.Wait(TimeSpan.FromSeconds(10)), "an open waited for another node's close");
            Assert.Equal(["a", "b"], engine.Nodes.Select(n => n.Name).ToArray());
        }
        Assert.True(closing.Wait(TimeSpan.FromSeconds(10)));
        Assert.Equal(["b"], engine.Nodes.Select(n => n.Name).ToArray());
        engine.CloseAll();
    }

    [Fact]
    public void ConcurrentOpens_OfOnePath_AdmitOne_AndOfOneStem_GetUniqueNames()
    {
        using var dir = new TempDirectory();
        string img = dir.File("same.raw");
        BlockEngine.CreateImage(img, MiB);
        var engine = new BlockEngine();
        var start = new Barrier(8);
        var outcomes = Enumerable.Range(0, 8).Select(i => Task.Factory.StartNew(() =>
        {
            start.SignalAndWait();
            try
            {
                engine.Open(img, $"n{i}");
                return "opened";
            }
            catch (BlockException e)
            {
                return e.ErrorId;
            }
        }, TaskCreationOptions.LongRunning)).ToArray();
        Task.WaitAll(outcomes, TimeSpan.FromSeconds(30));
        Assert.Equal(1, outcomes.Count(t => t.Result == "opened"));
        Assert.Equal(7, outcomes.Count(t => t.Result == ErrorIds.ImageInUse));
        engine.CloseAll();

        string[] paths = Enumerable.Range(0, 8).Select(i =>
        {
            string folder = dir.File($"f{i}");
            Directory.CreateDirectory(folder);
            string p = Path.Combine(folder, "disk.raw");
            BlockEngine.CreateImage(p, MiB);
            return p;
        }).ToArray();
        var stems = new Barrier(8);
        var named = paths.Select(p => Task.Factory.StartNew(() =>
        {
            stems.SignalAndWait();
            return engine.Open(p).Name;
        }, TaskCreationOptions.LongRunning)).ToArray();
        Task.WaitAll(named, TimeSpan.FromSeconds(30));
        Assert.Equal(8, named.Select(t => t.Result).Distinct().Count());
        Assert.All(named, t => Assert.StartsWith("disk", t.Result));
        engine.CloseAll();
    }

    private static string WithFile(string path)
    {
        File.WriteAllBytes(path, new byte[512]);
        return path;
    }

    /// <summary>qemu-io holding an image open, reading commands from a pipe until disposed.</summary>
    private sealed class QemuIoHolder : IDisposable
    {
        private readonly Process _process;

        private QemuIoHolder(Process process) => _process = process;

        public static QemuIoHolder Start(string image, params string[] options)
        {
            var psi = new ProcessStartInfo("qemu-io")
            {
                RedirectStandardInput = true,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            };
            foreach (string o in options)
                psi.ArgumentList.Add(o);
            psi.ArgumentList.Add("-f");
            psi.ArgumentList.Add("qcow2");
            psi.ArgumentList.Add(image);
            var holder = new QemuIoHolder(Process.Start(psi)!);
            Assert.True(ProcLocks.WaitForAny(image, TimeSpan.FromSeconds(20)), "qemu-io did not lock the image");
            return holder;
        }

        public void Dispose()
        {
            _process.StandardInput.Close(); // qemu-io quits at the end of its input
            if (!_process.WaitForExit(10_000))
                _process.Kill();
            _process.Dispose();
        }
    }
}
