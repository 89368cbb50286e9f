using System.Management.Automation;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// Complete-IncrementalBackup: finalizes a backup job left Pending by -AutoFinalize $false (QEMU's job-finalize):
/// the target is committed and the bitmap reset per its mode. Also ends a -Sync None job successfully.
/// </summary>
[Cmdlet(VerbsLifecycle.Complete, "IncrementalBackup", SupportsShouldProcess = true, DefaultParameterSetName = "Job")]
[OutputType(typeof(BackupPSJob))]
public sealed class CompleteIncrementalBackupCommand : BackupJobCommandBase
{
    #region Parameters

    /// <summary>Wait until the job has concluded.</summary>
    [Parameter]
    public SwitchParameter Wait { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessJob(BackupPSJob job)
    {
        if (!ShouldProcess(job.Name, "Finalize backup job"))
            return;
        if (!TryRun(job.Backup.Complete))
            return;
        job.Completing();
        if (Wait)
            job.Backup.Completion.Wait();
        if (PassThru)
            WriteObject(job);
    }

    #endregion
}
