using System.Collections;
using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>How the backups of a transaction end (QEMU's transaction completion-mode).</summary>
public enum TransactionCompletionMode
{
    /// <summary>Each backup succeeds or fails on its own.</summary>
    Individual,
    /// <summary>No backup finalizes until all have copied; one failure cancels them all and keeps every bit.</summary>
    Grouped,
}

/// <summary>
/// Invoke-BitmapTransaction: applies bitmap changes and backup starts all or nothing, at one instant
/// (QEMU's transaction command).
/// </summary>
[Cmdlet(VerbsLifecycle.Invoke, "BitmapTransaction", DefaultParameterSetName = ScriptBlockSet, SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo), typeof(BackupPSJob))]
public sealed class InvokeBitmapTransactionCommand : BitmapBackupCmdlet
{
    private const string ScriptBlockSet = "ScriptBlock";
    private const string ActionSet = "Action";

    /// <summary>The cmdlets whose actions a transaction queues.</summary>
    internal static readonly string[] TransactionalCommands =
    [
        "New-DirtyBitmap", "Remove-DirtyBitmap", "Clear-DirtyBitmap", "Enable-DirtyBitmap", "Disable-DirtyBitmap",
        "Merge-DirtyBitmap", "Start-IncrementalBackup",
    ];

    private readonly List<object> _actions = new();

    #region Parameters

    /// <summary>
    /// The block that queues the actions. Inside it New/Remove/Clear/Enable/Disable/Merge-DirtyBitmap and
    /// Start-IncrementalBackup are checked and queued, not run; other commands run normally.
    /// </summary>
    [Parameter(Mandatory = true, Position = 0, ParameterSetName = ScriptBlockSet)]
    [ValidateNotNull]
    public ScriptBlock ScriptBlock { get; set; } = null!;

    /// <summary>
    /// The actions as data: hashtables or objects with Command (one of the transactional cmdlets) and Parameters
    /// (a hashtable or object of parameter names and values), e.g. from ConvertFrom-Json.
    /// </summary>
    [Parameter(Mandatory = true, ParameterSetName = ActionSet, ValueFromPipeline = true)]
    [ValidateNotNull]
    public object[] Action { get; set; } = null!;

    /// <summary>Individual (default): each backup ends on its own. Grouped: only backups allowed; they all succeed or all fail.</summary>
    [Parameter]
    public TransactionCompletionMode CompletionMode { get; set; } = TransactionCompletionMode.Individual;

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ParameterSetName == ActionSet)
            _actions.AddRange(Action);
    }

    protected override void EndProcessing()
    {
        TransactionScope scope = Open();
        try
        {
            if (ParameterSetName == ScriptBlockSet)
                Collect(() => ScriptBlock.Invoke());
            else
                Collect(() => _actions.SelectMany(RunAction).ToList());
        }
        finally
        {
            scope.Close();
        }
        if (scope.Refused is { } refused) // a cmdlet of a thread the block started was refused: nothing is applied
            ThrowTerminatingError(new ErrorRecord(refused.Exception, TransactionScope.InOtherRunspaceErrorId, refused.CategoryInfo.Category, refused.TargetObject));

        var queued = scope.Transaction.Actions;
        if (CompletionMode == TransactionCompletionMode.Grouped)
        {
            if (queued.FirstOrDefault(a => a is not StartBackupAction) is { } other)
                Fail(new BlockException(ErrorIds.GroupedCompletionNotAllowed, BlockErrorCategory.InvalidArgument,
                    $"-CompletionMode Grouped is only for transactions of backups; the action '{other.Description}' does not support it."));
            var group = new JobGroup();
            foreach (StartBackupAction backup in queued.Cast<StartBackupAction>())
                backup.Group = group;
        }
        if (queued.Count == 0 || !ShouldProcess($"{queued.Count} action(s)", "Apply bitmap transaction"))
            return;
        try
        {
            scope.Transaction.Apply();
        }
        catch (BlockException e)
        {
            Fail(e);
        }
        foreach (Func<Cmdlet, object?> output in scope.Outputs)
        {
            object? result = null;
            if (TryRun(() => result = output(this)) && result is not null) // applied: a failed output is no failure of the transaction
                WriteObject(result);
        }
    }

    #endregion

    #region Private methods

    private TransactionScope Open()
    {
        try
        {
            return TransactionScope.Open(this);
        }
        catch (BlockException e)
        {
            Fail(e);
            throw; // not reached
        }
    }

    /// <summary>Run the block; its own output passes through. A terminating error ends the transaction unapplied.</summary>
    private void Collect(Func<IEnumerable<PSObject>> run)
    {
        IEnumerable<PSObject> output;
        try
        {
            output = run();
        }
        catch (RuntimeException e) when (e.ErrorRecord is { } record)
        {
            // Keep the cause's id (BitmapNotFound, ...) as this cmdlet's error id.
            string id = record.FullyQualifiedErrorId.Split(',')[0];
            ThrowTerminatingError(new ErrorRecord(record.Exception, id, record.CategoryInfo.Category, record.TargetObject) { ErrorDetails = record.ErrorDetails });
            return;
        }
        foreach (PSObject item in output)
            WriteObject(item);
    }

    private IEnumerable<PSObject> RunAction(object item)
    {
        var data = PSObject.AsPSObject(item);
        object? command = data.BaseObject is IDictionary d ? d["Command"] ?? d["Cmdlet"] : (data.Properties["Command"] ?? data.Properties["Cmdlet"])?.Value;
        object? parameters = data.BaseObject is IDictionary p ? p["Parameters"] : data.Properties["Parameters"]?.Value;
        string? name = command?.ToString();
        if (name is null || !TransactionalCommands.Contains(name, StringComparer.OrdinalIgnoreCase))
            Fail(new BlockException(ErrorIds.TransactionActionInvalid, BlockErrorCategory.InvalidArgument,
                $"Transaction action '{item}' must name one of {string.Join(", ", TransactionalCommands)} as Command."));
        var splat = new Hashtable(StringComparer.OrdinalIgnoreCase);
        switch (parameters is PSObject ps ? ps.BaseObject : parameters)
        {
            case IDictionary dict:
                foreach (DictionaryEntry e in dict)
                    splat[e.Key.ToString()!] = e.Value;
                break;
            case null:
                break;
            default:
                foreach (PSPropertyInfo prop in PSObject.AsPSObject(parameters!).Properties)
                    splat[prop.Name] = prop.Value;
                break;
        }
        return ScriptBlock.Create("param($__command, $__parameters) & $__command @__parameters").Invoke(name, splat);
    }

    private void Fail(BlockException e) => ThrowTerminatingError(ErrorRecordFactory.From(e));

    #endregion
}
