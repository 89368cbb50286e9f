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

    /// <summary>
    /// The disk's size in bytes when the bits were stored, where the store records it (the sidecar and the state
    /// folder); null where it does not (qcow2 keeps the bitmap with the image it sizes). A disk that has grown since has
    /// the grown range marked dirty at the load, as a resize would mark it.
    /// </summary>
    public long? DiskSize { get; init; }

    /// <summary>Listed by the image's write-intent log (New-DirtyBitmap -CrashSafe); filled by <see cref="Nodes.BlockEngine.ReadStoredBitmaps"/>.</summary>
    public bool CrashSafe { get; init; }

    /// <summary>
    /// Left in use by a crash, but its write-intent log can rebuild it: the next open loads it consistent (recovered),
    /// not inconsistent. Filled by <see cref="Nodes.BlockEngine.ReadStoredBitmaps"/>.
    /// </summary>
    public bool Recoverable { get; init; }
}
