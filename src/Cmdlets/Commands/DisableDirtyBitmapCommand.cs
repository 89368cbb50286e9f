using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>Disable-DirtyBitmap: stops recording writes in a bitmap, keeping its bits (QEMU's block-dirty-bitmap-disable).</summary>
[Cmdlet(VerbsLifecycle.Disable, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class DisableDirtyBitmapCommand : DirtyBitmapCommandBase
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
        if (ShouldProcess(bitmap.ToString(), "Disable dirty bitmap") && TryRun(() => bitmap.Disable()) && PassThru)
            WriteObject(new DirtyBitmapInfo(bitmap));
    }

    internal override (ITransactionAction, Func<Cmdlet, object?>?)? CreateTransactionAction(BlockNode node)
        => (new SetBitmapRecordingAction(node, Name, enable: false), PassThruOutput(node, PassThru));

    #endregion
}
