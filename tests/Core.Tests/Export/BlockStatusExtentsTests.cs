using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Export;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests.Export;

/// <summary>
/// Block-status extents: the allocation mapping and merging, the REQ_ONE limit, and the dirty-bitmap runs of any
/// window checked against a shadow model (a plain bool per granule) for random bitmaps and random windows, at
/// granule and word boundaries.
/// </summary>
public sealed class BlockStatusExtentsTests
{
    [Fact]
    public void Allocation_DataIsZeroFlags_HolesAndZerosAreHoleZero_NeighboursMerge()
    {
        AllocationExtent[] map =
        [
            new(0, 4096, AllocationState.Data), new(4096, 4096, AllocationState.Data), new(8192, 100, AllocationState.Zero),
            new(8292, 50, AllocationState.Unallocated), new(8342, 10, AllocationState.Data),
        ];
        Assert.Equal([new NbdExtent(8192, 0), new NbdExtent(150, 3), new NbdExtent(10, 0)], BlockStatusExtents.FromAllocation(map, 100));
        Assert.Equal([new NbdExtent(8192, 0)], BlockStatusExtents.FromAllocation(map, 1));
        Assert.Equal([new NbdExtent(8192, 0), new NbdExtent(150, 3)], BlockStatusExtents.FromAllocation(map, 2));
    }

    [Fact]
    public void Allocation_StopsEnumeratingOnceItHasEnough()
    {
        int produced = 0;
        IEnumerable<AllocationExtent> Lazy()
        {
            for (long i = 0; ; i++)
            {
                produced++;
                yield return new AllocationExtent(i * 512, 512, i % 2 == 0 ? AllocationState.Data : AllocationState.Zero);
            }
        }
        Assert.Single(BlockStatusExtents.FromAllocation(Lazy(), 1));
        Assert.Equal(2, produced);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void BitmapRuns_MatchAShadowModel_ForAnyWindow(int seed)
    {
        const long granularity = 65536;
        const long size = (200 * granularity) - 4096; // the last granule is partial
        using var f = new RawNodeFixture(size);
        DirtyBitmap bitmap = f.Node.AddBitmap("b", granularity);
        var random = new Random(seed);
        bool[] shadow = new bool[200];
        for (int i = 0; i < 60; i++)
        {
            int first = random.Next(200);
            int count = random.Next(1, seed == 3 ? 80 : 4);
            for (int g = first; g < Math.Min(200, first + count); g++)
                shadow[g] = true;
            bitmap.MarkDirty(first * granularity, Math.Min(count * granularity, size - (first * granularity)));
        }
        for (int i = 0; i < 300; i++)
        {
            long offset = i < 4 ? new[] { 0L, 1, granularity - 1, size - 1 }[i] : random.NextInt64(size);
            long length = Math.Max(1, Math.Min(random.NextInt64(1, 40 * granularity), size - offset));
            int max = random.Next(1, 5) == 1 ? 1 : int.MaxValue;
            List<(long Length, bool Dirty)> runs = bitmap.GetExtents(offset, length, max);

            Assert.NotEmpty(runs);
            Assert.True(runs.Count <= max);
            long position = offset;
            for (int r = 0; r < runs.Count; r++)
            {
                (long runLength, bool dirty) = runs[r];
                Assert.True(runLength > 0);
                for (long p = position; p < position + runLength; p += Math.Max(1, Math.Min(4096, position + runLength - p)))
                    Assert.Equal(shadow[p / granularity], dirty);
                long end = position + runLength;
                if (r > 0)
                    Assert.NotEqual(runs[r - 1].Dirty, dirty); // maximal runs
                if (end < offset + length && r == runs.Count - 1)
                    Assert.Equal(max, runs.Count); // cut short only by the limit
                if (end < offset + length)
                    Assert.NotEqual(dirty, shadow[end / granularity]); // a run ends where the state changes
                position = end;
            }
            Assert.True(position <= offset + length);
        }
    }
}
