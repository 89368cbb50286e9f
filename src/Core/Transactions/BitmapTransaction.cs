using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions;

/*
 * All-or-nothing application of bitmap actions and backup starts (QEMU's qmp_transaction).
 *
 * Actions are checked when queued (Enqueue), against the state they will meet. Apply then holds the write
 * gate of every node involved, in node-name order so two transactions cannot deadlock, and prepares the
 * actions in queue order. If one fails, the prepared ones are aborted in reverse order and the first error
 * is rethrown: nothing changed. Otherwise all are committed before the gates open: every bitmap change and
 * every backup's point in time fall on the same instant, and each write lands wholly before or after it. Changes of
 * crash-safe bitmaps are checkpointed in their nodes' write-intent logs before the gates open, once per node.
 */

/// <summary>A queue of actions applied together or not at all.</summary>
public sealed class BitmapTransaction
{
    private readonly List<ITransactionAction> _actions = new();

    public TransactionPlan Plan { get; } = new();

    public IReadOnlyList<ITransactionAction> Actions => _actions;

    /// <summary>Check an action against the plan so far and queue it. Throws (and queues nothing) when it cannot apply.</summary>
    public void Enqueue(ITransactionAction action)
    {
        action.Check(Plan);
        _actions.Add(action);
    }

    /// <summary>Apply every queued action at one instant, or none. Rethrows the first prepare failure.</summary>
    public void Apply()
    {
        BlockNode[] nodes = _actions.SelectMany(a => a.Nodes).Distinct().OrderBy(n => n.Name, StringComparer.Ordinal).ToArray();
        var gates = new List<IDisposable>(nodes.Length);
        try
        {
            foreach (BlockNode node in nodes)
                gates.Add(node.Quiesce());
            // Crash-safe bitmaps changed by the actions get one checkpoint per node, written before the gates open.
            using IDisposable checkpoints = BlockNode.DeferCheckpoints();
            var prepared = new List<ITransactionAction>(_actions.Count);
            try
            {
                foreach (ITransactionAction action in _actions)
                {
                    action.Prepare();
                    prepared.Add(action);
                }
            }
            catch
            {
                for (int i = prepared.Count - 1; i >= 0; i--)
                    prepared[i].Abort();
                throw;
            }
            foreach (ITransactionAction action in _actions)
                action.Commit();
        }
        finally
        {
            for (int i = gates.Count - 1; i >= 0; i--)
                gates[i].Dispose();
        }
    }
}
