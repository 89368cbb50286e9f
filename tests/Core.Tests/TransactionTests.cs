using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Testing;
using BitmapBackup.Core.Tests.TestSupport;
using BitmapBackup.Core.Transactions;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup.Core.Tests;

[Collection(FaultInjectionCollection.Name)]
public sealed class TransactionTests
{
    private static readonly BackupTargetOptions RawTargets = new();

    /// <summary>An action whose prepare fails, like QEMU's 'abort' transaction action.</summary>
    private sealed class FailingAction(BlockNode node) : ITransactionAction
    {
        public string Description => "abort";
        public IEnumerable<BlockNode> Nodes => [node];
        public void Check(TransactionPlan plan) { }
        public void Prepare() => throw new BlockException("Abort", BlockErrorCategory.InvalidOperation, "Transaction aborted using Abort action");
        public void Abort() { }
        public void Commit() { }
    }

    [Fact]
    public void EveryKindOfActionRollsBackWhenALaterOneFails()
    {
        using var f = new RawNodeFixture(1 << 20);
        BlockNode n = f.Node;
        DirtyBitmap clearMe = n.AddBitmap("clear");
        DirtyBitmap disableMe = n.AddBitmap("disable");
        DirtyBitmap enableMe = n.AddBitmap("enable", disabled: true);
        DirtyBitmap mergeInto = n.AddBitmap("merge", disabled: true);
        DirtyBitmap removeMe = n.AddBitmap("remove");
        n.Write(0, new byte[1]);
        mergeInto.MarkDirty(5 * 65536, 1);
        string target = Path.Combine(f.Folder, "t.img");

        var tx = new BitmapTransaction();
        tx.Enqueue(new AddBitmapAction(n, "added", null, false, false));
        tx.Enqueue(new ClearBitmapAction(n, "clear"));
        tx.Enqueue(new SetBitmapRecordingAction(n, "disable", enable: false));
        tx.Enqueue(new SetBitmapRecordingAction(n, "enable", enable: true));
        tx.Enqueue(new MergeBitmapAction(n, "merge", [(n, "clear")]));
        tx.Enqueue(new RemoveBitmapAction(n, "remove"));
        tx.Enqueue(new StartBackupAction(new BackupRequest { Source = n, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "disable", BitmapMode = BitmapSyncMode.OnSuccess }, RawTargets));
        tx.Enqueue(new FailingAction(n));

        Assert.Equal("Abort", Assert.Throws<BlockException>(tx.Apply).ErrorId);

        Assert.Null(n.FindBitmap("added"));
        Assert.Equal(65536, clearMe.Count);
        Assert.True(disableMe.Enabled);
        Assert.False(disableMe.Busy);
        Assert.False(enableMe.Enabled);
        Assert.Equal([(5L * 65536, 65536L)], mergeInto.GetDirtyRanges());
        Assert.Same(removeMe, n.GetBitmap("remove"));
        Assert.Equal(65536, removeMe.Count);
        Assert.False(File.Exists(target) || File.Exists(target + BackupTarget.PartialSuffix));
        n.Write(65536, new byte[1]); // the bitmaps record as before
        Assert.Equal(2 * 65536, removeMe.Count);
    }

    [Fact]
    public void QueueTimeChecksSeeEarlierActions()
    {
        using var f = new RawNodeFixture();
        BlockNode n = f.Node;
        n.AddBitmap("b");
        var tx = new BitmapTransaction();
        tx.Enqueue(new AddBitmapAction(n, "new", null, false, false));
        tx.Enqueue(new ClearBitmapAction(n, "new"));            // exists by then
        tx.Enqueue(new RemoveBitmapAction(n, "b"));
        string Id(ITransactionAction a) => Assert.Throws<BlockException>(() => tx.Enqueue(a)).ErrorId;
        Assert.Equal(ErrorIds.TransactionConflict, Id(new ClearBitmapAction(n, "b")));
        Assert.Equal(ErrorIds.TransactionConflict, Id(new AddBitmapAction(n, "new", null, false, false)));
        Assert.Equal(ErrorIds.BitmapNotFound, Id(new SetBitmapRecordingAction(n, "nope", true)));
        Assert.Equal(ErrorIds.InvalidGranularity, Id(new AddBitmapAction(n, "g", 1000, false, false)));
        tx.Enqueue(new AddBitmapAction(n, "b", null, false, false)); // re-adding a removed name is fine
        Assert.Equal(3 + 1, tx.Actions.Count);
        tx.Apply();
        Assert.Equal(["b", "new"], n.Bitmaps.Select(b => b.Name!).Order().ToArray());
        Assert.Equal(0, n.GetBitmap("b").Count);
    }

