using System.Management.Automation;

namespace BitmapBackup;

/// <summary>Suspend-IncrementalBackup: pauses a running backup job (QEMU's job-pause): copying stops, copy-before-write goes on, so the point in time holds. The job's state becomes Suspended and its Status Paused. PowerShell on Linux and macOS has no Suspend-Job, so this is the way there; on Windows Suspend-Job does the same.</summary>
[Cmdlet(VerbsLifecycle.Suspend, "IncrementalBackup", SupportsShouldProcess = true, DefaultParameterSetName = "Job")]
[OutputType(typeof(BackupPSJob))]
public sealed class SuspendIncrementalBackupCommand : BackupJobCommandBase
{
    #region Overrides

    protected override void ProcessJob(BackupPSJob job)
    {
        if (ShouldProcess(job.Name, "Pause backup job") && TryRun(() => job.SuspendJob()) && PassThru)
            WriteObject(job);
    }

    #endregion
}
