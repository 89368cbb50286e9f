using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>Remove a bitmap; abort puts the same bitmap, bits and state back.</summary>
public sealed class RemoveBitmapAction(BlockNode node, string name) : ITransactionAction
{
    private DirtyBitmap? _removed;
    private int _position;

    public string Description => $"remove bitmap '{name}' from node '{node.Name}'";

    public IEnumerable<BlockNode> Nodes => [node];

    public void Check(TransactionPlan plan)
    {
        plan.Resolve(node, name, BitmapUse.Remove);
        plan.Remove(node, name);
    }

    public void Prepare()
    {
        DirtyBitmap bitmap = node.GetBitmap(name);
        _position = node.RemoveBitmap(bitmap);
        _removed = bitmap;
    }

    public void Abort()
    {
        if (_removed is not null)
            node.RestoreBitmap(_removed, _position);
    }

    public void Commit()
    {
    }
}
