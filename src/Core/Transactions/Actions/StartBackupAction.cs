using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Transactions.Actions;

/// <summary>
/// Start a backup: prepare creates the target and freezes the point in time; commit starts copying; abort
/// cancels the job before it copied anything (target deleted, bitmap reclaimed).
/// </summary>
public sealed class StartBackupAction(BackupRequest request, BackupTargetOptions? targetOptions = null) : ITransactionAction
{
    public string Description => $"back up node '{request.Source.Name}' to '{request.Target}'";

    public IEnumerable<BlockNode> Nodes => [request.Source];

    public BackupRequest Request => request;

    /// <summary>The job, once prepared.</summary>
    public BackupJob? Job { get; private set; }

    /// <summary>Set by the transaction for -CompletionMode Grouped.</summary>
    public JobGroup? Group { get; set; }

    public void Check(TransactionPlan plan)
    {
        if (request.BitmapName is not null && plan.Resolve(request.Source, request.BitmapName) is null)
            return; // added earlier in this transaction: checked in full when prepared
        ValidatedBackup.Check(request);
    }

    public void Prepare()
    {
        Job = BackupJob.Prepare(request, targetOptions);
        Job.Group = Group;
        try
        {
            Job.Freeze();
        }
        catch
        {
            Job.Abandon();
            Job = null;
            throw;
        }
    }

    public void Abort()
    {
        Job?.Abandon();
    }

    public void Commit() => Job!.Run();
}
