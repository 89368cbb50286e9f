namespace BitmapBackup.Core.Transactions;

/// <summary>
/// One action of a <see cref="BitmapTransaction"/>, with QEMU's transaction callbacks: <see cref="Prepare"/>
/// makes the change in a way that can be undone, <see cref="Abort"/> undoes it, <see cref="Commit"/> makes it
/// final once every action has prepared. Prepare, Abort and Commit run while every node of the transaction
/// is quiesced, so all of them happen at one instant as far as writes can tell.
/// </summary>
public interface ITransactionAction
{
    /// <summary>What the action does, for messages ("add bitmap 'b' to node 'n'").</summary>
    string Description { get; }

    /// <summary>Nodes whose writes must be held off while the transaction applies.</summary>
    IEnumerable<Nodes.BlockNode> Nodes { get; }

    /// <summary>
    /// Queue-time check of arguments and state, as if the earlier actions had been applied (their effect on
    /// names is in <paramref name="plan"/>); records this action's own effect in it. Changes nothing else.
    /// </summary>
    void Check(TransactionPlan plan);

    void Prepare();

    void Abort();

    void Commit();
}
