using System.Management.Automation;

namespace BitmapBackup;

/// <summary>Resume-IncrementalBackup: resumes a paused backup job (QEMU's job-resume), including one paused by -OnSourceError/-OnTargetError Stop: what failed is retried. PowerShell on Linux and macOS has no Resume-Job, so this is the way there.</summary>
[Cmdlet(VerbsLifecycle.Resume, "IncrementalBackup", SupportsShouldProcess = true, DefaultParameterSetName = "Job")]
[OutputType(typeof(BackupPSJob))]
public sealed class ResumeIncrementalBackupCommand : BackupJobCommandBase
{
    #region Overrides

    protected override void ProcessJob(BackupPSJob job)
    {
        if (ShouldProcess(job.Name, "Resume backup job") && TryRun(() => job.ResumeJob()) && PassThru)
            WriteObject(job);
    }

    #endregion
}
