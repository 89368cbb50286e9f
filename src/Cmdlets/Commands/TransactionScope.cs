using System.Management.Automation;
using System.Management.Automation.Runspaces;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Transactions;

namespace BitmapBackup;

/*
 * The transaction an Invoke-BitmapTransaction block is filling. While one is open, the bitmap cmdlets and
 * Start-IncrementalBackup of the block check their action and queue it instead of acting; what they would have
 * written is produced once the transaction has committed.
 *
 * The scope lives in an AsyncLocal, so .NET hands it to every thread started while the block runs: the runspaces
 * of ForEach-Object -Parallel and Start-ThreadJob get it, and keep it after the block has ended. So a scope is
 * only taken by the runspace that opened it, and only until it is closed (applied or rolled back):
 *
 * - closed: the transaction is over; a thread that outlives the block acts at once, as after the block;
 * - open, and the cmdlet runs in another runspace: it fails with TransactionInOtherRunspace. It cannot join
 *   (the block may end, and the transaction be applied, while that thread still runs), and acting at once would
 *   silently take it out of the all-or-nothing the block asks for. The refusal also fails the transaction when
 *   the block ends, since an error in another runspace does not stop the block.
 */

/// <summary>The transaction an Invoke-BitmapTransaction block is filling, in the runspace that runs the block.</summary>
internal sealed class TransactionScope
{
    /// <summary>The error id of a transactional cmdlet run in another runspace while a transaction's block runs.</summary>
    public const string InOtherRunspaceErrorId = "TransactionInOtherRunspace";

    private static readonly AsyncLocal<TransactionScope?> s_current = new();
    private readonly Lock _lock = new();
    private readonly List<Func<Cmdlet, object?>> _outputs = new();
    private readonly Runspace? _runspace;
    private volatile bool _closed;
    private ErrorRecord? _refused;

    private TransactionScope(Runspace? runspace) => _runspace = runspace;

    /// <summary>The open transaction of this runspace, or null: cmdlets act at once.</summary>
    public static TransactionScope? Current => s_current.Value is { } scope && scope.IsOpenHere ? scope : null;

    public BitmapTransaction Transaction { get; } = new();

    public IReadOnlyList<Func<Cmdlet, object?>> Outputs => _outputs;

    /// <summary>The first refusal of a cmdlet of another runspace while the block ran, or null.</summary>
    public ErrorRecord? Refused
    {
        get
        {
            lock (_lock)
                return _refused;
        }
    }

    private bool IsOpenHere => !_closed && Runspace.DefaultRunspace == _runspace;

    private bool IsOpenElsewhere => !_closed && Runspace.DefaultRunspace != _runspace;

    /// <summary>Open a transaction in this runspace. Refused inside another open transaction, of any runspace.</summary>
    public static TransactionScope Open(PSCmdlet cmdlet)
    {
        if (Current is not null)
            throw new BlockException(ErrorIds.TransactionActionInvalid, BlockErrorCategory.InvalidOperation,
                "Invoke-BitmapTransaction cannot be nested: the actions already join the open transaction.");
        CheckRunspace(cmdlet);
        var scope = new TransactionScope(Runspace.DefaultRunspace);
        s_current.Value = scope;
        return scope;
    }

    /// <summary>
    /// Fail a transactional cmdlet that runs in another runspace than the open transaction it inherited (a thread
    /// started in the block), and fail that transaction with it. Nothing happens when there is no such transaction.
    /// </summary>
    public static void CheckRunspace(PSCmdlet cmdlet)
    {
        if (s_current.Value is not { IsOpenElsewhere: true } scope)
            return;
        string command = cmdlet.MyInvocation.MyCommand.Name;
        string message = $"{command} runs in runspace {Runspace.DefaultRunspace?.Id} (a thread started inside Invoke-BitmapTransaction, such as "
            + $"ForEach-Object -Parallel or Start-ThreadJob) while the transaction of runspace {scope._runspace?.Id} is still being filled: a cmdlet "
            + "of another runspace cannot join it, and acting at once would take it out of the transaction, so nothing of the transaction is "
            + "applied. Queue the action in the transaction's block itself, or run it after Invoke-BitmapTransaction has returned.";
        var record = new ErrorRecord(new PSInvalidOperationException(message), InOtherRunspaceErrorId, ErrorCategory.InvalidOperation, command);
        lock (scope._lock)
        {
            if (scope._closed)
                return; // the block ended meanwhile: the transaction is over, act at once
            scope._refused ??= record;
        }
        cmdlet.ThrowTerminatingError(record);
    }

    /// <summary>The block has ended: the scope takes no more actions, wherever it has flowed.</summary>
    public void Close()
    {
        lock (_lock)
            _closed = true;
        if (s_current.Value == this)
            s_current.Value = null;
    }

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
