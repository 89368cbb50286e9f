using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>The create-successor / abdicate / reclaim protocol backups use (QEMU's block/dirty-bitmap.c).</summary>
public sealed class SuccessorProtocolTests
{
    private const int G = 65536;

    private static (RawNodeFixture F, DirtyBitmap B) NodeWithDirtyBitmap(bool disabled = false)
    {
        var f = new RawNodeFixture(1 << 20);
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[1]);           // cluster 0
        f.Node.Write(3 * G, new byte[1]);       // cluster 3
        if (disabled)
            b.Disable();
        return (f, b);
    }

    [Fact]
    public void SuccessorTakesNewWritesAndParentIsBusyButRecording()
    {
        (RawNodeFixture f, DirtyBitmap b) = NodeWithDirtyBitmap();
        using (f)
        {
            DirtyBitmap s;
            using (f.Node.Quiesce())
                s = b.CreateSuccessor();
            f.Node.Write(5 * G, new byte[1]);

            Assert.True(b.Busy);
            Assert.True(b.Recording); // iotest 124 test_incremental_pause: busy and recording
            Assert.False(b.Enabled);
            Assert.Equal(2 * G, b.Count);
            Assert.Equal([(5L * G, (long)G)], s.GetDirtyRanges());
            Assert.Null(s.Name);
            Assert.DoesNotContain(s, f.Node.Bitmaps); // anonymous: not listed
        }
    }

    [Fact]
    public void BusyBitmapRefusesEveryChange()
    {
        (RawNodeFixture f, DirtyBitmap b) = NodeWithDirtyBitmap();
        using (f)
        {
            DirtyBitmap other = f.Node.AddBitmap("o");
            b.CreateSuccessor();
            string Id(Action a) => Assert.Throws<BlockException>(a).ErrorId;
            Assert.Equal(ErrorIds.BitmapBusy, Id(b.Enable));
            Assert.Equal(ErrorIds.BitmapBusy, Id(b.Disable));
            Assert.Equal(ErrorIds.BitmapBusy, Id(() => b.Clear()));
            Assert.Equal(ErrorIds.BitmapBusy, Id(() => b.MergeFrom([other])));
            Assert.Equal(ErrorIds.BitmapBusy, Id(() => other.MergeFrom([b])));
            Assert.Equal(ErrorIds.BitmapBusy, Id(() => b.CreateSuccessor()));
            Assert.Equal(ErrorIds.BitmapBusy, Id(() => f.Node.RemoveBitmap(b)));
            Assert.Equal(ErrorIds.NodeBusy, Id(() => f.Node.Resize(2 << 20)));
            Assert.Equal(ErrorIds.BitmapAlreadyExists, Id(() => f.Node.AddBitmap("b")));
            Assert.Equal(2 * G, b.Count); // reads still work
        }
    }

    [Fact]
    public void AbdicateKeepsOnlyTheWritesSinceTheSuccessorWasCreated()
    {
        (RawNodeFixture f, DirtyBitmap b) = NodeWithDirtyBitmap();
        using (f)
        {
            b.CreateSuccessor();
            f.Node.Write(5 * G, new byte[1]);
            f.Node.Write(3 * G, new byte[1]); // rewritten during the backup: must stay dirty
            b.Abdicate();
            f.Node.Write(7 * G, new byte[1]); // after: recorded by the same object again

            Assert.False(b.Busy);
            Assert.True(b.Enabled);
            Assert.Null(b.Successor);
            Assert.Equal([(3L * G, (long)G), (5L * G, (long)G), (7L * G, (long)G)], b.GetDirtyRanges());
            Assert.Single(f.Node.Bitmaps);
        }
    }

    [Fact]
    public void ReclaimMergesBackSoNoBitIsLost()
    {
        (RawNodeFixture f, DirtyBitmap b) = NodeWithDirtyBitmap();
        using (f)
        {
            b.CreateSuccessor();
            f.Node.Write(5 * G, new byte[1]);
            b.Reclaim();
            f.Node.Write(9 * G, new byte[1]);

            Assert.False(b.Busy);
            Assert.Equal([(0L, (long)G), (3L * G, (long)G), (5L * G, (long)G), (9L * G, (long)G)], b.GetDirtyRanges());
        }
    }

    [Fact]
    public void ADisabledBitmapKeepsItsStateThroughSuccession()
    {
        (RawNodeFixture f, DirtyBitmap b) = NodeWithDirtyBitmap(disabled: true);
        using (f)
        {
            DirtyBitmap s = b.CreateSuccessor();
            f.Node.Write(5 * G, new byte[1]);
            Assert.False(b.Recording);
            Assert.Equal(0, s.Count);
            b.Reclaim();
            Assert.False(b.Enabled);
            Assert.Equal(2 * G, b.Count);

            b.CreateSuccessor();
            b.Abdicate();
            Assert.False(b.Enabled);
            Assert.Equal(0, b.Count); // a backup from a disabled bitmap leaves it empty (QEMU reference run)
        }
    }

    [Fact]
    public async Task ConcurrentWritersNeverLoseABitAcrossSuccession()
    {
        // Writers hammer distinct clusters while the bitmap is frozen and reclaimed or abdicated over and over.
        // Every write must end up in the bitmap or (after abdicate) must have been in the frozen parent.
        using var f = new RawNodeFixture(16 << 20);
        DirtyBitmap b = f.Node.AddBitmap("b", 4096);
        long clusters = (16 << 20) / 4096;
        var written = new System.Collections.Concurrent.ConcurrentBag<long>();
        var abdicatedAway = new HashSet<long>();
        using var stop = new CancellationTokenSource();
        var writers = Enumerable.Range(0, 2).Select(w => Task.Run(() =>
        {
            var rng = new Random(w);
            byte[] one = [1];
            while (!stop.IsCancellationRequested)
            {
                long c = rng.NextInt64(clusters);
                f.Node.Write(c * 4096, one);
                written.Add(c);
            }
        }, TestContext.Current.CancellationToken)).ToArray();

        for (int round = 0; round < 200; round++)
        {
            using (f.Node.Quiesce())
                b.CreateSuccessor();
            if (round % 2 == 0)
            {
                b.Reclaim();
            }
            else
            {
                HierarchicalBitmap frozen = b.Snapshot(); // what the "backup" copied
                foreach ((long s, long n) in frozen.Runs())
                    for (long i = s; i < s + n; i++)
                        abdicatedAway.Add(i);
                b.Abdicate();
            }
        }
        stop.Cancel();
        await Task.WhenAll(writers);

        HierarchicalBitmap final = b.Snapshot();
        foreach (long c in written.Distinct())
            Assert.True(final.Get(c) || abdicatedAway.Contains(c), $"cluster {c} was written but its bit is lost");
    }
}
