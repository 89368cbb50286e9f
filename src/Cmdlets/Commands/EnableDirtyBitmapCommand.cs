using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>Enable-DirtyBitmap: starts recording writes in a bitmap (QEMU's block-dirty-bitmap-enable).</summary>
[Cmdlet(VerbsLifecycle.Enable, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class EnableDirtyBitmapCommand : DirtyBitmapCommandBase
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
        if (ShouldProcess(bitmap.ToString(), "Enable dirty bitmap") && TryRun(() => bitmap.Enable()) && PassThru)
            WriteObject(new DirtyBitmapInfo(bitmap));
    }

    internal override (ITransactionAction, Func<Cmdlet, object?>?)? CreateTransactionAction(BlockNode node)
        => (new SetBitmapRecordingAction(node, Name, enable: true), PassThruOutput(node, PassThru));

    #endregion
}
