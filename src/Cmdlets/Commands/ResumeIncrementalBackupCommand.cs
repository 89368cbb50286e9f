using System.Management.Automation;

namespace BitmapBackup;

/// <summary>Resume-IncrementalBackup: resumes a paused backup job (QEMU's job-resume), including one paused by -OnSourceError/-OnTargetError Stop: what failed is retried. PowerShell on Linux and macOS has no Resume-Job, so this is the way there.</summary>
[Cmdlet(VerbsLifecycle.Resume, "IncrementalBackup", SupportsShouldProcess = true)]
[OutputType(typeof(BackupPSJob))]
public sealed class ResumeIncrementalBackupCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The backup job.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true)]
    [ValidateNotNull]
    public BackupPSJob Job { get; set; } = null!;

    /// <summary>Write the job.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ShouldProcess(Job.Name, "Resume backup job") && TryRun(() => Job.ResumeJob()) && PassThru)
            WriteObject(Job);
    }

    #endregion
}
