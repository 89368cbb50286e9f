using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>Clear a bitmap; abort gives its bits back.</summary>
public sealed class ClearBitmapAction(BlockNode node, string name) : ITransactionAction
{
    private DirtyBitmap? _bitmap;
    private HierarchicalBitmap? _old;

    public string Description => $"clear bitmap '{name}' on node '{node.Name}'";

    public IEnumerable<BlockNode> Nodes => [node];

    public void Check(TransactionPlan plan) => plan.Resolve(node, name, BitmapUse.Default);

    public void Prepare()
    {
        _bitmap = node.GetBitmap(name);
        _old = _bitmap.Clear();
    }

    public void Abort()
    {
        if (_bitmap is not null && _old is not null)
            _bitmap.Restore(_old);
    }

    public void Commit()
    {
    }
}
