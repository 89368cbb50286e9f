using System.Management.Automation;
using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// A chain merge as a PowerShell job: Get-Job, Wait-Job, Receive-Job (one <see cref="BackupChainMergeResult"/>),
/// Stop-Job (stops it before its switch: the chain stays as it was) and Remove-Job work on it. Progress records are
/// written to the Progress stream while it copies. Completed, Failed or Stopped when it concludes.
/// </summary>
public sealed class MergePSJob : EnginePSJob
{
    internal const string TypeName = "BitmapBackupMergeJob";

    internal MergePSJob(ChainMerge merge, string command, string? name)
        : base(command, name ?? merge.Id)
    {
        Merge = merge;
        PSJobTypeName = TypeName;
        merge.Concluded += Conclude;
    }

    /// <summary>The engine's merge.</summary>
    public ChainMerge Merge { get; }

    /// <summary>What the merge is doing: Created, Copying, Switching, CleaningUp, Completed, Failed, Cancelled.</summary>
    public ChainMergeStatus Status => Merge.Status;

    /// <summary>The top image of the chain.</summary>
    public string Path => Merge.TopPath;

    public long BytesCopied => Merge.BytesDone;

    public long BytesTotal => Merge.BytesTotal;

    public override string StatusMessage => $"{Status}: {BytesCopied} of {BytesTotal} bytes";

    public override string Location => Merge.TopPath;

    /// <summary>Start the engine's merge and follow it.</summary>
    public override void StartJob()
    {
        BeginRunning();
        Merge.Run();
    }

    /// <summary>How long Stop-Job (and Remove-Job -Force) waits for a stopped merge to clean up.</summary>
    public static TimeSpan StopTimeout { get; set; } = TimeSpan.FromSeconds(30);

    private protected override TimeSpan StopWait => StopTimeout;

    /// <summary>
    /// Stop-Job: before its switch the merged image is deleted and the chain is as it was; from the switch on the merge
    /// finishes (a few renames and deletions) and the job completes.
    /// </summary>
    private protected override void CancelEngineJob() => Merge.Cancel();

    private protected override Task EngineCompletion => Merge.Completion;

    private protected override string StopTimedOutMessage(TimeSpan waited)
        => $"Merge job '{Name}' was stopped but did not finish within {waited.TotalSeconds:0} s (status {Merge.Status}); the job can be removed, the merge concludes when its storage answers.";

    public override void SuspendJob() => throw new NotSupportedException("A chain merge cannot be suspended; stop it (Stop-Job) and run it again later.");

    public override void SuspendJobAsync() => throw new NotSupportedException("A chain merge cannot be suspended; stop it (Stop-Job) and run it again later.");

    public override void SuspendJob(bool force, string reason) => SuspendJob();

    public override void SuspendJobAsync(bool force, string reason) => SuspendJobAsync();

    public override void ResumeJob() => throw new NotSupportedException("A chain merge cannot be suspended or resumed.");

    public override void ResumeJobAsync() => throw new NotSupportedException("A chain merge cannot be suspended or resumed.");

    public override void UnblockJob() => throw new NotSupportedException("Merge jobs never block.");

    public override void UnblockJobAsync() => throw new NotSupportedException("Merge jobs never block.");

    private void Conclude(ChainMerge merge)
    {
        if (!TryFinish(lastRecord: true))
            return;
        foreach (string warning in merge.Warnings)
            Warning.Add(new WarningRecord(warning));
        Output.Add(PSObject.AsPSObject(new BackupChainMergeResult(merge)));
        BlockException? error = merge.Error;
        if (error is null)
            SetState(JobState.Completed);
        else if (error.ErrorId == ErrorIds.MergeCancelled)
            SetState(JobState.Stopped);
        else
            SetState(JobState.Failed, error);   // the reason, as a backup job's (BackupPSJob.Conclude)
    }

    private protected override ProgressRecord CreateProgressRecord() => CreateProgressRecord(ActivityId, Merge);

    /// <summary>The progress record of a merge: its phase, and the bytes copied of the bytes to copy.</summary>
    internal static ProgressRecord CreateProgressRecord(int activityId, ChainMerge merge)
    {
        long total = merge.BytesTotal;
        long done = merge.BytesDone;
        bool concluded = merge.Status is ChainMergeStatus.Completed or ChainMergeStatus.Failed or ChainMergeStatus.Cancelled;
        int percent = total == 0 ? (concluded ? 100 : 0) : (int)Math.Min(100, done * 100 / total);
        return new ProgressRecord(activityId, $"Merge of the chain of '{merge.TopPath}'", $"{merge.Status}: {done:N0} of {total:N0} bytes")
        {
            PercentComplete = percent,
            RecordType = concluded ? ProgressRecordType.Completed : ProgressRecordType.Processing,
        };
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
            Merge.Concluded -= Conclude;
        base.Dispose(disposing);
    }
}
