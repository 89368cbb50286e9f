using BitmapBackup.Core.Formats.Qcow2;

namespace BitmapBackup.Core.Nodes;

/// <summary>
/// Allocation of a whole backing chain: where the top image leaves a range unallocated, the backing image
/// answers, down to the base. What stays <see cref="AllocationState.Unallocated"/> is stored nowhere and reads
/// as zeros (also past the end of a shorter backing image). The chain is walked one image at a time over the
/// ranges still open (a loop, not a recursion: a chain may be thousands deep), and the answer is put back in
/// offset order.
/// </summary>
public static class ChainAllocation
{
    public static IEnumerable<AllocationExtent> Of(IBlockImage image, long offset, long length)
    {
        var settled = new List<AllocationExtent>();
        var open = new List<AllocationExtent> { new(offset, length, AllocationState.Unallocated) };
        for (IBlockImage? layer = image; layer is not null && open.Count > 0; layer = (layer as Qcow2Image)?.BackingImage)
        {
            var next = new List<AllocationExtent>();
            long size = layer.Size;
            foreach (AllocationExtent range in open)
            {
                long inside = Math.Min(range.End, size);
                if (inside > range.Offset)
                {
                    foreach (AllocationExtent e in layer.GetAllocation(range.Offset, inside - range.Offset))
                        (e.State == AllocationState.Unallocated ? next : settled).Add(e);
                }
                long rest = Math.Max(range.Offset, inside);
                if (range.End > rest)
                    settled.Add(new AllocationExtent(rest, range.End - rest, AllocationState.Unallocated));
            }
            open = next;
        }
        settled.AddRange(open);
        settled.Sort((a, b) => a.Offset.CompareTo(b.Offset));
        var merged = new List<AllocationExtent>(settled.Count);
        foreach (AllocationExtent e in settled)
        {
            if (e.Length == 0)
                continue;
            if (merged.Count > 0 && merged[^1].State == e.State && merged[^1].End == e.Offset)
                merged[^1] = merged[^1] with { Length = merged[^1].Length + e.Length };
            else
                merged.Add(e);
        }
        return merged;
    }
}
