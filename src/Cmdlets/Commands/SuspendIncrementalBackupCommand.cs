using System.Management.Automation;

namespace BitmapBackup;

/// <summary>Suspend-IncrementalBackup: pauses a running backup job (QEMU's job-pause): copying stops, copy-before-write goes on, so the point in time holds. The job's state becomes Suspended and its Status Paused. PowerShell on Linux and macOS has no Suspend-Job, so this is the way there; on Windows Suspend-Job does the same.</summary>
[Cmdlet(VerbsLifecycle.Suspend, "IncrementalBackup", SupportsShouldProcess = true)]
[OutputType(typeof(BackupPSJob))]
public sealed class SuspendIncrementalBackupCommand : BitmapBackupCmdlet
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
        if (ShouldProcess(Job.Name, "Pause backup job") && TryRun(() => Job.SuspendJob()) && PassThru)
            WriteObject(Job);
    }

    #endregion
}
