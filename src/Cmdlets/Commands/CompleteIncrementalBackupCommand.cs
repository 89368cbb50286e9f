using System.Management.Automation;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// Complete-IncrementalBackup: finalizes a backup job left Pending by -AutoFinalize $false (QEMU's job-finalize):
/// the target is committed and the bitmap reset per its mode. Also ends a -Sync None job successfully.
/// </summary>
[Cmdlet(VerbsLifecycle.Complete, "IncrementalBackup", SupportsShouldProcess = true)]
[OutputType(typeof(BackupPSJob))]
public sealed class CompleteIncrementalBackupCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The backup job to finalize.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true)]
    [ValidateNotNull]
    public BackupPSJob Job { get; set; } = null!;

    /// <summary>Wait until the job has concluded.</summary>
    [Parameter]
    public SwitchParameter Wait { get; set; }

    /// <summary>Write the job.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (!ShouldProcess(Job.Name, "Finalize backup job"))
            return;
        if (!TryRun(Job.Backup.Complete))
            return;
        Job.Completing();
        if (Wait)
            Job.Backup.Completion.Wait();
        if (PassThru)
            WriteObject(Job);
    }

    #endregion
}
