using System.Text;
using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Bitmaps;

/// <summary>Limits on dirty bitmaps shared by the engine and the qcow2 bitmaps extension.</summary>
public static class DirtyBitmapLimits
{
    /// <summary>Longest name in UTF-8 bytes (QEMU's BDRV_BITMAP_MAX_NAME_SIZE).</summary>
    public const int MaxNameBytes = 1023;
    public const long MinGranularity = 512;
    public const long MaxGranularity = 1L << 31;
    public const long MinDefaultGranularity = 4096;
    public const long MaxDefaultGranularity = 65536;

    public static void CheckName(string? name, string node)
    {
        if (string.IsNullOrEmpty(name))
            Throw.Block(ErrorIds.BitmapNameEmpty, BlockErrorCategory.InvalidArgument, $"Bitmap name cannot be empty (node '{node}').", node);
        int bytes = Encoding.UTF8.GetByteCount(name);
        if (bytes > MaxNameBytes)
            Throw.Block(ErrorIds.BitmapNameTooLong, BlockErrorCategory.InvalidArgument,
                $"Bitmap name '{Shorten(name)}' on node '{node}' is {bytes} bytes long; the limit is {MaxNameBytes} bytes of UTF-8.", name);
    }

    public static void CheckGranularity(long granularity, string node, string name)
    {
        if (granularity < MinGranularity || granularity > MaxGranularity || (granularity & (granularity - 1)) != 0)
            Throw.Block(ErrorIds.InvalidGranularity, BlockErrorCategory.InvalidArgument,
                $"Granularity {granularity} for bitmap '{name}' on node '{node}' must be a power of two from 512 bytes to 2 GiB.", name);
    }

    /// <summary>QEMU's default: the node's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB without clusters.</summary>
    public static long DefaultGranularity(int clusterSize)
        => clusterSize <= 0 ? MaxDefaultGranularity : Math.Clamp(clusterSize, MinDefaultGranularity, MaxDefaultGranularity);

    internal static string Shorten(string name) => name.Length <= 40 ? name : string.Concat(name.AsSpan(0, 37), "...");
}
