using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>Enable or disable a bitmap; abort returns it to its previous state.</summary>
public sealed class SetBitmapRecordingAction(BlockNode node, string name, bool enable) : ITransactionAction
{
    private DirtyBitmap? _bitmap;
    private bool _wasEnabled;

    public string Description => $"{(enable ? "enable" : "disable")} bitmap '{name}' on node '{node.Name}'";

    public IEnumerable<BlockNode> Nodes => [node];

    public void Check(TransactionPlan plan) => plan.Resolve(node, name, BitmapUse.AllowReadOnly);

    public void Prepare()
    {
        _bitmap = node.GetBitmap(name);
        _wasEnabled = _bitmap.Enabled;
        if (enable)
            _bitmap.Enable();
        else
            _bitmap.Disable();
    }

    public void Abort()
    {
        if (_bitmap is null)
            return;
        if (_wasEnabled)
            _bitmap.Enable();
        else
            _bitmap.Disable();
    }

    public void Commit()
    {
    }
}
