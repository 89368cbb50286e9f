using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Testing;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Crash-safe bitmaps and their write-intent log (issue 21): what a crash (SimulateCrash: files closed as they are,
/// nothing stored) leaves, the clean close, the refusals, logs that must not be trusted, the group commit, and a log
/// that fails. The crash points of a whole session are IntentCrashPointTests; real kill -9 is in Pester.
/// </summary>
public sealed class IntentLogTests
{
    private const long MiB = 1 << 20;

    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    private static string NewImage(TempDirectory dir, string format, long size = 64 * MiB)
    {
        string path = dir.File(format == "qcow2" ? "d.qcow2" : "d.img");
        BlockEngine.CreateImage(path, size, format == "qcow2" ? ImageFormat.Qcow2 : ImageFormat.Raw);
        return path;
    }

    private static BlockNode OpenNode(string path, bool readOnly = false)
    {
        BlockNode node = new BlockEngine().Open(path, "n", readOnly);
        node.CheckpointWindow = Timeout.InfiniteTimeSpan; // checkpoints only where a test takes them
        return node;
    }

    /// <summary>Every byte range is inside a dirty range of the bitmap.</summary>
    private static void AssertCovers(DirtyBitmap bitmap, IEnumerable<(long Offset, long Length)> writes)
    {
        IReadOnlyList<(long Offset, long Length)> ranges = bitmap.GetDirtyRanges();
        foreach ((long offset, long length) in writes)
        {
            for (long pos = offset; pos < offset + length; pos += 512)
                Assert.True(ranges.Any(r => r.Offset <= pos && pos < r.Offset + r.Length), $"{bitmap} does not cover the write at {offset}+{length} (byte {pos})");
        }
    }

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public void ACrashLeavesCrashSafeBitmapsConsistentAndCoveringEveryWrite_TheDisabledOneUnchanged_APlainOneInconsistent(string format)
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, format);
        BlockNode node = OpenNode(path);
        DirtyBitmap a = node.AddBitmap("a", 65536, persistent: true, crashSafe: true);
        DirtyBitmap fine = node.AddBitmap("fine", 4096, persistent: true, crashSafe: true);
        DirtyBitmap off = node.AddBitmap("off", 65536, persistent: true, crashSafe: true);
        node.AddBitmap("plain", persistent: true);
        node.Write(40 * MiB, new byte[100]);
        off.Disable();
        var offRanges = off.GetDirtyRanges();
        var writes = new List<(long, long)> { (40 * MiB, 100) };
        var rng = new Random(7);
        for (int i = 0; i < 60; i++)
        {
            long offset = rng.NextInt64(64 * MiB - 70000) / 512 * 512;
            int length = rng.Next(1, 70000);
            node.Write(offset, new byte[length]);
            writes.Add((offset, length));
            if (i == 30)
                node.Checkpoint(); // half the writes are in a checkpoint, half only in the intent
        }
        var aBefore = a.GetDirtyRanges();
        node.SimulateCrash();

        BlockNode again = OpenNode(path);
        try
        {
            foreach (string name in new[] { "a", "fine" })
            {
                DirtyBitmap b = again.GetBitmap(name);
                Assert.False(b.Inconsistent);
                Assert.True(b.Recovered);
                Assert.True(b.CrashSafe);
                Assert.True(b.Recording);
                AssertCovers(b, writes);
            }
            AssertCovers(again.GetBitmap("a"), aBefore); // a superset of the bits it had
            DirtyBitmap offAgain = again.GetBitmap("off");
            Assert.False(offAgain.Inconsistent);
            Assert.False(offAgain.Recording);
            Assert.Equal(offRanges, offAgain.GetDirtyRanges());
            Assert.True(again.GetBitmap("plain").Inconsistent);
            Assert.False(again.GetBitmap("plain").CrashSafe);
        }
        finally
        {
            again.Dispose();
        }
    }

    [Fact]
    public void ACleanCloseLeavesTheLogEmptyAndTheBitmapsCrashSafe_NotRecovered()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockNode node = OpenNode(path);
        node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(3 * MiB, new byte[5000]);
        Assert.True(node.IntentStatistics.MarkedRegions > 0);
        node.Dispose();

        IntentLogContents log = IntentLogReader.Read(path + WriteIntentLog.Suffix, IO.FileIdentity.Of(path), 64 * MiB, readOnly: true, forceShare: false)!;
        Assert.Null(log.Problem);
        Assert.True(log.Checkpoint!.Clean);
        Assert.Equal(0, log.Intent!.Count);
        Assert.Null(log.Checkpoint.Find("a")!.Bits);

        BlockNode again = OpenNode(path);
        DirtyBitmap a = again.GetBitmap("a");
        Assert.True(a.CrashSafe);
        Assert.False(a.Recovered);
        Assert.Equal([(3 * MiB, 65536L)], a.GetDirtyRanges());
        again.RemoveBitmap(a);
        Assert.False(File.Exists(path + WriteIntentLog.Suffix)); // no crash-safe bitmap left: no log
        again.Dispose();
    }

    [Fact]
    public void RefusalsChangeNothing_WithoutPersistent_OnAReadOnlyNode_WhereTheLogCannotBeWritten()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "qcow2");
        BlockNode node = OpenNode(path);
        Assert.Equal(ErrorIds.CrashSafeRequiresPersistent, ErrorId(() => node.AddBitmap("a", crashSafe: true)));
        FaultRule rule = FaultInjection.Add(Path.GetFileName(path) + WriteIntentLog.Suffix + ".tmp", FaultOperation.FileWrite, times: -1, message: "No space left on device (injected)");
        try
        {
            BlockException e = Assert.Throws<BlockException>(() => node.AddBitmap("a", persistent: true, crashSafe: true));
            Assert.Equal(ErrorIds.IntentLogUnavailable, e.ErrorId);
            Assert.Contains("No space left", e.Message);
        }
        finally
        {
            FaultInjection.Remove(rule);
        }
        Assert.Empty(node.Bitmaps);
        Assert.Empty(Directory.GetFiles(dir.Path, "*.intent*"));
        node.Dispose();
        Assert.Empty(Qcow2BitmapNodes.Load(path)); // nothing stored in the image either

        BlockNode ro = OpenNode(path, readOnly: true);
        Assert.Equal(ErrorIds.CrashSafeNodeReadOnly, ErrorId(() => ro.AddBitmap("a", persistent: true, crashSafe: true)));
        ro.Dispose();
    }

    [Fact]
    public void ALogCopiedBesideAnotherImageIsIgnored_TheBitmapLoadsInconsistentWithAWarning()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockNode node = OpenNode(path);
        node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(0, new byte[4096]);
        node.SimulateCrash();
        // Another image file takes the name (same size, same sidecar): the log does not belong to it.
        string log = path + WriteIntentLog.Suffix;
        string sidecar = path + RawBitmapSidecar.Suffix;
        File.Move(path, dir.File("old.img"));
        BlockEngine.CreateImage(path, 64 * MiB);
        EngineWarnings.TakePending();
        BlockNode other = OpenNode(path);
        DirtyBitmap a = other.GetBitmap("a");
        Assert.True(a.Inconsistent);
        Assert.False(a.Recovered);
        Assert.Contains(EngineWarnings.TakePending(), w => w.Contains("belongs to another image file") && w.Contains("'a'"));
        other.Dispose();
        Assert.True(File.Exists(sidecar));
        _ = log;
    }

    [Fact]
    public void ATornIntentBlockMakesTheLogUntrusted_ATornSlotFallsBackToTheOtherOne_ALostCheckpointIsRefused()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        string logPath = path + WriteIntentLog.Suffix;
        BlockNode node = OpenNode(path);
        node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(5 * MiB, new byte[4096]);
        byte[] beforeCheckpoint = File.ReadAllBytes(logPath);
        var slotWrites = new List<(long Offset, byte[] Data)>();
        node.IntentLog!.Observer = (offset, data) =>
        {
            if (data is not null)
                slotWrites.Add((offset, data));
        };
        node.Checkpoint(); // generation 2, in slot B
        node.Write(9 * MiB, new byte[4096]);
        node.SimulateCrash();
        byte[] good = File.ReadAllBytes(logPath);
        IntentLogLayout layout = IntentLogFormat.DecodeHeader(good, good.Length, out _)!;

        using (BlockNode reopened = OpenReadOnly(path))
            AssertCovers(reopened.GetBitmap("a"), [(5 * MiB, 4096), (9 * MiB, 4096)]);

        // A torn intent block (a bit of it new, the rest old): the log cannot be trusted, the bitmap is inconsistent.
        byte[] torn = (byte[])good.Clone();
        torn[layout.BlockOffset(0) + 2048] ^= 0x40;
        File.WriteAllBytes(logPath, torn);
        using (BlockNode reopened = OpenReadOnly(path))
            Assert.True(reopened.GetBitmap("a").Inconsistent);

        // The crash tore the checkpoint being written (half of it reached the disk): the older one wins, and the intent
        // (not shrunk yet: that comes after the slot is durable) still covers what was written after it.
        (long slotOffset, byte[] slot) = slotWrites.First(w => w.Offset == layout.SlotOffset(1));
        byte[] halfWritten = (byte[])beforeCheckpoint.Clone();
        Array.Copy(slot, 0, halfWritten, slotOffset, slot.Length / 2);
        File.WriteAllBytes(logPath, halfWritten);
        using (BlockNode reopened = OpenReadOnly(path))
        {
            DirtyBitmap a = reopened.GetBitmap("a");
            Assert.False(a.Inconsistent);
            AssertCovers(a, [(5 * MiB, 4096)]);
        }

        // A checkpoint the disk acknowledged and then lost (damaged later): the blocks written after it are newer than
        // every valid checkpoint, so the log is refused rather than trusted with a hole.
        byte[] lost = (byte[])good.Clone();
        lost[layout.SlotOffset(1) + 60] ^= 1;
        File.WriteAllBytes(logPath, lost);
        EngineWarnings.TakePending();
        using (BlockNode reopened = OpenReadOnly(path))
            Assert.True(reopened.GetBitmap("a").Inconsistent);
        Assert.Contains(EngineWarnings.TakePending(), w => w.Contains("newer than every valid checkpoint"));
    }

    private static BlockNode OpenReadOnly(string path) => new BlockEngine().Open(path, "r", readOnly: true);

    [Fact]
    public void CheckpointsShrinkTheIntent_AnIdleLogEmptiesWithinTwo()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockNode node = OpenNode(path);
        node.IntentRegionSize = 1 * MiB;
        node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(10 * MiB, new byte[4096]);
        node.Write(30 * MiB, new byte[4096]);
        Assert.Equal(2, node.IntentStatistics.MarkedRegions);
        node.Checkpoint(); // written in the window that ended: kept one more window
        Assert.Equal(2, node.IntentStatistics.MarkedRegions);
        node.Write(30 * MiB, new byte[4096]); // hot: stays marked, no new miss
        long misses = node.IntentStatistics.Misses;
        node.Checkpoint();
        Assert.Equal(1, node.IntentStatistics.MarkedRegions);
        Assert.Equal(misses, node.IntentStatistics.Misses);
        node.Checkpoint();
        Assert.Equal(0, node.IntentStatistics.MarkedRegions);
        node.SimulateCrash();
        IntentLogContents log = IntentLogReader.Read(path + WriteIntentLog.Suffix, IO.FileIdentity.Of(path), 64 * MiB, true, false)!;
        Assert.Equal(0, log.Intent!.Count);
        Assert.Equal([(10 * MiB, 65536L), (30 * MiB, 65536L)], log.Checkpoint!.Find("a")!.Bits!.Runs().Select(r => (r.Start * 65536, r.Count * 65536)).ToArray());
    }

    [Fact]
    public void ConcurrentMissesShareOneFlush()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockNode node = OpenNode(path);
        node.AddBitmap("a", persistent: true, crashSafe: true);
        WriteIntentLog log = node.IntentLog!;
        const int writers = 6;
        using var release = new ManualResetEventSlim();
        int blockWrites = 0;
        log.Observer = (offset, data) =>
        {
            // Hold the first flush until every other writer waits for a flush: they must then share the next one.
            if (data is not null && offset >= log.Layout.IntentOffset && offset < log.Layout.SlotOffset(0) && Interlocked.Increment(ref blockWrites) == 1)
                release.Wait(TimeSpan.FromSeconds(30));
        };
        long syncsBefore = log.Syncs;
        Task[] tasks = Enumerable.Range(0, writers).Select(i => Task.Run(() => node.Write(i * 8 * MiB, new byte[512]))).ToArray();
        SpinWait.SpinUntil(() => log.Misses == writers, TimeSpan.FromSeconds(30));
        release.Set();
        Task.WaitAll(tasks);
        Assert.Equal(writers, log.Misses);
        Assert.Equal(2, log.Syncs - syncsBefore); // the held flush, and one for all the others
        node.Dispose();
    }

    [Fact]
    public void ALogThatCannotBeWrittenIsRemoved_TheWriteGoesOn_ACrashThenLoadsInconsistent()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockNode node = OpenNode(path);
        node.AddBitmap("a", persistent: true, crashSafe: true);
        EngineWarnings.TakePending();
        FaultRule rule = FaultInjection.Add(Path.GetFileName(path) + WriteIntentLog.Suffix, FaultOperation.FileWrite, times: -1);
        try
        {
            node.Write(2 * MiB, new byte[4096]);
        }
        finally
        {
            FaultInjection.Remove(rule);
        }
        Assert.False(node.HasIntentLog);
        Assert.False(File.Exists(path + WriteIntentLog.Suffix));
        Assert.Contains(EngineWarnings.TakePending(), w => w.Contains("could not be written") && w.Contains("removed"));
        Assert.True(node.GetBitmap("a").IsDirty(2 * MiB));
        node.SimulateCrash();
        using BlockNode again = OpenReadOnly(path);
        Assert.True(again.GetBitmap("a").Inconsistent);
    }

    [Fact]
    public void StateChangesAreCheckpointedBeforeTheyReturn_EnableMergeClearTransaction()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockNode node = OpenNode(path);
        DirtyBitmap a = node.AddBitmap("a", persistent: true, crashSafe: true, disabled: true);
        DirtyBitmap src = node.AddBitmap("src");
        DirtyBitmap c = node.AddBitmap("c", persistent: true, crashSafe: true);
        node.Write(1 * MiB, new byte[10]); // only src and c record it
        a.MergeFrom([src]);
        a.Enable();
        node.Write(20 * MiB, new byte[10]);
        c.Clear();
        node.Write(30 * MiB, new byte[10]);
        var tx = new Transactions.BitmapTransaction();
        tx.Enqueue(new Transactions.Actions.SetBitmapRecordingAction(node, "c", enable: false));
        tx.Apply();
        node.Write(40 * MiB, new byte[10]); // c no longer records it
        node.SimulateCrash();

        using BlockNode again = OpenReadOnly(path);
        DirtyBitmap a2 = again.GetBitmap("a");
        Assert.True(a2.Recording);
        AssertCovers(a2, [(1 * MiB, 10), (20 * MiB, 10), (30 * MiB, 10), (40 * MiB, 10)]);
        DirtyBitmap c2 = again.GetBitmap("c");
        Assert.False(c2.Recording);
        Assert.Equal([(30 * MiB, 65536L)], c2.GetDirtyRanges()); // cleared, then 30 MiB, then disabled: exactly that, no intent
    }

    [Fact]
    public void ACrashDuringABackupComesBackAsAFailedOne_TheBitmapKeepsItsBitsAndTheWritesSince()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw");
        BlockEngine engine = new();
        BlockNode node = engine.Open(path, "n");
        node.CheckpointWindow = Timeout.InfiniteTimeSpan;
        DirtyBitmap a = node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(3 * MiB, new byte[4096]);
        Jobs.BackupJob job = Jobs.BackupJob.Start(new Jobs.BackupRequest
        {
            Source = node, Target = dir.File("full.qcow2"), TargetFormat = ImageFormat.Qcow2, Sync = Jobs.BackupSyncMode.Full,
            BitmapName = "a", BitmapMode = Jobs.BitmapSyncMode.OnSuccess, AutoFinalize = false,
        });
        SpinWait.SpinUntil(() => job.Status == Jobs.BlockJobStatus.Pending, TimeSpan.FromSeconds(30));
        Assert.True(a.Busy);
        node.Write(50 * MiB, new byte[4096]); // recorded by the successor
        node.Checkpoint();
        node.Checkpoint(); // idle for a window: the intent is empty, the checkpoint alone says what the bitmap holds
        Assert.Equal(0, node.IntentStatistics.MarkedRegions);
        node.SimulateCrash();

        using BlockNode again = OpenReadOnly(path);
        DirtyBitmap a2 = again.GetBitmap("a");
        Assert.False(a2.Busy);
        Assert.False(a2.Inconsistent);
        Assert.Equal([(3 * MiB, 65536L), (50 * MiB, 65536L)], a2.GetDirtyRanges());
    }

    [Fact]
    public void AResizeWritesANewLogForTheNewSize()
    {
        using var dir = new TempDirectory();
        string path = NewImage(dir, "raw", 8 * MiB);
        BlockNode node = OpenNode(path);
        DirtyBitmap a = node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(1 * MiB, new byte[10]);
        node.Resize(40 * MiB);
        node.Write(39 * MiB, new byte[10]);
        node.SimulateCrash();
        using BlockNode again = OpenReadOnly(path);
        DirtyBitmap a2 = again.GetBitmap("a");
        Assert.False(a2.Inconsistent);
        AssertCovers(a2, [(1 * MiB, 10), (8 * MiB, 32 * MiB)]);
    }

    [Fact]
    public void AnImageQemuLeftInUseAfterOurCleanCloseLoadsInconsistent_ItsWritesAreInNoLog()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = NewImage(dir, "qcow2");
        BlockNode node = OpenNode(path);
        node.AddBitmap("a", persistent: true, crashSafe: true);
        node.Write(0, new byte[10]);
        node.Dispose();
        // QEMU opens the image, marks the bitmap in use, writes and crashes (qemu-io's abort): our log says "closed cleanly".
        QemuImg.Io("-f", "qcow2", "-c", "write -P 7 8M 4k", "-c", "abort", path);
        Assert.Contains(Qcow2BitmapNodes.Load(path), b => b.Name == "a" && b.InUse);
        EngineWarnings.TakePending();
        using BlockNode again = OpenReadOnly(path);
        Assert.True(again.GetBitmap("a").Inconsistent);
        Assert.Contains(EngineWarnings.TakePending(), w => w.Contains("closed cleanly since"));
    }
}
