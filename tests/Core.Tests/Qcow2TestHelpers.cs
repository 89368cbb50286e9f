using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>Shared pieces of the qcow2 tests: whole-image reads, allocation maps, and a raw mirror of writes.</summary>
internal static class Qcow2TestHelpers
{
    public const int KiB = 1024;
    public const int MiB = 1024 * 1024;

    /// <summary>Every byte of the image, read through the driver in pieces of <paramref name="chunk"/> bytes.</summary>
    public static byte[] ReadAll(IBlockImage image, int chunk = 1 << 20)
    {
        var all = new byte[image.Size];
        for (long pos = 0; pos < all.Length; pos += chunk)
            image.Read(pos, all.AsSpan((int)pos, (int)Math.Min(chunk, all.Length - pos)));
        return all;
    }

    /// <summary>The driver's allocation map of the whole image, merged.</summary>
    public static IReadOnlyList<AllocationExtent> AllocationOf(IBlockImage image)
        => QemuImg.Merge(image.GetAllocation(0, image.Size));

    /// <summary>Assert our map of the image at <paramref name="path"/> (opened read-only now) equals qemu-img's for the top layer.</summary>
    public static void AssertMapMatchesQemu(string path)
    {
        IReadOnlyList<AllocationExtent> qemu = QemuImg.TopLayerMap(path);
        using var image = BitmapBackup.Core.Formats.Qcow2.Qcow2Image.Open(path, readOnly: true);
        IReadOnlyList<AllocationExtent> ours = AllocationOf(image);
        Assert.Equal(Describe(qemu), Describe(ours));
    }

    public static string Describe(IEnumerable<AllocationExtent> extents)
        => string.Join("\n", extents.Select(e => $"{e.Offset}+{e.Length} {e.State}"));

    /// <summary>Assert two byte arrays are equal, reporting the first difference instead of dumping them.</summary>
    public static void AssertBytesEqual(ReadOnlySpan<byte> expected, ReadOnlySpan<byte> actual, string what = "")
    {
        Assert.Equal(expected.Length, actual.Length);
        int diff = expected.CommonPrefixLength(actual);
        Assert.True(diff == expected.Length,
            $"{what} differs first at byte {diff} (cluster-aligned 64K: {diff / 65536 * 65536}): expected {(diff < expected.Length ? expected[diff] : 0)}, got {(diff < actual.Length ? actual[diff] : 0)}");
    }

    /// <summary>Bytes of a recognizable pattern: seeded random.</summary>
    public static byte[] Pattern(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }
}
