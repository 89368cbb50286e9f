using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Backing chains have no fixed depth (issue 23): a 1,000-image chain opens, reads, maps and closes with its file
/// descriptors held within the budget of open backing files, and without a recursion as deep as the chain; an error
/// deep in a chain names the path given and the image at fault; a backing file changed while its descriptor was
/// parked is refused. The budget is process-wide, so these tests run alone.
/// </summary>
[Collection(ProcessWideCollection.Name)]
public sealed class Qcow2DeepChainTests : IClassFixture<Qcow2DeepChainTests.DeepChain>
{
    private const int Cluster = 512;
    private const long Size = 1L << 20;

    private readonly DeepChain _chain;

    public Qcow2DeepChainTests(DeepChain chain) => _chain = chain;

    /// <summary>
    /// 1,000 images, c0 (the base) to c999: c0 stores clusters 0-19 (0xB0); c50·k stores cluster k (byte k) for k = 1-19;
    /// c975 makes cluster 10 a zero cluster. Every other image stores nothing, as an hourly backup of an idle disk.
    /// </summary>
    public sealed class DeepChain : IDisposable
    {
        public const int Depth = 1000;

        public DeepChain()
        {
            for (int i = 0; i < Depth; i++)
            {
                Qcow2Image.Create(Dir.File($"c{i}.qcow2"), Size, Cluster, i == 0 ? null : $"c{i - 1}.qcow2", i == 0 ? null : ImageFormat.Qcow2, durable: false);
                if (i == 0 || i % 50 == 0 || i == 975)
                {
                    using Qcow2Image image = Qcow2Image.Open(Dir.File($"c{i}.qcow2"), readOnly: false);
                    if (i == 0)
                        image.Write(0, Filled(20 * Cluster, 0xB0));
                    else if (i == 975)
                        image.WriteZeroes(10 * Cluster, Cluster);
                    else
                        image.Write(i / 50 * Cluster, Filled(Cluster, (byte)(i / 50)));
                }
            }
        }

        public TempDirectory Dir { get; } = new();

        public string Top => Dir.File($"c{Depth - 1}.qcow2");

        public void Dispose() => Dir.Dispose();
    }

    private static byte[] Filled(int length, byte value)
    {
        var bytes = new byte[length];
        Array.Fill(bytes, value);
        return bytes;
    }

    private static byte[] Expected()
    {
        var disk = new byte[Size];
        disk.AsSpan(0, 20 * Cluster).Fill(0xB0);
        for (int k = 1; k < 20; k++)
            disk.AsSpan(k * Cluster, Cluster).Fill((byte)k);
        disk.AsSpan(10 * Cluster, Cluster).Clear();
        return disk;
    }

    private static int OpenDescriptors() => Directory.GetFiles("/proc/self/fd").Length;

    [Fact]
    public void ThousandImageChain_ReadsMapsAndClosesWithinTheDescriptorBudget()
    {
        FileHandleBudget.LimitOverride = 16;
        try
        {
            int before = OpenDescriptors();
            long reopens = FileHandleBudget.Reopens;
            byte[] disk = new byte[Size];
            IReadOnlyList<AllocationExtent>? map = null;
            int during = 0;
            Exception? failure = null;
            // A thread with a small stack: nothing may recurse once per image of the chain.
            var worker = new Thread(() =>
            {
                try
                {
                    using Qcow2Image top = Qcow2Image.Open(_chain.Top, readOnly: true);
                    Assert.Equal(DeepChain.Depth - 1, top.BackingChain.Count);
                    Assert.Equal(_chain.Dir.File("c0.qcow2"), top.BackingChain[^1].Path);
                    top.Read(0, disk);
                    top.Read(0, disk); // again: parked files open again
                    map = ChainAllocation.Of(top, 0, Size).ToList();
                    during = OpenDescriptors();
                }
                catch (Exception e)
                {
                    failure = e;
                }
            }, maxStackSize: 256 * 1024);
            worker.Start();
            worker.Join();
            Assert.Null(failure);

            Assert.Equal(Expected(), disk);
            Assert.Equal(
                [new AllocationExtent(0, 10 * Cluster, AllocationState.Data), new AllocationExtent(10 * Cluster, Cluster, AllocationState.Zero),
                 new AllocationExtent(11 * Cluster, 9 * Cluster, AllocationState.Data), new AllocationExtent(20 * Cluster, Size - 20 * Cluster, AllocationState.Unallocated)],
                map);
            Assert.True(during - before <= 16 + 8, $"{during - before} descriptors were open for a 1,000-image chain with a budget of 16");
            Assert.True(FileHandleBudget.Reopens > reopens, "no parked backing file was opened again");
            Assert.Equal(0, FileHandleBudget.OpenCount);
            Assert.True(OpenDescriptors() <= before + 2, "descriptors were left open after the chain was closed");
        }
        finally
        {
            FileHandleBudget.LimitOverride = null;
        }
    }

