using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>Add a bitmap; abort releases it.</summary>
public sealed class AddBitmapAction(BlockNode node, string name, long? granularity, bool persistent, bool disabled, bool crashSafe = false) : ITransactionAction
{
    public string Description => $"add bitmap '{name}' to node '{node.Name}'";

    public IEnumerable<BlockNode> Nodes => [node];

    /// <summary>The bitmap, once prepared.</summary>
    public DirtyBitmap? Bitmap { get; private set; }

    public void Check(TransactionPlan plan)
    {
        if (crashSafe && !persistent)
            Errors.Throw.Block(Errors.ErrorIds.CrashSafeRequiresPersistent, Errors.BlockErrorCategory.InvalidArgument,
                $"Bitmap '{name}' on node '{node.Name}' cannot be crash-safe without being persistent.", name);
        DirtyBitmapLimits.CheckName(name, node.Name);
        DirtyBitmapLimits.CheckGranularity(granularity ?? DirtyBitmapLimits.DefaultGranularity(node.ClusterSize), node.Name, name);
        plan.Add(node, name);
    }

    public void Prepare() => Bitmap = node.AddBitmap(name, granularity, persistent, disabled, crashSafe);

    public void Abort()
    {
        if (Bitmap is not null)
            node.RemoveBitmap(Bitmap);
    }

    public void Commit()
    {
    }
}
