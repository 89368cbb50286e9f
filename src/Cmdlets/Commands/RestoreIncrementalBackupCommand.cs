using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Restore-IncrementalBackup: flattens a backup chain into one standalone image, the disk at that backup's
/// point in time. Runs as a backup job of the chain (opened read-only), in the background or with -Wait.
/// </summary>
[Cmdlet(VerbsData.Restore, "IncrementalBackup", SupportsShouldProcess = true, DefaultParameterSetName = "Path")]
[OutputType(typeof(BackupPSJob), typeof(BackupResult))]
public sealed class RestoreIncrementalBackupCommand : BitmapBackupCmdlet
{
    private static int s_restores;
    private BackupJob? _waitingFor;

    #region Parameters

    /// <summary>The top image of the chain to restore (the backup whose point in time you want); wildcards allowed, matching one file.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipelineByPropertyName = true, ParameterSetName = "Path")]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>The top image of the chain, taken as it is (no wildcards); Get-ChildItem's output (PSPath) and a backup's result (Target) bind here.</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = "LiteralPath")]
    [Alias("PSPath", "LP", "FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string LiteralPath { get; set; } = null!;

    /// <summary>The new standalone image; it must not exist. Or a block device of the chain's size, overwritten in place (raw).</summary>
    [Parameter(Mandatory = true, Position = 1)]
    [ValidateNotNullOrEmpty]
    public string Destination { get; set; } = null!;

    /// <summary>Format of the restored image: Raw (default) or Qcow2.</summary>
    [Parameter]
    public ImageFormat Format { get; set; } = ImageFormat.Raw;

    /// <summary>Limit the copy rate (bytes per second; 0: no limit).</summary>
    [Parameter]
    public long BytesPerSecond { get; set; }

    /// <summary>Name of the PowerShell job.</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? JobName { get; set; }

    /// <summary>Run in the foreground with a progress bar and write the result.</summary>
    [Parameter]
    public SwitchParameter Wait { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        string path = ParameterSetName == "LiteralPath" ? ResolveSingleFile(LiteralPath, literal: true) : ResolveSingleFile(Path, literal: false);
        string destination = ResolveFilePath(Destination);
        bool device = Core.IO.BlockDevice.IsAt(destination);
        if (!ShouldProcess(destination, device ? $"Overwrite the block device with the chain of '{path}'" : $"Restore the chain of '{path}'"))
            return;
        BlockNode? node = null;
        BackupJob job;
        try
        {
            node = Engine.Open(path, $"restore-{Interlocked.Increment(ref s_restores)}", readOnly: true);
            job = BackupJob.Prepare(new BackupRequest
            {
                Source = node, Target = destination, Sync = BackupSyncMode.Full, TargetFormat = Format, BytesPerSecond = BytesPerSecond,
                UseExistingTarget = device, // a device is written in place: it exists, and nothing can be renamed over it
            });
            using (node.Quiesce())
                job.Freeze();
        }
        catch (BlockException e)
        {
            if (node is not null)
                Engine.Close(node);
            ThrowTerminatingError(ErrorRecordFactory.From(e));
            return;
        }
        BlockNode opened = node;
        job.Concluding += _ => Engine.Close(opened); // before the job reports its end: the chain is free again
        if (!Wait)
        {
            WriteObject(StartIncrementalBackupCommand.StartAsPSJob(this, job, MyInvocation.Line, JobName));
            return;
        }
        _waitingFor = job;
        StartIncrementalBackupCommand.RunInForeground(this, job);
        _waitingFor = null;
    }

    protected override void StopProcessing() => _waitingFor?.Cancel();

    #endregion
}
