using System.ComponentModel;
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
public sealed class BackupPSJob : Job2
{
    internal const string TypeName = "BitmapBackupJob";
    internal const string ParameterName = "BitmapBackupJob";
    private static readonly TimeSpan ProgressInterval = TimeSpan.FromMilliseconds(250);

    private readonly Timer _progressTimer;
    private readonly Lock _progressLock = new();
    private readonly int _activityId;
    private readonly BackupChildJob _child;
    private int _finished;

    internal BackupPSJob(BackupJob job, string command, string? name)
        : base(command, name ?? job.Id)
    {
        Backup = job;
        PSJobTypeName = TypeName;
        _child = new BackupChildJob(this, command, Name);
        ChildJobs.Add(_child);
        _activityId = (int)(Interlocked.Increment(ref s_activity) & 0x7fffffff);
        Output.EnumeratorNeverBlocks = true;
        _progressTimer = new Timer(_ => WriteProgressRecord(), null, Timeout.Infinite, Timeout.Infinite);
        job.StatusChanged += OnStatusChanged;
    }

    private static long s_activity;

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

    public override bool HasMoreData => Output.Count > 0 || Error.Count > 0 || Progress.Count > 0 || Warning.Count > 0 || Verbose.Count > 0;

    /// <summary>Start the engine job (it was frozen by the caller) and follow it.</summary>
    public override void StartJob()
    {
        lock (_progressLock)
        {
            // The engine job may have concluded already (a transaction runs its jobs before they are wrapped):
            // then Conclude has set the final state, which Running must not overwrite.
            if (Volatile.Read(ref _finished) == 0)
            {
                SetState(JobState.Running);
                _progressTimer.Change(TimeSpan.Zero, ProgressInterval);
            }
        }
        if (Backup.Status == BlockJobStatus.Created)
            Backup.Run();
        else
            OnStatusChanged(Backup, Backup.Status);
    }

    /// <summary>Set the job's state and its child's (see <see cref="BackupChildJob"/>).</summary>
    private void SetState(JobState state, Exception? reason = null)
    {
        _child.Follow(state);
        if (reason is null)
            SetJobState(state);
        else
            SetJobState(state, reason);
    }

    public override void StartJobAsync()
    {
        StartJob();
        OnStartJobCompleted(new AsyncCompletedEventArgs(null, false, null));
    }

    /// <summary>How long Stop-Job (and Remove-Job -Force) waits for a cancelled backup to clean up.</summary>
    public static TimeSpan StopTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Cancel the backup (QEMU's job-cancel) and wait until it has cleaned up: no dirty bit is lost. The wait is
    /// bounded: a backup that cannot conclude in <see cref="StopTimeout"/> (its target's storage hangs) fails with
    /// JobStopTimedOut and can be removed; the engine still concludes it, and gives its bitmap its bits back, when
    /// the storage answers.
    /// </summary>
    public override void StopJob()
    {
        if (IsFinished)
            return;
        SetState(JobState.Stopping);
        Backup.Cancel();
        if (!Backup.Completion.Wait(StopTimeout))
        {
            GiveUpWaiting();
            return;
        }
        Finished.WaitOne(StopTimeout);
    }

    /// <summary>End the PowerShell job without the engine's outcome (it did not conclude within the stop bound).</summary>
    private void GiveUpWaiting()
    {
        lock (_progressLock)
        {
            if (Volatile.Read(ref _finished) != 0)
                return;
            _progressTimer.Change(Timeout.Infinite, Timeout.Infinite);
            Volatile.Write(ref _finished, 1);
        }
        var error = new BlockException(ErrorIds.JobStopTimedOut, BlockErrorCategory.OperationTimeout,
            $"Backup job '{Name}' was cancelled but did not finish cleaning up within {StopTimeout.TotalSeconds:0} s (status {Backup.Status}); " +
            "its bitmap stays busy until it does, and the job can be removed.", Name);
        SetState(JobState.Failed, error);
    }

    public override void StopJobAsync() => JobVerbs.RunAsync(StopJob, OnStopJobCompleted);

    public override void StopJob(bool force, string reason) => StopJob();

    public override void StopJobAsync(bool force, string reason) => StopJobAsync();

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

    private bool IsFinished => Volatile.Read(ref _finished) != 0;

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
        lock (_progressLock)
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
        lock (_progressLock)
        {
            if (Volatile.Read(ref _finished) != 0)
                return;
            _progressTimer.Change(Timeout.Infinite, Timeout.Infinite);
            AddProgressRecord();
            Volatile.Write(ref _finished, 1); // from here the timer adds nothing: the streams close below
        }
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

    /// <summary>Timer tick: one progress record, unless the job has concluded (its streams may be closed).</summary>
    private void WriteProgressRecord()
    {
        lock (_progressLock)
        {
            if (Volatile.Read(ref _finished) == 0)
                AddProgressRecord();
        }
    }

    private void AddProgressRecord()
    {
        long total = Backup.BytesTotal;
        long done = Backup.BytesDone;
        int percent = total == 0 ? (Backup.Status == BlockJobStatus.Concluded ? 100 : 0) : (int)Math.Min(100, done * 100 / total);
        var record = new ProgressRecord(_activityId, $"Backup of node '{Backup.Source.Name}'", $"{Backup.Status}: {done:N0} of {total:N0} bytes")
        {
            PercentComplete = percent,
            RecordType = Backup.Status == BlockJobStatus.Concluded ? ProgressRecordType.Completed : ProgressRecordType.Processing,
        };
        Progress.Add(record);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            Backup.StatusChanged -= OnStatusChanged;
            _progressTimer.Dispose();
        }
        base.Dispose(disposing);
    }
}
