using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Persistence;

/// <summary>
/// Persistent bitmaps of a raw image file, in a sidecar file "&lt;image&gt;.bitmaps" beside it (format and update
/// rules in docs/raw-bitmap-sidecar.md, file handling in <see cref="BitmapFile"/>).
/// </summary>
public sealed class RawBitmapSidecar(string imagePath) : IBitmapStore
{
    public const string Suffix = ".bitmaps";
    private const string What = "Bitmap sidecar";

    public string Path { get; } = imagePath + Suffix;

    public IReadOnlyList<StoredBitmap> Load() => BitmapFile.Read(Path, What)?.Bitmaps ?? [];

    public void CheckCanStore(string name, long granularity, IReadOnlyList<DirtyBitmap> persistent)
    {
        if (persistent.Count >= BitmapFile.MaxBitmaps)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{name}' persistent in '{Path}': at most {BitmapFile.MaxBitmaps} bitmaps can be stored.", name);
    }

    public void MarkInUse(IReadOnlyList<DirtyBitmap> persistent) => Write(persistent, storeBits: false);

    public void Store(IReadOnlyList<DirtyBitmap> persistent)
    {
        if (persistent.Count == 0)
        {
            if (File.Exists(Path))
                File.Delete(Path);
            return;
        }
        Write(persistent, storeBits: true);
    }

    private void Write(IReadOnlyList<DirtyBitmap> bitmaps, bool storeBits)
        => BitmapFile.WriteAtomically(Path, BitmapFile.Build(bitmaps, storeBits, bitmaps.Count == 0 ? 0 : bitmaps[0].Node.Size), What);
}
