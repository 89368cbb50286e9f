using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>Remove-DirtyBitmap: deletes a bitmap from its node (QEMU's block-dirty-bitmap-remove).</summary>
[Cmdlet(VerbsCommon.Remove, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(void))]
public sealed class RemoveDirtyBitmapCommand : DirtyBitmapCommandBase
{
    internal override bool IsTransactional => true;

    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        if (ShouldProcess(bitmap.ToString(), "Remove dirty bitmap"))
            TryRun(() => bitmap.Node.RemoveBitmap(bitmap));
    }

    internal override (ITransactionAction, Func<Cmdlet, object?>?)? CreateTransactionAction(BlockNode node)
        => (new RemoveBitmapAction(node, Name), null);

    #endregion
}
