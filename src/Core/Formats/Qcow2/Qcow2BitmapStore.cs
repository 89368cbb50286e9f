using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// Persistent bitmaps of a qcow2 image, kept in its bitmaps header extension exactly as QEMU keeps them (spec
/// "Bitmaps extension", "Bitmap directory", "Bitmap table"; QEMU's block/qcow2-bitmap.c): <c>qemu-img info</c>
/// lists them, <c>qemu-img bitmap</c> edits them, QEMU records into the <c>auto</c> ones, and bitmaps QEMU wrote
/// load here.
///
/// <para><see cref="Load"/> checks the whole extension as untrusted input (BlockException ImageCorrupt naming the
/// problem; UnsupportedImageFeature for extra data) and returns the bits of every bitmap not in use.
/// <see cref="MarkInUse"/> and <see cref="Store"/> rewrite the directory copy-on-write (new clusters, durable, then
/// the header switched, then the old clusters freed), so a crash leaves the old or the new state and at worst
/// leaked clusters. A bitmap listed in use before it was ever stored gets a bitmap table of the right size whose
/// entries are all 0 (QEMU needs a real table for every entry). Inconsistent bitmaps keep their entry as found.</para>
///
/// <para>Read-only images: only <see cref="Load"/>. Version 2 images cannot store bitmaps (no auto-clear bits), as
/// in QEMU: <see cref="CheckCanStore"/> says so.</para>
/// </summary>
public sealed class Qcow2BitmapStore : IBitmapStore
{
    public Qcow2BitmapStore(Qcow2Image image)
    {
        ArgumentNullException.ThrowIfNull(image);
        Image = image;
    }

    public Qcow2Image Image { get; }

    public IReadOnlyList<StoredBitmap> Load() => Image.LoadStoredBitmaps();

    public void CheckCanStore(string name, long granularity, IReadOnlyList<DirtyBitmap> persistent)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(persistent);
        if (Image.CanStoreBitmapProblem(name, granularity, persistent) is { } problem)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{DirtyBitmapLimits.Shorten(name)}' persistent in '{Image.Path}': {problem}.", name);
    }

    public void MarkInUse(IReadOnlyList<DirtyBitmap> persistent)
    {
        ArgumentNullException.ThrowIfNull(persistent);
        Image.WriteBitmaps(persistent, storeBits: false);
    }

    public void Store(IReadOnlyList<DirtyBitmap> persistent)
    {
        ArgumentNullException.ThrowIfNull(persistent);
        Image.WriteBitmaps(persistent, storeBits: true);
    }

    public override string ToString() => $"bitmaps extension of '{Image.Path}'";
}
