using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup;

/// <summary>Remove-DirtyBitmap: deletes a bitmap from its node (QEMU's block-dirty-bitmap-remove).</summary>
[Cmdlet(VerbsCommon.Remove, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(void))]
public sealed class RemoveDirtyBitmapCommand : DirtyBitmapCommandBase
{
    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        if (ShouldProcess(bitmap.ToString(), "Remove dirty bitmap"))
            TryRun(() => bitmap.Node.RemoveBitmap(bitmap));
    }

    #endregion
}
