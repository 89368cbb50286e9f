using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;

namespace BitmapBackup;

/// <summary>
/// A backup as a PowerShell job: Get-Job, Wait-Job, Receive-Job (one <see cref="BackupResult"/>), Stop-Job
/// (cancel), Suspend-Job/Resume-Job (pause) and Remove-Job work on it. <see cref="Status"/> is QEMU's job
/// status; the PowerShell state follows it: running → Running, paused → Suspended, waiting for
/// Complete-IncrementalBackup (-AutoFinalize $false once Pending, -Sync None from the start) → Blocked, concluded →
/// Completed, Failed or (cancelled) Stopped. Wait-Job returns on a Blocked or Suspended job, as on a finished one.
/// Progress records are written to the Progress stream while it copies. The job belongs to the runspace that
/// started it (<see cref="BackupJobSourceAdapter"/>).
/// </summary>
public sealed class BackupPSJob : EnginePSJob
{
    internal const string TypeName = "BitmapBackupJob";
    internal const string ParameterName = "BitmapBackupJob";

    private readonly BackupChildJob _child;

    internal BackupPSJob(BackupJob job, string command, string? name)
        : base(command, name ?? job.Id)
    {
        Backup = job;
        PSJobTypeName = TypeName;
        _child = new BackupChildJob(this, command, Name);
        ChildJobs.Add(_child);
        job.StatusChanged += OnStatusChanged;
    }

    /// <summary>The adapter (of the runspace that started the job) that keeps it.</summary>
    internal BackupJobSourceAdapter? Adapter { get; set; }

    /// <summary>The engine's job.</summary>
    public BackupJob Backup { get; }

    /// <summary>QEMU's job status: Created, Running, Paused, Waiting, Pending, Aborting, Concluded.</summary>
    public BlockJobStatus Status => Backup.Status;

    public string Node => Backup.Source.Name;

    public string Target => Backup.TargetPath;

    public long BytesCopied => Backup.BytesDone;

    public long BytesTotal => Backup.BytesTotal;

    public override string StatusMessage => $"{Status}: {BytesCopied} of {BytesTotal} bytes";

    public override string Location => Backup.Source.Name;

    /// <summary>Start the engine job (it was frozen by the caller) and follow it.</summary>
    public override void StartJob()
    {
        BeginRunning();
        if (Backup.Status == BlockJobStatus.Created)
            Backup.Run();
        else
            OnStatusChanged(Backup, Backup.Status);
    }

    /// <summary>Set the job's state and its child's (see <see cref="BackupChildJob"/>).</summary>
    private protected override void SetState(JobState state, Exception? reason = null)
    {
        _child.Follow(state);
        base.SetState(state, reason);
    }

    /// <summary>How long Stop-Job (and Remove-Job -Force) waits for a cancelled backup to clean up.</summary>
    public static TimeSpan StopTimeout { get; set; } = TimeSpan.FromSeconds(30);

    private protected override TimeSpan StopWait => StopTimeout;

    /// <summary>
    /// Stop-Job cancels the backup (QEMU's job-cancel) and waits until it has cleaned up: no dirty bit is lost. A backup
    /// that cannot conclude in <see cref="StopTimeout"/> (its target's storage hangs) fails with JobStopTimedOut and can
    /// be removed; the engine still concludes it, and gives its bitmap its bits back, when the storage answers.
    /// </summary>
    private protected override void CancelEngineJob() => Backup.Cancel();

    private protected override Task EngineCompletion => Backup.Completion;

    private protected override string StopTimedOutMessage(TimeSpan waited)
        => $"Backup job '{Name}' was cancelled but did not finish cleaning up within {waited.TotalSeconds:0} s (status {Backup.Status}); " +
           "its bitmap stays busy until it does, and the job can be removed.";

    /// <summary>Pause copying (Suspend-Job). Copy-before-write continues, so the point in time holds.</summary>
    public override void SuspendJob()
    {
        Backup.Pause();
    }

