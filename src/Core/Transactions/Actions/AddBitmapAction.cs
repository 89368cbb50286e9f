using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>Add a bitmap; abort releases it.</summary>
public sealed class AddBitmapAction(BlockNode node, string name, long? granularity, bool persistent, bool disabled) : ITransactionAction
{
    public string Description => $"add bitmap '{name}' to node '{node.Name}'";

    public IEnumerable<BlockNode> Nodes => [node];

    /// <summary>The bitmap, once prepared.</summary>
    public DirtyBitmap? Bitmap { get; private set; }

    public void Check(TransactionPlan plan)
    {
        DirtyBitmapLimits.CheckName(name, node.Name);
        DirtyBitmapLimits.CheckGranularity(granularity ?? DirtyBitmapLimits.DefaultGranularity(node.ClusterSize), node.Name, name);
        plan.Add(node, name);
    }

    public void Prepare() => Bitmap = node.AddBitmap(name, granularity, persistent, disabled);

    public void Abort()
    {
        if (Bitmap is not null)
            node.RemoveBitmap(Bitmap);
    }

    public void Commit()
    {
    }
}
