using BitmapBackup.Core.Bitmaps;
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
        if (request.BitmapName is not null)
        {
            bool addedEarlier = plan.Resolve(request.Source, request.BitmapName, BitmapUse.RefuseBusy) is null;
            plan.MarkBusy(request.Source, request.BitmapName);
            if (addedEarlier)
            {
                // The bitmap does not exist yet: check everything else now, the bitmap's state when prepared.
                ValidatedBackup.Check(request with { BitmapName = null, BitmapMode = null, Sync = request.Sync is BackupSyncMode.Bitmap or BackupSyncMode.Incremental ? BackupSyncMode.Full : request.Sync });
                return;
            }
        }
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