    public override void SuspendJobAsync() => JobVerbs.RunAsync(SuspendJob, OnSuspendJobCompleted);

    public override void SuspendJob(bool force, string reason) => SuspendJob();

    public override void SuspendJobAsync(bool force, string reason) => SuspendJobAsync();

    /// <summary>Resume copying (Resume-Job); what failed under -OnSourceError/-OnTargetError Stop is retried.</summary>
    public override void ResumeJob()
    {
        Backup.Resume();
    }

    public override void ResumeJobAsync() => JobVerbs.RunAsync(ResumeJob, OnResumeJobCompleted);

    public override void UnblockJob() => throw new NotSupportedException("Backup jobs never block.");

    public override void UnblockJobAsync() => throw new NotSupportedException("Backup jobs never block.");

    private void OnStatusChanged(BackupJob job, BlockJobStatus status)
    {
        if (status != BlockJobStatus.Concluded && IsFinished)
            return;
        if (status is BlockJobStatus.Running or BlockJobStatus.Paused)
            status = job.Status; // a pause and a resume may race: follow where the job is now, not the event's order
        switch (status)
        {
            case BlockJobStatus.Running or BlockJobStatus.Waiting or BlockJobStatus.Pending:
                FollowActivity(job);
                break;
            case BlockJobStatus.Paused:
                if (JobStateInfo.State is JobState.Running or JobState.Blocked)
                    SetState(JobState.Suspended);
                if (job.PausedByError && job.LastTransientError is { } e)
                    Warning.Add(new WarningRecord($"Backup job '{Name}' paused after an error: {e.Message} Resume-IncrementalBackup retries."));
                break;
            case BlockJobStatus.Concluded:
                Conclude(job);
                break;
        }
    }

    /// <summary>A job that is not paused: Blocked while it waits for Complete-IncrementalBackup, else Running.</summary>
    private void FollowActivity(BackupJob job)
    {
        lock (ProgressLock)
        {
            if (IsFinished || JobStateInfo.State == JobState.Stopping)
                return;
            JobState state = job.AwaitsCompletion ? JobState.Blocked : JobState.Running;
            if (JobStateInfo.State != state)
                SetState(state);
        }
    }

    /// <summary>Complete-IncrementalBackup was called: a Blocked job runs on to its end.</summary>
    internal void Completing() => FollowActivity(Backup);

    private void Conclude(BackupJob job)
    {
        if (!TryFinish(lastRecord: true))
            return; // from here the timer adds nothing: the streams close below
        Output.Add(PSObject.AsPSObject(new BackupResult(job)));
        foreach (BlockException cleanup in job.CleanupErrors)
            Error.Add(ErrorRecordFactory.From(cleanup));
        BlockException? error = job.Error;
        if (error is null)
        {
            SetState(JobState.Completed);
        }
        else if (error.ErrorId == ErrorIds.BackupCancelled)
        {
            SetState(JobState.Stopped);
        }
        else
        {
            // The failure is the job's JobStateInfo.Reason (ErrorId, Category, Target), not also a record of the Error
            // stream: Receive-Job writes every failed job's reason (as JobStateFailed, as for a ThreadJob), and would
            // write the failure twice. The BackupResult in the output carries ErrorId too.
            SetState(JobState.Failed, error);
        }
    }

    private protected override ProgressRecord CreateProgressRecord()
    {
        long total = Backup.BytesTotal;
        long done = Backup.BytesDone;
        int percent = total == 0 ? (Backup.Status == BlockJobStatus.Concluded ? 100 : 0) : (int)Math.Min(100, done * 100 / total);
        return new ProgressRecord(ActivityId, $"Backup of node '{Backup.Source.Name}'", $"{Backup.Status}: {done:N0} of {total:N0} bytes")
        {
            PercentComplete = percent,
            RecordType = Backup.Status == BlockJobStatus.Concluded ? ProgressRecordType.Completed : ProgressRecordType.Processing,
        };
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
            Backup.StatusChanged -= OnStatusChanged;
        base.Dispose(disposing);
    }
}