    [Fact]
    public void ThousandImageChain_ReadsAsQemuImgConvertReadsIt()
    {
        QemuImg.Require();
        byte[] ours = new byte[Size];
        using (Qcow2Image top = Qcow2Image.Open(_chain.Top, readOnly: true))
            top.Read(0, ours);
        Assert.Equal(QemuImg.ReadAllAsRaw(_chain.Top, _chain.Dir.File("convert.raw")), ours);
    }

    [Fact]
    public void WritableImageOnAThousandImageChain_CopiesOnWriteFromTheBase()
    {
        using var dir = new TempDirectory();
        string w = dir.File("w.qcow2");
        Qcow2Image.Create(w, Size, Cluster, _chain.Top, ImageFormat.Qcow2);
        using (Qcow2Image image = Qcow2Image.Open(w, readOnly: false))
        {
            image.Write(100, Filled(10, 0x5A));
            image.Write(10 * Cluster + 7, Filled(3, 0x66));
        }
        byte[] expected = Expected();
        expected.AsSpan(100, 10).Fill(0x5A);
        expected.AsSpan(10 * Cluster + 7, 3).Fill(0x66);
        byte[] disk = new byte[Size];
        using (Qcow2Image image = Qcow2Image.Open(w, readOnly: true))
        {
            disk.AsSpan().Fill(0xEE);
            image.Read(0, disk);
            Assert.Equal([new AllocationExtent(0, Cluster, AllocationState.Data), new AllocationExtent(Cluster, 9 * Cluster, AllocationState.Unallocated),
                new AllocationExtent(10 * Cluster, Cluster, AllocationState.Data), new AllocationExtent(11 * Cluster, Size - 11 * Cluster, AllocationState.Unallocated)],
                QemuImg.Merge(image.GetAllocation(0, Size)));
        }
        Assert.Equal(expected, disk);
        if (QemuImg.Available)
            QemuImg.AssertClean(w);
    }

    [Fact]
    public void ErrorDeepInAChain_NamesThePathGivenAndTheImageAtFault()
    {
        using var dir = new TempDirectory();
        for (int i = 0; i < 200; i++)
            Qcow2Image.Create(dir.File($"d{i}.qcow2"), Size, Cluster, i == 0 ? null : $"d{i - 1}.qcow2", i == 0 ? null : ImageFormat.Qcow2, durable: false);
        File.Delete(dir.File("d50.qcow2"));
        string top = dir.File("d199.qcow2");
        BlockException e = Assert.Throws<BlockException>(() => Qcow2Image.Open(top, readOnly: true).Dispose());
        Assert.Equal(ErrorIds.BackingFileNotFound, e.ErrorId);
        Assert.Contains($"'{top}'", e.Message);
        Assert.Contains($"'{dir.File("d51.qcow2")}'", e.Message);
        Assert.Contains("148 images below it", e.Message);
        Assert.Equal(top, e.Target);

        // The top's own backing file missing: the message names the top once, as before.
        File.Delete(dir.File("d198.qcow2"));
        e = Assert.Throws<BlockException>(() => Qcow2Image.Open(top, readOnly: true).Dispose());
        Assert.Equal(ErrorIds.BackingFileNotFound, e.ErrorId);
        Assert.StartsWith($"The backing file 'd198.qcow2' of image '{top}'", e.Message);
    }

    [Fact]
    public void BackingFileChangedWhileParked_IsRefused()
    {
        using var dir = new TempDirectory();
        for (int i = 0; i < 6; i++)
        {
            Qcow2Image.Create(dir.File($"e{i}.qcow2"), Size, Cluster, i == 0 ? null : $"e{i - 1}.qcow2", i == 0 ? null : ImageFormat.Qcow2);
            using Qcow2Image image = Qcow2Image.Open(dir.File($"e{i}.qcow2"), readOnly: false);
            image.Write(i * Cluster, Filled(Cluster, (byte)(i + 1)));
        }
        FileHandleBudget.LimitOverride = 1;
        try
        {
            using Qcow2Image top = Qcow2Image.Open(dir.File("e5.qcow2"), readOnly: true);
            var buffer = new byte[Cluster];
            top.Read(0, buffer); // reads e0's data: e0 is the one open backing file now
            Assert.Equal(Filled(Cluster, 1), buffer);
            top.Read(2 * Cluster, buffer); // e2's turn: e0 is parked
            Assert.Equal(Filled(Cluster, 3), buffer);
            Assert.Equal(1, FileHandleBudget.OpenCount);

            File.AppendAllText(dir.File("e0.qcow2"), "changed while parked");
            BlockException e = Assert.Throws<BlockException>(() => top.Read(0, buffer));
            Assert.Equal(ErrorIds.BackingFileChanged, e.ErrorId);
            Assert.Contains(dir.File("e0.qcow2"), e.Message);

            // The other images still read.
            top.Read(4 * Cluster, buffer);
            Assert.Equal(Filled(Cluster, 5), buffer);
        }
        finally
        {
            FileHandleBudget.LimitOverride = null;
        }
    }
}

/// <summary>Tests that change process-wide settings (the budget of open backing files) run alone.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ProcessWideCollection
{
    public const string Name = "ProcessWide";
}
