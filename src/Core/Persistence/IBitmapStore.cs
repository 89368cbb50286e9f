using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup.Core.Persistence;

/// <summary>
/// Where an image keeps its persistent bitmaps. The engine follows QEMU's protocol: <see cref="Load"/> when a
/// node opens; opened for writing, every stored bitmap is marked in use at once (<see cref="MarkInUse"/>), so a
/// crash leaves them inconsistent; a bitmap made persistent later is recorded in use at once too
/// (<see cref="MarkInUse"/> again); <see cref="Store"/> at a clean close writes the bits and clears in_use.
/// </summary>
public interface IBitmapStore
{
    /// <summary>Every stored bitmap, with its bits (none for in-use ones: their bits cannot be trusted).</summary>
    IReadOnlyList<StoredBitmap> Load();

    /// <summary>Check that a new persistent bitmap can be stored (limits of the format); throws BlockException.</summary>
    void CheckCanStore(string name, long granularity, IReadOnlyList<DirtyBitmap> persistent);

    /// <summary>Record these bitmaps as in use (bits not written); inconsistent ones stay in use.</summary>
    void MarkInUse(IReadOnlyList<DirtyBitmap> persistent);

    /// <summary>Write every persistent bitmap with its bits; consistent ones lose in_use. Drops stored bitmaps not listed.</summary>
    void Store(IReadOnlyList<DirtyBitmap> persistent);
}
