namespace BitmapBackup.Core.Bitmaps;

/// <summary>
/// Which bitmap states an operation refuses, as QEMU's BDRV_BITMAP_* check masks: the default refuses a
/// busy, read-only or inconsistent bitmap; <see cref="AllowReadOnly"/> (enable, disable, merge sources,
/// backups) lets a read-only one through; <see cref="Remove"/> refuses only busy and read-only bitmaps,
/// since removing is the one thing an inconsistent bitmap may still do.
/// </summary>
[Flags]
public enum BitmapUse
{
    RefuseBusy = 1,
    RefuseReadOnly = 2,
    RefuseInconsistent = 4,
    Default = RefuseBusy | RefuseReadOnly | RefuseInconsistent,
    AllowReadOnly = RefuseBusy | RefuseInconsistent,
    Remove = RefuseBusy | RefuseReadOnly,
}
