using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using Xunit;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// The merge engine (<see cref="ChainMerge"/>, <see cref="MergeJournal"/>, <see cref="ChainFlattener"/>) on chains
/// made with qemu-img, checked with qemu-img compare and check. Fixed seeds.
/// </summary>
public sealed class ChainMergeTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * KiB;

    /// <summary>
    /// base.qcow2 (data in the first MiB), inc1 (a 64 KiB write over it and 64 KiB elsewhere), inc2 (zeros over the
    /// first 64 KiB, a partial cluster, and a write beyond the old data), with the same writes kept in a reference array.
    /// </summary>
    private static (string[] Images, byte[][] Disks) MakeChain(TempDirectory dir, int clusterSize = 64 * KiB)
    {
        const long size = 4 * MiB;
        var disk = new byte[size];
        var images = new[] { dir.File("base.qcow2"), dir.File("inc1.qcow2"), dir.File("inc2.qcow2") };
        var disks = new byte[3][];
        QemuImg.RunOk("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", images[0], size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        Write(images[0], disk, 0, MiB, 0x11);
        disks[0] = (byte[])disk.Clone();
        QemuImg.RunOk("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", "-F", "qcow2", "-b", "base.qcow2", images[1]);
        Write(images[1], disk, 128 * KiB, 64 * KiB, 0x22);
        Write(images[1], disk, 3 * MiB, 64 * KiB, 0x33);
        disks[1] = (byte[])disk.Clone();
        QemuImg.RunOk("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", "-F", "qcow2", "-b", "inc1.qcow2", images[2]);
        QemuImg.IoOk(images[2], "write -z 0 64k");
        Array.Clear(disk, 0, 64 * KiB);
        Write(images[2], disk, (2 * MiB) + 100, 3000, 0x44);
        disks[2] = (byte[])disk.Clone();
        return (images, disks);
    }

    private static void Write(string image, byte[] disk, long offset, int length, byte pattern)
    {
        QemuImg.IoOk(image, $"write -P {pattern} {offset} {length}");
        disk.AsSpan((int)offset, length).Fill(pattern);
    }

    private static void AssertReads(string image, byte[] expected)
    {
        using IBlockImage opened = BlockEngine.OpenImage(image, readOnly: true);
        var actual = new byte[expected.Length];
        opened.Read(0, actual);
        Assert.True(actual.AsSpan().SequenceEqual(expected), $"'{image}' does not read the expected disk");
    }

    private static ChainMerge RunToEnd(ChainMergeRequest request)
    {
        ChainMerge merge = ChainMerge.Prepare(request, new BlockEngine());
        merge.Run();
        Assert.True(merge.Completion.Wait(TimeSpan.FromSeconds(60)), "the merge did not end");
        return merge;
    }

    [Fact]
    public void KeepTwo_StreamsTheBaseIntoTheMiddleImage_AndEveryImageStillReadsItsPointInTime()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (string[] images, byte[][] disks) = MakeChain(dir);
        ChainMerge merge = RunToEnd(new ChainMergeRequest { Top = images[2], Keep = 2 });
        Assert.True(merge.Succeeded, merge.Error?.Message);
        Assert.Equal([images[1], images[2]], merge.ChainAfter);
        Assert.Equal([images[0]], merge.Removed);
        Assert.False(File.Exists(images[0]));
        Assert.Null(Qcow2Image.PeekBackingFileName(images[1]));
        Assert.Equal("inc1.qcow2", Qcow2Image.PeekBackingFileName(images[2]));
        QemuImg.AssertClean(images[1]);
        QemuImg.AssertClean(images[2]);
        AssertReads(images[1], disks[1]);
        AssertReads(images[2], disks[2]);
        Assert.Empty(Directory.GetFiles(dir.Path, "*.merg*"));
    }

    [Fact]
    public void KeepOne_WithSmallClusters_FlattensIntoTheTop_WritingNoZeroCluster()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (string[] images, byte[][] disks) = MakeChain(dir, clusterSize: 4 * KiB);
        ChainMerge merge = RunToEnd(new ChainMergeRequest { Top = images[2], Keep = 1 });
        Assert.True(merge.Succeeded, merge.Error?.Message);
        QemuImg.AssertClean(images[2]);
        AssertReads(images[2], disks[2]);
        using IBlockImage top = BlockEngine.OpenImage(images[2], readOnly: true);
        Assert.Equal(4 * KiB, top.ClusterSize);
        long data = top.GetAllocation(0, top.Size).Where(e => e.State == AllocationState.Data).Sum(e => e.Length);
        Assert.Equal(MiB - (64 * KiB) + (64 * KiB) + (4 * KiB), data); // the zeroed 64 KiB are not stored; 3,000 bytes at +100 fill one 4 KiB cluster
    }

    [Fact]
    public void Plan_IsTheUnionOfTheStoredRanges_InWholeClusters()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (string[] images, _) = MakeChain(dir);
        using IBlockImage top = BlockEngine.OpenImage(images[2], readOnly: true);
        var layers = new List<IBlockImage>();
        for (IBlockImage? i = top; i is not null; i = (i as Qcow2Image)?.BackingImage)
            layers.Insert(0, i);
        IReadOnlyList<(long Offset, long Length)> plan = ChainFlattener.Plan(layers, top.Size, 64 * KiB);
        Assert.Equal([(0L, (long)MiB), (2L * MiB, 64L * KiB), (3L * MiB, 64L * KiB)], plan);
    }

    [Fact]
    public void Journal_IsCarriedOutOnlyAfterTheSwitch_AndATornOneDeletesNothing()
    {
        using var dir = new TempDirectory();
        string image = dir.File("inc3.qcow2");
        string[] doomed = [dir.File("inc2.qcow2"), dir.File("inc1.qcow2"), dir.File("kept.qcow2")];
        foreach (string f in doomed)
            File.WriteAllText(f, "x");
        var chain = new HashSet<string>(StringComparer.Ordinal) { image, dir.File("kept.qcow2") };

        MergeJournal.Write(image, doomed);
        Assert.Equal(doomed, MergeJournal.Read(MergeJournal.PathFor(image)));
        Assert.Empty(MergeJournal.Recover(image, switched: false, chain));
        Assert.All(doomed, f => Assert.True(File.Exists(f)));
        Assert.False(File.Exists(MergeJournal.PathFor(image)));

        MergeJournal.Write(image, doomed);
        File.WriteAllText(MergeJournal.PathFor(image), File.ReadAllText(MergeJournal.PathFor(image)).Replace("end\n", "", StringComparison.Ordinal));
        Assert.Null(MergeJournal.Read(MergeJournal.PathFor(image)));
        Assert.Empty(MergeJournal.Recover(image, switched: true, chain));
        Assert.All(doomed, f => Assert.True(File.Exists(f)));

        MergeJournal.Write(image, doomed);
        Assert.Equal([doomed[0], doomed[1]], MergeJournal.Recover(image, switched: true, chain));
        Assert.False(File.Exists(doomed[0]));
        Assert.False(File.Exists(doomed[1]));
        Assert.True(File.Exists(doomed[2]), "an image of the chain as it is now is never deleted");
        Assert.False(File.Exists(MergeJournal.PathFor(image)));
    }

    [Fact]
    public void Prepare_RefusesAKeepBelowOne_AndAChainWithAMissingImage()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (string[] images, _) = MakeChain(dir);
        BlockException e = Assert.Throws<BlockException>(() => ChainMerge.Prepare(new ChainMergeRequest { Top = images[2], Keep = 0 }, new BlockEngine()));
        Assert.Equal(ErrorIds.InvalidKeepCount, e.ErrorId);
        File.Delete(images[0]);
        e = Assert.Throws<BlockException>(() => ChainMerge.Prepare(new ChainMergeRequest { Top = images[2], Keep = 1 }, new BlockEngine()));
        Assert.Equal(ErrorIds.BackupChainBroken, e.ErrorId);
        Assert.Equal(ErrorIds.BackingFileNotFound, Assert.IsType<BlockException>(e.InnerException).ErrorId);
    }

    [Fact]
    public void Cancel_BeforeTheSwitch_LeavesTheChainAndNoMergedFile()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (string[] images, byte[][] disks) = MakeChain(dir);
        ChainMerge merge = ChainMerge.Prepare(new ChainMergeRequest { Top = images[2], Keep = 1, BytesPerSecond = 64 * KiB }, new BlockEngine());
        merge.Run();
        Assert.True(SpinWait.SpinUntil(() => merge.Status == ChainMergeStatus.Copying, TimeSpan.FromSeconds(30)));
        merge.Cancel();
        Assert.True(merge.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.Equal(ChainMergeStatus.Cancelled, merge.Status);
        Assert.Equal(ErrorIds.MergeCancelled, merge.Error?.ErrorId);
        Assert.All(images, i => Assert.True(File.Exists(i)));
        Assert.Empty(Directory.GetFiles(dir.Path, "*.merg*"));
        AssertReads(images[2], disks[2]);
        Assert.Equal("inc1.qcow2", Qcow2Image.PeekBackingFileName(images[2]));
    }
}
