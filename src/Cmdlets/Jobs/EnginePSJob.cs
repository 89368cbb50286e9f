using System.ComponentModel;
using System.Management.Automation;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// What the module's PowerShell jobs share (<see cref="BackupPSJob"/>, <see cref="MergePSJob"/>): each follows one
/// engine job. While it runs, a progress record every 250 ms; when it concludes, a last one, and a latch
/// (<see cref="IsFinished"/>) after which nothing more is written (the streams close once the final state is set).
/// Stop-Job cancels the engine job and waits for it, bounded by the job type's stop timeout: an engine job that
/// cannot conclude in time (its storage hangs) leaves the PowerShell job Failed with JobStopTimedOut, removable, and
/// still concludes on its own when the storage answers.
/// </summary>
public abstract class EnginePSJob : Job2
{
    private static readonly TimeSpan ProgressInterval = TimeSpan.FromMilliseconds(250);
    private static long s_activity;

    private readonly Timer _progressTimer;
    private int _finished;

    private protected EnginePSJob(string command, string name)
        : base(command, name)
    {
        ActivityId = (int)(Interlocked.Increment(ref s_activity) & 0x7fffffff);
        Output.EnumeratorNeverBlocks = true;
        _progressTimer = new Timer(_ => WriteProgressRecord(), null, Timeout.Infinite, Timeout.Infinite);
    }

    /// <summary>Guards the progress timer, the finished latch and the state changes that must not race them.</summary>
    private protected Lock ProgressLock { get; } = new();

    /// <summary>The activity id of this job's progress records.</summary>
    private protected int ActivityId { get; }

    /// <summary>The job has concluded (or given up waiting): nothing more goes into its streams.</summary>
    private protected bool IsFinished => Volatile.Read(ref _finished) != 0;

    public override bool HasMoreData => Output.Count > 0 || Error.Count > 0 || Progress.Count > 0 || Warning.Count > 0 || Verbose.Count > 0;

    /// <summary>The current progress record of the engine job.</summary>
    private protected abstract ProgressRecord CreateProgressRecord();

    /// <summary>Set the PowerShell state (a backup job's child follows it).</summary>
    private protected virtual void SetState(JobState state, Exception? reason = null)
    {
        if (reason is null)
            SetJobState(state);
        else
            SetJobState(state, reason);
    }

    /// <summary>
    /// Running, with progress records from now on, unless the engine job has concluded already (a transaction runs its
    /// jobs before they are wrapped): then its final state stands.
    /// </summary>
    private protected void BeginRunning()
    {
        lock (ProgressLock)
        {
            if (!IsFinished)
            {
                SetState(JobState.Running);
                _progressTimer.Change(TimeSpan.Zero, ProgressInterval);
            }
        }
    }

    /// <summary>
    /// The engine job concluded: stop the progress timer, write the last record and close the latch. False when the
    /// job had finished already (the caller then writes nothing).
    /// </summary>
    private protected bool TryFinish(bool lastRecord)
    {
        lock (ProgressLock)
        {
            if (IsFinished)
                return false;
            _progressTimer.Change(Timeout.Infinite, Timeout.Infinite);
            if (lastRecord)
                Progress.Add(CreateProgressRecord());
            Volatile.Write(ref _finished, 1);
            return true;
        }
    }

    public override void StartJobAsync()
    {
        StartJob();
        OnStartJobCompleted(new AsyncCompletedEventArgs(null, false, null));
    }

    /// <summary>How long Stop-Job waits for this job type (its static StopTimeout, which tests may shorten).</summary>
    private protected abstract TimeSpan StopWait { get; }

    /// <summary>Ask the engine job to stop.</summary>
    private protected abstract void CancelEngineJob();

    /// <summary>Completes when the engine job has concluded.</summary>
    private protected abstract Task EngineCompletion { get; }

    /// <summary>The JobStopTimedOut message: what did not finish, and what the user can still do.</summary>
    private protected abstract string StopTimedOutMessage(TimeSpan waited);

    /// <summary>Cancel the engine job and wait, within <see cref="StopWait"/>, until it has concluded and this job with it.</summary>
    public override void StopJob()
    {
        if (IsFinished)
            return;
        SetState(JobState.Stopping);
        CancelEngineJob();
        TimeSpan wait = StopWait;
        if (!EngineCompletion.Wait(wait))
        {
            GiveUpWaiting(wait);
            return;
        }
        Finished.WaitOne(wait);
    }

    /// <summary>End the PowerShell job without the engine's outcome (it did not conclude within the stop bound).</summary>
    private void GiveUpWaiting(TimeSpan waited)
    {
        if (!TryFinish(lastRecord: false))
            return;
        SetState(JobState.Failed, new BlockException(ErrorIds.JobStopTimedOut, BlockErrorCategory.OperationTimeout, StopTimedOutMessage(waited), Name));
    }

    public override void StopJobAsync() => JobVerbs.RunAsync(StopJob, OnStopJobCompleted);

    public override void StopJob(bool force, string reason) => StopJob();

    public override void StopJobAsync(bool force, string reason) => StopJobAsync();

    /// <summary>Timer tick: one progress record, unless the job has concluded (its streams may be closed).</summary>
    private void WriteProgressRecord()
    {
        lock (ProgressLock)
        {
            if (!IsFinished)
                Progress.Add(CreateProgressRecord());
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
            _progressTimer.Dispose();
        base.Dispose(disposing);
    }
}
