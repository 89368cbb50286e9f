namespace BitmapBackup.Core.Jobs;

/// <summary>
/// A block job's status, QEMU's JobStatus (qapi/job.json): created → running ⇄ paused → waiting → pending →
/// concluded on success; any state → aborting → concluded on failure or cancellation.
/// </summary>
public enum BlockJobStatus
{
    /// <summary>Set up (point in time taken, bitmaps frozen) but not yet copying.</summary>
    Created,
    Running,
    /// <summary>Paused by the user or by an error policy; resuming retries what failed.</summary>
    Paused,
    /// <summary>Done copying; waiting for the other jobs of a grouped transaction.</summary>
    Waiting,
    /// <summary>Done copying; waiting to be finalized (auto-finalize off).</summary>
    Pending,
    /// <summary>Failed or cancelled; cleaning up.</summary>
    Aborting,
    /// <summary>Finished, successfully or not; the result is final.</summary>
    Concluded,
}
