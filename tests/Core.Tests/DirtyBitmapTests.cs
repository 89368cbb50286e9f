using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

public sealed class DirtyBitmapTests
{
    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    [Fact]
    public void WritesMarkEveryRecordingBitmapAtItsGranularity()
    {
        using var f = new RawNodeFixture(1 << 20);
        DirtyBitmap coarse = f.Node.AddBitmap("coarse");
        DirtyBitmap fine = f.Node.AddBitmap("fine", 4096);
        DirtyBitmap off = f.Node.AddBitmap("off", disabled: true);

        f.Node.Write(65536 - 1, new byte[2]); // straddles the first 64 KiB boundary

        Assert.Equal(65536, coarse.Granularity);
        Assert.Equal(2 * 65536, coarse.Count);
        Assert.Equal([(0L, 131072L)], coarse.GetDirtyRanges());
        Assert.Equal([(61440L, 8192L)], fine.GetDirtyRanges());
        Assert.Equal(0, off.Count);
        Assert.False(off.Recording);
    }

    [Fact]
    public void WriteZeroesIsAWriteForBitmaps()
    {
        using var f = new RawNodeFixture(1 << 20);
        DirtyBitmap b = f.Node.AddBitmap("b", 4096);
        f.Node.WriteZeroes(8192, 4096 * 3);
        Assert.Equal([(8192L, 12288L)], b.GetDirtyRanges());
    }

    [Fact]
    public void LastRangeIsClippedToTheNodeSize()
    {
        using var f = new RawNodeFixture(65536 + 512);
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(65536, new byte[512]);
        Assert.Equal(65536, b.Count); // QEMU reports dirty bits times granularity, past the end too
        Assert.Equal([(65536L, 512L)], b.GetDirtyRanges());
    }

    [Theory]
    [InlineData(0L)]
    [InlineData(256L)]
    [InlineData(1000L)]
    [InlineData(1L << 32)]
    [InlineData(-512L)]
    public void GranularityMustBeAPowerOfTwoFrom512BytesTo2GiB(long granularity)
    {
        using var f = new RawNodeFixture();
        Assert.Equal(ErrorIds.InvalidGranularity, ErrorId(() => f.Node.AddBitmap("g", granularity)));
    }

    [Theory]
    [InlineData(512L)]
    [InlineData(1L << 31)]
    public void GranularityLimitsAreInclusive(long granularity)
    {
        using var f = new RawNodeFixture();
        Assert.Equal(granularity, f.Node.AddBitmap("g", granularity).Granularity);
    }

    [Theory]
    [InlineData(0, 65536L)]
    [InlineData(512, 4096L)]
    [InlineData(4096, 4096L)]
    [InlineData(65536, 65536L)]
    [InlineData(2 << 20, 65536L)]
    public void DefaultGranularityIsTheClusterSizeClampedTo4To64KiB(int clusterSize, long expected)
        => Assert.Equal(expected, DirtyBitmapLimits.DefaultGranularity(clusterSize));

    [Fact]
    public void NamesAreCheckedInUtf8Bytes()
    {
        using var f = new RawNodeFixture();
        Assert.Equal(ErrorIds.BitmapNameEmpty, ErrorId(() => f.Node.AddBitmap("")));
        f.Node.AddBitmap(new string('a', 1023));
        Assert.Equal(ErrorIds.BitmapNameTooLong, ErrorId(() => f.Node.AddBitmap(new string('a', 1024))));
        Assert.Equal(ErrorIds.BitmapNameTooLong, ErrorId(() => f.Node.AddBitmap(new string('é', 512)))); // 1024 bytes
        f.Node.AddBitmap(new string('é', 511));
        f.Node.AddBitmap("x");
        Assert.Equal(ErrorIds.BitmapAlreadyExists, ErrorId(() => f.Node.AddBitmap("x")));
        f.Node.AddBitmap("X"); // names are case-sensitive, as in QEMU
    }

    [Fact]
    public void EnableAndDisableAreIdempotentAndControlRecording()
    {
        using var f = new RawNodeFixture();
        DirtyBitmap b = f.Node.AddBitmap("b");
        b.Disable();
        b.Disable();
        f.Node.Write(0, new byte[1]);
        Assert.Equal(0, b.Count);
        b.Enable();
        b.Enable();
        f.Node.Write(0, new byte[1]);
        Assert.Equal(65536, b.Count);
    }

