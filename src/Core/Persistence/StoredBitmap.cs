using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup.Core.Persistence;

/// <summary>
/// A bitmap as kept in an image (qcow2 bitmaps extension or the raw sidecar): name, granularity, the
/// qcow2 flags, and its bits. <see cref="InUse"/> set when loading means the last writer did not store it
/// cleanly: the bitmap is inconsistent.
/// </summary>
public sealed record StoredBitmap(string Name, long Granularity, bool InUse, bool Auto, HierarchicalBitmap? Bits)
{
    /// <summary>Dirty bytes as QEMU counts them (bits × granularity), or 0 when the bits were not loaded.</summary>
    public long Count => (Bits?.Count ?? 0) * Granularity;
}