    [Fact]
    public void ClearAndFullBackupHappenAtOneInstantDespiteAConcurrentWriter()
    {
        // A writer hammers the node while a transaction clears the bitmap and starts a full backup. Every write
        // must be either in the backup (before the instant) or in the bitmap (after it): never in neither.
        using var f = new RawNodeFixture(4 << 20);
        BlockNode n = f.Node;
        DirtyBitmap b = n.AddBitmap("b", 4096);
        string target = Path.Combine(f.Folder, "full.img");
        using var stop = new CancellationTokenSource();
        var last = new long[1024]; // per 4 KiB cluster: last value written (1-based), 0 = never
        var writer = Task.Run(() =>
        {
            long value = 1;
            var rng = new Random(3);
            while (!stop.IsCancellationRequested)
            {
                int cluster = rng.Next(1024);
                n.Write(cluster * 4096L, BitConverter.GetBytes(value));
                Volatile.Write(ref last[cluster], value++);
            }
        });
        Thread.Sleep(50);
        // The backup is queued first: were the clear to land later than the backup's instant, writes between
        // the two would be neither in the backup nor in the bitmap.
        var tx = new BitmapTransaction();
        var backup = new StartBackupAction(new BackupRequest { Source = n, Target = target, TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full }, RawTargets);
        tx.Enqueue(backup);
        tx.Enqueue(new ClearBitmapAction(n, "b"));
        tx.Apply();
        Thread.Sleep(50);
        stop.Cancel();
        writer.Wait();
        Assert.True(backup.Job!.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.True(backup.Job.Succeeded, backup.Job.Error?.Message);

        byte[] copy = File.ReadAllBytes(target);
        byte[] now = new byte[n.Size];
        n.Read(0, now);
        HierarchicalBitmap dirty = b.Snapshot();
        for (int c = 0; c < 1024; c++)
        {
            bool differs = !copy.AsSpan(c * 4096, 8).SequenceEqual(now.AsSpan(c * 4096, 8));
            if (differs)
                Assert.True(dirty.Get(c), $"cluster {c} changed after the backup's instant but its bit is clear");
        }
    }

    [Fact]
    public void GroupedBackupsCancelEachOtherAndKeepEveryBit()
    {
        using var f = new RawNodeFixture(4 << 20, "a");
        BlockNode a = f.Node;
        BlockNode c = f.OpenAnother("c", 4 << 20);
        DirtyBitmap ba = a.AddBitmap("b");
        DirtyBitmap bc = c.AddBitmap("b");
        a.Write(0, new byte[1 << 20]);
        c.Write(0, new byte[2 << 20]);
        string ta = Path.Combine(f.Folder, "ta.img"), tc = Path.Combine(f.Folder, "tc.img");
        BlockEngine.CreateImage(ta, a.Size);
        BlockEngine.CreateImage(tc, c.Size);
        FaultInjection.Add(c.Path, FaultOperation.Read, offset: 1 << 20, length: 1, times: 1);
        try
        {
            var group = new JobGroup();
            var tx = new BitmapTransaction();
            var ja = new StartBackupAction(new BackupRequest { Source = a, Target = ta, TargetFormat = ImageFormat.Raw, UseExistingTarget = true, Sync = BackupSyncMode.Incremental, BitmapName = "b" }, RawTargets) { Group = group };
            var jc = new StartBackupAction(new BackupRequest { Source = c, Target = tc, TargetFormat = ImageFormat.Raw, UseExistingTarget = true, Sync = BackupSyncMode.Incremental, BitmapName = "b", Workers = 1 }, RawTargets) { Group = group };
            tx.Enqueue(ja);
            tx.Enqueue(jc);
            tx.Apply();
            Assert.True(Task.WaitAll([ja.Job!.Completion, jc.Job!.Completion], TimeSpan.FromSeconds(30)));
            Assert.False(ja.Job.Succeeded);
            Assert.False(jc.Job.Succeeded);
            Assert.Equal(ErrorIds.BackupCancelled, ja.Job.Error!.ErrorId);
            Assert.Equal(ErrorIds.ImageIOFailed, jc.Job.Error!.ErrorId);
        }
        finally
        {
            FaultInjection.Clear();
        }
        Assert.Equal(1 << 20, ba.Count);
        Assert.Equal(2 << 20, bc.Count);
        Assert.False(ba.Busy || bc.Busy);
    }
}
