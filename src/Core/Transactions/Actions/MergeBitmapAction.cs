using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>Merge sources into a bitmap; abort gives the target its old bits back.</summary>
public sealed class MergeBitmapAction(BlockNode node, string name, IReadOnlyList<(BlockNode Node, string Name)> sources) : ITransactionAction
{
    private DirtyBitmap? _target;
    private HierarchicalBitmap? _old;

    public string Description => $"merge {string.Join(", ", sources.Select(s => $"'{s.Node.Name}/{s.Name}'"))} into bitmap '{name}' on node '{node.Name}'";

    public IEnumerable<BlockNode> Nodes => sources.Select(s => s.Node).Append(node);

    public void Check(TransactionPlan plan)
    {
        if (sources.Count == 0)
            Errors.Throw.Block(Errors.ErrorIds.MergeSourceMissing, Errors.BlockErrorCategory.InvalidArgument,
                $"Merging into bitmap '{name}' on node '{node.Name}' needs at least one source bitmap.", name);
        plan.Resolve(node, name, BitmapUse.Default);
        foreach ((BlockNode n, string s) in sources)
        {
            plan.Resolve(n, s, BitmapUse.AllowReadOnly);
            if (n.Size != node.Size)
                Errors.Throw.Block(Errors.ErrorIds.BitmapSizeMismatch, Errors.BlockErrorCategory.InvalidArgument,
                    $"Bitmaps are of different sizes (destination '{name}' on node '{node.Name}' covers {node.Size} bytes, source '{s}' on node '{n.Name}' covers {n.Size} bytes) and can't be merged.", s);
        }
    }

    public void Prepare()
    {
        _target = node.GetBitmap(name);
        _old = _target.MergeFrom(sources.Select(s => s.Node.GetBitmap(s.Name)).ToArray());
    }

    public void Abort()
    {
        if (_target is not null && _old is not null)
            _target.Restore(_old);
    }

    public void Commit()
    {
    }
}
