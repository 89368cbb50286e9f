using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Transactions;

namespace BitmapBackup;

/// <summary>
/// The transaction an Invoke-BitmapTransaction block is filling. While one is open on the pipeline thread, the
/// bitmap cmdlets and Start-IncrementalBackup check their action and queue it instead of acting; what they
/// would have written is produced once the transaction has committed.
/// </summary>
internal sealed class TransactionScope
{
    // Flows to the threads the block starts (ForEach-Object -Parallel, tasks), not to unrelated runspaces.
    private static readonly AsyncLocal<TransactionScope?> s_current = new();
    private readonly Lock _lock = new();

    private readonly List<Func<Cmdlet, object?>> _outputs = new();

    public static TransactionScope? Current => s_current.Value;

    public BitmapTransaction Transaction { get; } = new();

    public IReadOnlyList<Func<Cmdlet, object?>> Outputs => _outputs;

    public static TransactionScope Open()
    {
        if (s_current.Value is not null)
            throw new BlockException(ErrorIds.TransactionActionInvalid, BlockErrorCategory.InvalidOperation,
                "Invoke-BitmapTransaction cannot be nested: the actions already join the open transaction.");
        var scope = new TransactionScope();
        s_current.Value = scope;
        return scope;
    }

    public void Close() => s_current.Value = null;

    /// <summary>
    /// Queue an action; a failed check becomes a terminating error of the calling cmdlet, so the block stops
    /// and the transaction fails with it. <paramref name="output"/> produces the cmdlet's output after commit.
    /// </summary>
    public void Enqueue(PSCmdlet cmdlet, ITransactionAction action, Func<Cmdlet, object?>? output = null)
    {
        lock (_lock)
        {
            try
            {
                Transaction.Enqueue(action);
            }
            catch (BlockException e)
            {
                cmdlet.ThrowTerminatingError(ErrorRecordFactory.From(e));
            }
            if (output is not null)
                _outputs.Add(output);
        }
        cmdlet.WriteVerbose($"Queued in the transaction: {action.Description}.");
    }
}
