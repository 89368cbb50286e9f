using BitmapBackup.Core.Formats.Qcow2;

namespace BitmapBackup.Core.Nodes;

/// <summary>
/// Allocation of a whole backing chain: where the top image leaves a range unallocated, the backing image
/// answers, down to the base. What stays <see cref="AllocationState.Unallocated"/> is stored nowhere and reads
/// as zeros (also past the end of a shorter backing image).
/// </summary>
public static class ChainAllocation
{
    public static IEnumerable<AllocationExtent> Of(IBlockImage image, long offset, long length)
    {
        foreach (AllocationExtent e in image.GetAllocation(offset, length))
        {
            if (e.State != AllocationState.Unallocated || image is not Qcow2Image { BackingImage: { } backing })
            {
                yield return e;
                continue;
            }
            long inBacking = Math.Min(e.End, backing.Size);
            if (inBacking > e.Offset)
            {
                foreach (AllocationExtent below in Of(backing, e.Offset, inBacking - e.Offset))
                    yield return below;
            }
            long rest = Math.Max(e.Offset, inBacking);
            if (e.End > rest)
                yield return new AllocationExtent(rest, e.End - rest, AllocationState.Unallocated);
        }
    }
}
