using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions;

/// <summary>
/// What the actions queued so far will do to bitmap names, so that each new action is checked against the
/// state it will meet: a bitmap added earlier in the block exists, one removed earlier does not.
/// </summary>
public sealed class TransactionPlan
{
    private readonly HashSet<(BlockNode, string)> _added = new();
    private readonly HashSet<(BlockNode, string)> _removed = new();
    private readonly HashSet<(BlockNode, string)> _busy = new();

    /// <summary>Record that a backup queued earlier uses this bitmap: from then on it is busy.</summary>
    public void MarkBusy(BlockNode node, string name) => _busy.Add((node, name));

    /// <summary>
    /// Like <see cref="Resolve"/>, and refuses a bitmap a backup queued earlier in the transaction uses, when
    /// <paramref name="use"/> refuses busy bitmaps. Checks the existing bitmap's own state with <paramref name="use"/>.
    /// </summary>
    public DirtyBitmap? Resolve(BlockNode node, string name, BitmapUse use)
    {
        DirtyBitmap? bitmap = Resolve(node, name);
        if ((use & BitmapUse.RefuseBusy) != 0 && _busy.Contains((node, name)))
            Throw.Block(ErrorIds.BitmapBusy, BlockErrorCategory.ResourceBusy,
                $"Bitmap '{name}' on node '{node.Name}' is used by a backup started earlier in the same transaction and cannot be used.", name);
        bitmap?.Check(use);
        return bitmap;
    }

    /// <summary>Whether the transaction already holds an action that adds this name.</summary>
    public bool IsAdded(BlockNode node, string name) => _added.Contains((node, name));

    public bool IsRemoved(BlockNode node, string name) => _removed.Contains((node, name));

    /// <summary>Record an add; fails if the name exists then.</summary>
    public void Add(BlockNode node, string name)
    {
        if (IsAdded(node, name))
            Throw.Block(ErrorIds.TransactionConflict, BlockErrorCategory.InvalidOperation,
                $"Bitmap '{name}' is added to node '{node.Name}' twice in the same transaction.", name);
        if (node.FindBitmap(name) is not null && !IsRemoved(node, name))
            Throw.Block(ErrorIds.BitmapAlreadyExists, BlockErrorCategory.ResourceExists, $"Bitmap '{name}' already exists on node '{node.Name}'.", name);
        _removed.Remove((node, name));
        _added.Add((node, name));
    }

    public void Remove(BlockNode node, string name)
    {
        _added.Remove((node, name));
        _removed.Add((node, name));
    }

    /// <summary>
    /// The bitmap an action will find: the existing one (null if it is added earlier in this transaction, and
    /// so does not exist yet). Fails if it was removed earlier in the transaction or does not exist.
    /// </summary>
    public DirtyBitmap? Resolve(BlockNode node, string name)
    {
        if (IsRemoved(node, name))
            Throw.Block(ErrorIds.TransactionConflict, BlockErrorCategory.InvalidOperation,
                $"Bitmap '{name}' on node '{node.Name}' is removed by an earlier action of the same transaction and cannot be used after that.", name);
        if (IsAdded(node, name))
            return null;
        return node.GetBitmap(name);
    }
}
