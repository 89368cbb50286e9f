using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>Clear-DirtyBitmap: resets every bit of a bitmap (QEMU's block-dirty-bitmap-clear).</summary>
[Cmdlet(VerbsCommon.Clear, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class ClearDirtyBitmapCommand : DirtyBitmapCommandBase
{
    #region Parameters

    /// <summary>Write the bitmap after the change.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    internal override bool IsTransactional => true;

    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        if (ShouldProcess(bitmap.ToString(), "Clear dirty bitmap") && TryRun(() => bitmap.Clear()) && PassThru)
            WriteObject(new DirtyBitmapInfo(bitmap));
    }

    internal override (ITransactionAction, Func<Cmdlet, object?>?)? CreateTransactionAction(BlockNode node)
        => (new ClearBitmapAction(node, Name), PassThruOutput(node, PassThru));

    #endregion
}
