using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Testing;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>Backup jobs into raw targets: point in time, bitmap modes, failures. (qcow2 chains: BackupChainTests.)</summary>
[Collection(FaultInjectionCollection.Name)]
public sealed class BackupJobTests
{
    private const int Size = 8 << 20;
    private static readonly BackupTargetOptions RawTargets = new();

    private static RawNodeFixture NodeWithData(int seed = 1)
    {
        var f = new RawNodeFixture(Size);
        byte[] data = new byte[Size];
        new Random(seed).NextBytes(data);
        data.AsSpan(2 << 20, 1 << 20).Clear(); // a zero region
        f.Node.Write(0, data);
        return f;
    }

    private static byte[] ReadAll(BlockNode node)
    {
        byte[] all = new byte[node.Size];
        node.Read(0, all);
        return all;
    }

    private static byte[] ReadFile(string path) => File.ReadAllBytes(path);

    private static BackupJob Run(BackupRequest request)
    {
        BackupJob job = BackupJob.Start(request, RawTargets);
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(60)), "the job did not end");
        return job;
    }

    [Fact]
    public void FullBackupIsTheDiskAtTheStartWhateverIsWrittenMeanwhile()
    {
        using RawNodeFixture f = NodeWithData();
        byte[] before = ReadAll(f.Node);
        string target = Path.Combine(f.Folder, "full.img");
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = f.Node, Target = target, Sync = BackupSyncMode.Full, TargetFormat = ImageFormat.Raw,
            BytesPerSecond = 8 << 20, // about a second: the writes below race the copy
        }, RawTargets);
        var rng = new Random(7);
        byte[] junk = new byte[70000];
        for (int i = 0; i < 200 && !job.Completion.IsCompleted; i++)
        {
            rng.NextBytes(junk);
            f.Node.Write(rng.NextInt64(Size - junk.Length), junk);
            Thread.Sleep(2);
        }
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(60)));

        Assert.True(job.Succeeded, job.Error?.Message);
        Assert.Equal(before, ReadFile(target));
        Assert.False(File.Exists(target + BackupTarget.PartialSuffix));
        Assert.Equal(Size, job.BytesTotal);
        Assert.Equal(Size, job.BytesDone);
    }

    [Fact]
    public void FullBackupWithOnSuccessResetsTheBitmapToTheWritesSinceTheStart()
    {
        using RawNodeFixture f = NodeWithData();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[1]);
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = f.Node, Target = Path.Combine(f.Folder, "anchor.img"), TargetFormat = ImageFormat.Raw,
            Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess, BytesPerSecond = 16 << 20,
        }, RawTargets);
        Assert.True(b.Busy);
        Assert.True(b.Recording);
        f.Node.Write(5 << 20, new byte[1]);
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(60)));
        Assert.True(job.Succeeded, job.Error?.Message);
        Assert.False(b.Busy);
        Assert.Equal([(5L << 20, 65536L)], b.GetDirtyRanges());
    }

    [Fact]
    public void IncrementalIntoACopyOfThePreviousBackupReproducesTheDisk()
    {
        using RawNodeFixture f = NodeWithData();
        f.Node.AddBitmap("b", 4096);
        string full = Path.Combine(f.Folder, "full.img");
        Assert.True(Run(new BackupRequest { Source = f.Node, Target = full, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess }).Succeeded);

        f.Node.Write(100, new byte[] { 1, 2, 3 });
        f.Node.Write((3 << 20) + 4096 * 3, new byte[8192]); // zeros over data
        f.Node.WriteZeroes(6 << 20, 65536);
        string inc = Path.Combine(f.Folder, "inc.img");
        File.Copy(full, inc);
        BackupJob job = Run(new BackupRequest
        {
            Source = f.Node, Target = inc, TargetFormat = ImageFormat.Raw, UseExistingTarget = true,
            Sync = BackupSyncMode.Incremental, BitmapName = "b",
        });

        Assert.True(job.Succeeded, job.Error?.Message);
        Assert.Equal(ReadAll(f.Node), ReadFile(inc));
        Assert.Equal(3 * 65536, job.BytesTotal); // three dirty 4 KiB ranges, copied as whole 64 KiB job clusters
        Assert.Equal(0, f.Node.GetBitmap("b").Count);
    }

    [Fact]
    public void AFailedReadFailsTheJobDeletesTheTargetAndKeepsEveryBit()
    {
        using RawNodeFixture f = NodeWithData();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(1 << 20, new byte[3 << 20]);
        long before = b.Count;
        string target = Path.Combine(f.Folder, "fail.img");
        FaultRule rule = FaultInjection.Add(f.Node.Path, FaultOperation.Read, offset: 2 << 20, length: 65536, times: 1);
        try
        {
            BackupJob job = Run(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess });
            Assert.False(job.Succeeded);
            Assert.Equal(ErrorIds.ImageIOFailed, job.Error!.ErrorId);
            Assert.Equal(1, rule.Hits);
        }
        finally
        {
            FaultInjection.Clear();
        }
        Assert.False(File.Exists(target));
        Assert.False(File.Exists(target + BackupTarget.PartialSuffix));
        Assert.Equal(before, b.Count);
        Assert.False(b.Busy);
    }

    [Fact]
    public void StopPausesOnErrorAndResumeRetries()
    {
        using RawNodeFixture f = NodeWithData();
        string target = Path.Combine(f.Folder, "stop.img");
        FaultInjection.Add(target + BackupTarget.PartialSuffix, FaultOperation.Write, offset: 4 << 20, length: 1, times: 1);
        try
        {
            BackupJob job = BackupJob.Start(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, OnTargetError = JobErrorAction.Stop, Workers = 1 }, RawTargets);
            Assert.True(SpinWait.SpinUntil(() => job.Status == BlockJobStatus.Paused, TimeSpan.FromSeconds(30)));
            Assert.True(job.PausedByError);
            Assert.Equal(ErrorIds.ImageIOFailed, job.LastTransientError!.ErrorId);
            job.Resume();
            Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(60)));
            Assert.True(job.Succeeded, job.Error?.Message);
            Assert.Equal(ReadAll(f.Node), ReadFile(target));
        }
        finally
        {
            FaultInjection.Clear();
        }
    }

    [Fact]
    public void IgnoreRetriesUntilTheCopySucceeds()
    {
        using RawNodeFixture f = NodeWithData();
        string target = Path.Combine(f.Folder, "ignore.img");
        FaultRule rule = FaultInjection.Add(f.Node.Path, FaultOperation.Read, offset: 1 << 20, length: 1, times: 3);
        try
        {
            BackupJob job = Run(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, OnSourceError = JobErrorAction.Ignore });
            Assert.True(job.Succeeded, job.Error?.Message);
            Assert.Equal(3, rule.Hits);
            Assert.Equal(ReadAll(f.Node), ReadFile(target));
        }
        finally
        {
            FaultInjection.Clear();
        }
    }

    [Fact]
    public void CancelKeepsEveryBitAndRemovesTheTarget()
    {
        using RawNodeFixture f = NodeWithData();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[Size]);
        string target = Path.Combine(f.Folder, "cancel.img");
        BackupJob job = BackupJob.Start(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess, BytesPerSecond = 1 << 20 }, RawTargets);
        f.Node.Write(Size - 1, new byte[1]);
        job.Cancel();
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.Equal(ErrorIds.BackupCancelled, job.Error!.ErrorId);
        Assert.Equal(Size, b.Count);
        Assert.False(File.Exists(target) || File.Exists(target + BackupTarget.PartialSuffix));
    }

    [Theory]
    [InlineData(BitmapSyncMode.OnSuccess, true, 1)]      // only the write made during the job
    [InlineData(BitmapSyncMode.OnSuccess, false, 33)]    // nothing lost: 32 old clusters + the new one
    [InlineData(BitmapSyncMode.Never, true, 33)]
    [InlineData(BitmapSyncMode.Never, false, 33)]
    [InlineData(BitmapSyncMode.Always, true, 1)]
    [InlineData(BitmapSyncMode.Always, false, -1)]       // the new write + what was not copied (checked below)
    public void BitmapModesMatrixOnBitmapSync(BitmapSyncMode mode, bool succeed, int expectedClusters)
    {
        using RawNodeFixture f = NodeWithData();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[2 << 20]); // clusters 0..31: two 1 MiB chunks
        string inc = Path.Combine(f.Folder, "inc.img");
        RawImageCopy(f.Node, inc);
        if (!succeed)
            FaultInjection.Add(f.Node.Path, FaultOperation.Read, offset: 20 * 65536, length: 1, times: -1);
        try
        {
            BackupJob job = BackupJob.Start(new BackupRequest
            {
                Source = f.Node, Target = inc, TargetFormat = ImageFormat.Raw, UseExistingTarget = true,
                Sync = BackupSyncMode.Bitmap, BitmapName = "b", BitmapMode = mode, Workers = 1, BytesPerSecond = 4 << 20,
            }, RawTargets);
            f.Node.Write(100 * 65536, new byte[1]); // during the job
            Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(60)));
            Assert.Equal(succeed, job.Succeeded);
        }
        finally
        {
            FaultInjection.Clear();
        }
        HierarchicalBitmap bits = b.Snapshot();
        Assert.True(bits.Get(100));
        if (expectedClusters >= 0)
            Assert.Equal(expectedClusters, bits.Count);
        else
        {
            // Always + failure: the first chunk (clusters 0..15) was copied and is clean; the failed one is back.
            Assert.Equal([(16L, 16L), (100L, 1L)], bits.Runs().ToArray());
        }
    }

    private static void RawImageCopy(BlockNode node, string path)
    {
        BlockEngine.CreateImage(path, node.Size);
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Write);
        fs.Write(ReadAll(node));
    }

    [Fact]
    public void ArgumentsAreCheckedInQemusOrder()
    {
        using RawNodeFixture f = NodeWithData();
        f.Node.AddBitmap("b");
        string t = Path.Combine(f.Folder, "t.img");
        string Id(BackupRequest r) => Assert.Throws<BlockException>(() => BackupJob.Prepare(r, RawTargets)).ErrorId;
        BackupRequest Req(BackupSyncMode sync, string? bitmap = null, BitmapSyncMode? mode = null) => new()
        { Source = f.Node, Target = t, TargetFormat = ImageFormat.Raw, Sync = sync, BitmapName = bitmap, BitmapMode = mode, BackingFile = "prev.qcow2" };

        Assert.Equal(ErrorIds.BitmapRequired, Id(Req(BackupSyncMode.Incremental)));
        Assert.Equal(ErrorIds.BitmapRequired, Id(Req(BackupSyncMode.Bitmap, mode: BitmapSyncMode.Never)));
        Assert.Equal(ErrorIds.BitmapModeInvalid, Id(Req(BackupSyncMode.Incremental, "nope", BitmapSyncMode.Never)));
        Assert.Equal(ErrorIds.BitmapNotFound, Id(Req(BackupSyncMode.Bitmap, "nope", BitmapSyncMode.Never)));
        Assert.Equal(ErrorIds.BitmapModeRequired, Id(Req(BackupSyncMode.Bitmap, "b")));
        Assert.Equal(ErrorIds.BitmapModeRequired, Id(Req(BackupSyncMode.Full, "b")));
        Assert.Equal(ErrorIds.BitmapWithSyncNone, Id(Req(BackupSyncMode.None, "b", BitmapSyncMode.OnSuccess)));
        Assert.Equal(ErrorIds.BitmapModeNeverMeaningless, Id(Req(BackupSyncMode.Full, "b", BitmapSyncMode.Never)));
        Assert.Equal(ErrorIds.BitmapModeNeverMeaningless, Id(Req(BackupSyncMode.Top, "b", BitmapSyncMode.Never)));
        Assert.Equal(ErrorIds.BitmapModeWithoutBitmap, Id(Req(BackupSyncMode.Full, mode: BitmapSyncMode.OnSuccess)));
        Assert.Equal(ErrorIds.SourceIsTarget, Id(Req(BackupSyncMode.Full) with { Target = f.Node.Path }));
        Assert.Equal(ErrorIds.InvalidSpeed, Id(Req(BackupSyncMode.Full) with { BytesPerSecond = -1 }));
        File.WriteAllBytes(t, new byte[512]);
        Assert.Equal(ErrorIds.ImageAlreadyExists, Id(Req(BackupSyncMode.Full)));
        Assert.Equal(ErrorIds.TargetSizeMismatch, Id(Req(BackupSyncMode.Full) with { UseExistingTarget = true }));
        f.Node.GetBitmap("b").Inconsistent = true;
        Assert.Equal(ErrorIds.BitmapInconsistent, Id(Req(BackupSyncMode.Bitmap, "b", BitmapSyncMode.OnSuccess)));
    }

    [Fact]
    public void ABusyBitmapCannotStartASecondBackup()
    {
        using RawNodeFixture f = NodeWithData();
        f.Node.AddBitmap("b");
        BackupJob first = BackupJob.Start(new BackupRequest { Source = f.Node, Target = Path.Combine(f.Folder, "1.img"), TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess, BytesPerSecond = 1 << 20 }, RawTargets);
        BlockException e = Assert.Throws<BlockException>(() => BackupJob.Prepare(new BackupRequest { Source = f.Node, Target = Path.Combine(f.Folder, "2.img"), TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess }, RawTargets));
        Assert.Equal(ErrorIds.BitmapBusy, e.ErrorId);
        first.Cancel();
        Assert.True(first.Completion.Wait(TimeSpan.FromSeconds(30)));
    }

    [Fact]
    public void PendingWaitsForCompleteWhenAutoFinalizeIsOff()
    {
        using RawNodeFixture f = NodeWithData();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[1]);
        string target = Path.Combine(f.Folder, "pending.img");
        BackupJob job = BackupJob.Start(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess, AutoFinalize = false }, RawTargets);
        Assert.True(SpinWait.SpinUntil(() => job.Status == BlockJobStatus.Pending, TimeSpan.FromSeconds(30)));
        Assert.True(b.Busy);         // bitmaps untouched until finalized
        Assert.False(File.Exists(target));
        job.Complete();
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.True(job.Succeeded);
        Assert.Equal(0, b.Count);
        Assert.True(File.Exists(target));
    }

    [Fact]
    public void SyncNoneCopiesOnlyWhatIsOverwritten()
    {
        using RawNodeFixture f = NodeWithData();
        byte[] before = ReadAll(f.Node);
        string target = Path.Combine(f.Folder, "fleece.img");
        BackupJob job = BackupJob.Start(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.None }, RawTargets);
        f.Node.Write(65536 * 5 + 10, new byte[] { 9, 9 });
        job.Complete();
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.True(job.Succeeded, job.Error?.Message);
        byte[] copy = ReadFile(target);
        Assert.Equal(before.AsSpan(65536 * 5, 65536).ToArray(), copy.AsSpan(65536 * 5, 65536).ToArray());
        Assert.Equal(65536, job.BytesDone);
    }
}

/// <summary>Tests that inject faults run one at a time: the rules are process-wide.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class FaultInjectionCollection
{
    public const string Name = "FaultInjection";
}