    [Fact]
    public void ClearReturnsTheOldBitsForRollback()
    {
        using var f = new RawNodeFixture();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[70000]);
        HierarchicalBitmap old = b.Clear();
        Assert.Equal(0, b.Count);
        Assert.Equal(2, old.Count);
        b.Restore(old);
        Assert.Equal(2 * 65536, b.Count);
    }

    [Fact]
    public void MergeUnitesSourcesOfOtherNodesAndGranularities()
    {
        using var f = new RawNodeFixture(1 << 20);
        var other = f.OpenAnother("n1", 1 << 20);
        DirtyBitmap target = f.Node.AddBitmap("t", 65536);
        DirtyBitmap fine = other.AddBitmap("fine", 4096);
        DirtyBitmap coarse = f.Node.AddBitmap("coarse", 1 << 19, disabled: true);
        other.Write(4096 * 20, new byte[1]);   // 64 KiB cluster 1
        coarse.MarkDirty(1 << 19, 1);          // bytes 512 KiB..1 MiB: clusters 8..15

        HierarchicalBitmap before = target.MergeFrom([fine, coarse]);

        Assert.Equal(0, before.Count);
        Assert.Equal([(65536L, 65536L), (524288L, 524288L)], target.GetDirtyRanges());
        Assert.Equal(4096, fine.Count); // sources unchanged
    }

    [Fact]
    public void MergeRefusesDifferentSizesAndLeavesTheTargetUnchanged()
    {
        using var f = new RawNodeFixture(1 << 20);
        var small = f.OpenAnother("small", 1 << 19);
        DirtyBitmap target = f.Node.AddBitmap("t");
        DirtyBitmap same = f.Node.AddBitmap("same", disabled: true);
        DirtyBitmap other = small.AddBitmap("o");
        same.MarkDirty(0, 1);
        small.Write(0, new byte[1]);

        BlockException e = Assert.Throws<BlockException>(() => target.MergeFrom([same, other]));

        Assert.Equal(ErrorIds.BitmapSizeMismatch, e.ErrorId);
        Assert.Contains("small", e.Message);
        Assert.Equal(0, target.Count);
        Assert.Equal(ErrorIds.MergeSourceMissing, ErrorId(() => target.MergeFrom([])));
    }

    [Fact]
    public void ResizeGrowsBitmapsAndMarksTheNewRange()
    {
        using var f = new RawNodeFixture(1 << 20);
        DirtyBitmap b = f.Node.AddBitmap("b");
        DirtyBitmap off = f.Node.AddBitmap("off", disabled: true);
        f.Node.Resize(2 << 20);
        Assert.Equal(32, b.Length);
        Assert.Equal([(1L << 20, 1L << 20)], b.GetDirtyRanges()); // the last backup has nothing of the new megabyte
        Assert.Equal(0, off.Count); // a disabled bitmap records nothing, growth included
        f.Node.Resize(1 << 20);
        Assert.Equal(0, b.Count); // the bits past the new end are gone with it...
        f.Node.Resize(3 << 20);
        Assert.Equal([(1L << 20, 2L << 20)], b.GetDirtyRanges()); // ...and a grow marks again whatever was cut before
    }

    [Fact]
    public void FailedWriteIsMarkedDirty()
    {
        using var f = new RawNodeFixture(1 << 20);
        DirtyBitmap b = f.Node.AddBitmap("b");
        Testing.FaultInjection.Add(f.Node.Path, Testing.FaultOperation.FileWrite, times: -1);
        try
        {
            Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => f.Node.Write(200000, new byte[70000])));
        }
        finally
        {
            Testing.FaultInjection.Clear();
        }
        Assert.Equal([(196608L, 131072L)], b.GetDirtyRanges()); // QEMU's rule: the whole range, whatever landed
        Assert.Equal(ErrorIds.OffsetOutOfRange, ErrorId(() => f.Node.Write(1 << 20, new byte[1])));
        Assert.Equal([(196608L, 131072L)], b.GetDirtyRanges()); // refused before the driver: nothing marked
    }

    [Fact]
    public void RemovedBitmapCanBeRestored()
    {
        using var f = new RawNodeFixture();
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, new byte[1]);
        f.Node.RemoveBitmap(b);
        Assert.Null(f.Node.FindBitmap("b"));
        f.Node.Write(65536, new byte[1]);
        f.Node.RestoreBitmap(b);
        Assert.Same(b, f.Node.GetBitmap("b"));
        Assert.Equal([(0L, 65536L)], b.GetDirtyRanges());
        Assert.Equal(ErrorIds.BitmapNotFound, ErrorId(() => f.Node.GetBitmap("nope")));
    }

    [Fact]
    public void InconsistentBitmapsAllowOnlyRemoval()
    {
        using var f = new RawNodeFixture();
        DirtyBitmap b = f.Node.AddBitmap("b");
        DirtyBitmap source = f.Node.AddBitmap("s");
        b.Inconsistent = true;
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(b.Enable));
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(b.Disable));
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(() => b.Clear()));
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(() => b.MergeFrom([source])));
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(() => source.MergeFrom([b])));
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(() => b.CreateSuccessor()));
        f.Node.RemoveBitmap(b);
        Assert.Null(f.Node.FindBitmap("b"));
    }

    [Fact]
    public void ReadOnlyBitmapsAllowOnlyEnableAndDisable()
    {
        using var f = new RawNodeFixture();
        DirtyBitmap b = f.Node.AddBitmap("b");
        DirtyBitmap other = f.Node.AddBitmap("o");
        b.ReadOnly = true;
        b.Disable();
        b.Enable();
        other.MergeFrom([b]); // a read-only bitmap may be a merge source
        Assert.Equal(ErrorIds.BitmapReadOnly, ErrorId(() => b.Clear()));
        Assert.Equal(ErrorIds.BitmapReadOnly, ErrorId(() => b.MergeFrom([other])));
        Assert.Equal(ErrorIds.BitmapReadOnly, ErrorId(() => f.Node.RemoveBitmap(b)));
    }
}
