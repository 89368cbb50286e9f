namespace BitmapBackup.Core.IO;

/// <summary>QEMU's block permissions (BLK_PERM_*), by bit; bit i is locked on bytes 100+i and 200+i of the image.</summary>
[Flags]
internal enum ImagePermissions
{
    None = 0,
    ConsistentRead = 1 << 0,
    Write = 1 << 1,
    WriteUnchanged = 1 << 2,
    Resize = 1 << 3,
}

/// <summary>
/// What an open of an image holds and what it does not share with other users, in QEMU's terms. The two roles
/// are the ones QEMU's own opens take on a file (checked in /proc/locks against QEMU 7.2): a writer holds
/// consistent read, write and resize and shares neither write nor resize (qemu-io, a guest disk, a block job
/// target); a reader holds consistent read and shares neither write nor resize (qemu-io -r, qemu-img info,
/// every backing file of a chain).
/// </summary>
internal readonly record struct ImageLockRole(ImagePermissions Held, ImagePermissions Unshared)
{
    public static ImageLockRole Writer { get; } = new(
        ImagePermissions.ConsistentRead | ImagePermissions.Write | ImagePermissions.Resize,
        ImagePermissions.Write | ImagePermissions.Resize);

    public static ImageLockRole Reader { get; } = new(
        ImagePermissions.ConsistentRead,
        ImagePermissions.Write | ImagePermissions.Resize);
}
