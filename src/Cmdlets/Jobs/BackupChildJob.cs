using System.Management.Automation;

namespace BitmapBackup;

/// <summary>
/// The one child job of a <see cref="BackupPSJob"/> (as Start-Job's jobs have one): the engine's job, whose state
/// follows its parent's. It has no output of its own; the parent carries the streams and the result.
/// </summary>
/// <remarks>
/// Why a backup job has a child at all: PowerShell's Blocked state means "waiting for the host", and Receive-Job
/// answers it by setting a job without child jobs back to Running (ReceiveJobCommand.DoUnblockJob), which would
/// make a backup that waits for Complete-IncrementalBackup look busy again and Wait-Job hang. A job with child jobs
/// is left alone (PowerShell computes a parent's state itself), so the parent stays Blocked while it waits; only
/// this child may be set Running by Receive-Job, which changes nothing.
/// </remarks>
internal sealed class BackupChildJob : Job
{
    private readonly BackupPSJob _parent;

    public BackupChildJob(BackupPSJob parent, string command, string name)
        : base(command, name)
    {
        _parent = parent;
        PSJobTypeName = BackupPSJob.TypeName;
    }

    public override string StatusMessage => _parent.StatusMessage;

    public override bool HasMoreData => false;

    public override string Location => _parent.Location;

    /// <summary>Stopping the child stops the backup.</summary>
    public override void StopJob() => _parent.StopJob();

    /// <summary>Follow the parent's state (finished states are final).</summary>
    internal void Follow(JobState state)
    {
        if (JobStateInfo.State is not (JobState.Completed or JobState.Failed or JobState.Stopped) && JobStateInfo.State != state)
            SetJobState(state);
    }
}
