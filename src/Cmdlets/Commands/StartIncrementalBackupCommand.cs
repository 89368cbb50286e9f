using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>
/// Start-IncrementalBackup: copies a node into a new image, all of it or only a bitmap's dirty clusters, as of
/// the instant the job starts (QEMU's blockdev-backup). Returns a job at once, or waits with -Wait.
/// </summary>
[Cmdlet(VerbsLifecycle.Start, "IncrementalBackup", SupportsShouldProcess = true)]
[OutputType(typeof(BackupPSJob), typeof(BackupResult))]
public sealed class StartIncrementalBackupCommand : BitmapBackupCmdlet
{
    private BackupJob? _waitingFor;

    #region Parameters

    /// <summary>The node to back up: a name or a node object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>Path of the backup image to create (or to write into, with -UseExistingTarget).</summary>
    [Parameter(Mandatory = true, Position = 1)]
    [ValidateNotNullOrEmpty]
    public string Target { get; set; } = null!;

    /// <summary>What to copy: Full, Top, None, Bitmap or Incremental (Bitmap with -BitmapMode OnSuccess).</summary>
    [Parameter(Mandatory = true)]
    public BackupSyncMode Sync { get; set; }

    /// <summary>The dirty bitmap of the node that says what to copy (Bitmap, Incremental) or that the backup resets (Full, Top).</summary>
    [Parameter]
    [ArgumentCompleter(typeof(BitmapNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string? Bitmap { get; set; }

    /// <summary>What happens to the bitmap at the end: OnSuccess, Always or Never.</summary>
    [Parameter]
    public BitmapSyncMode BitmapMode { get; set; }

    /// <summary>The previous backup of the chain, recorded as the new image's backing file (relative to the target's folder, or absolute).</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? BackingFile { get; set; }

    /// <summary>Write into an existing image of the same virtual size instead of creating one.</summary>
    [Parameter]
    public SwitchParameter UseExistingTarget { get; set; }

    /// <summary>Format of a new target: Qcow2 (default) or Raw.</summary>
    [Parameter]
    public ImageFormat TargetFormat { get; set; } = ImageFormat.Qcow2;

    /// <summary>Cluster size of a new qcow2 target (default 64 KiB).</summary>
    [Parameter]
    [ValidateRange(512, 2 * 1024 * 1024)]
    public int ClusterSize { get; set; }

    /// <summary>Limit the copy rate to this many bytes per second (0: no limit). Writes during the backup are never slowed by it.</summary>
    [Parameter]
    public long BytesPerSecond { get; set; }

    /// <summary>Write compressed qcow2 clusters.</summary>
    [Parameter]
    public SwitchParameter Compress { get; set; }

    /// <summary>The compression of a new qcow2 target: Deflate (default, every QEMU reads it) or Zstd (QEMU 5.1 and later); implies -Compress.</summary>
    [Parameter]
    public Core.Formats.Qcow2.Qcow2CompressionType? Compression { get; set; }

    /// <summary>When reading the node fails: Report (fail the job), Stop (pause; Resume-Job retries) or Ignore (retry later).</summary>
    [Parameter]
    public JobErrorAction OnSourceError { get; set; } = JobErrorAction.Report;

    /// <summary>When writing the target fails: Report, Stop or Ignore.</summary>
    [Parameter]
    public JobErrorAction OnTargetError { get; set; } = JobErrorAction.Report;

    /// <summary>With $false the job stops in the Pending status after copying, bitmaps untouched, until Complete-IncrementalBackup.</summary>
    [Parameter]
    public bool AutoFinalize { get; set; } = true;

    /// <summary>Name of the PowerShell job (default: the engine's job id, backupN).</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? JobName { get; set; }

    /// <summary>Run in the foreground with a progress bar; write the result, or a terminating error if the backup failed.</summary>
    [Parameter]
    public SwitchParameter Wait { get; set; }

    #endregion

    internal override bool IsTransactional => true;

    #region Overrides

    protected override void ProcessRecord()
    {
        BlockNode node = Engine.Find(Node) ?? throw Terminate(new BlockException(ErrorIds.NodeNotFound, BlockErrorCategory.ObjectNotFound, $"Node '{Node}' not found.", Node));
        string target = ResolveFilePath(Target);
        if (!ShouldProcess(target, $"Back up node '{node.Name}' (-Sync {Sync})"))
            return;
        var request = new BackupRequest
        {
            Source = node,
            Target = target,
            Sync = Sync,
            BitmapName = Bitmap,
            BitmapMode = MyInvocation.BoundParameters.ContainsKey(nameof(BitmapMode)) ? BitmapMode : null,
            BackingFile = BackingFile is null ? null : ResolveBackingFileName(BackingFile),
            UseExistingTarget = UseExistingTarget,
            TargetFormat = TargetFormat,
            ClusterSize = MyInvocation.BoundParameters.ContainsKey(nameof(ClusterSize)) ? ClusterSize : null,
            BytesPerSecond = BytesPerSecond,
            Compress = Compress || Compression is not null,
            Compression = Compression ?? Core.Formats.Qcow2.Qcow2CompressionType.Deflate,
            OnSourceError = OnSourceError,
            OnTargetError = OnTargetError,
            AutoFinalize = AutoFinalize,
        };
        if (TransactionScope.Current is { } scope)
        {
            if (Wait)
                throw Terminate(new BlockException(ErrorIds.TransactionActionInvalid, BlockErrorCategory.InvalidArgument,
                    $"Start-IncrementalBackup -Wait cannot run inside Invoke-BitmapTransaction: the backup of node '{node.Name}' starts when the transaction commits; wait for the job it returns.", node.Name));
            var action = new StartBackupAction(request);
            string line = MyInvocation.Line;
            string? jobName = JobName;
            scope.Enqueue(this, action, cmdlet => StartAsPSJob((PSCmdlet)cmdlet, action.Job!, line, jobName));
            return;
        }
        BackupJob job;
        try
        {
            job = BackupJob.Prepare(request);
            using (node.Quiesce())
                job.Freeze();
        }
        catch (BlockException e)
        {
            throw Terminate(e);
        }

        if (Wait)
            RunInForeground(job);
        else
            WriteObject(StartAsPSJob(this, job, MyInvocation.Line, JobName));
    }

    protected override void StopProcessing() => _waitingFor?.Cancel();

    #endregion

    #region Private methods

    /// <summary>Wrap an engine job (frozen, or already running after a transaction) as a PowerShell job and start following it.</summary>
    internal static BackupPSJob StartAsPSJob(PSCmdlet cmdlet, BackupJob job, string commandLine, string? jobName)
    {
        var psJob = new BackupPSJob(job, commandLine, jobName);
        BackupJobSourceAdapter.Register(cmdlet, psJob, commandLine);
        RunningBackups.Track(job, psJob.Name);
        psJob.StartJob();
        return psJob;
    }

    private void RunInForeground(BackupJob job)
    {
        _waitingFor = job;
        RunInForeground(this, job);
        _waitingFor = null;
    }

    /// <summary>Run a frozen job on this pipeline with a progress bar; write its result or its error as a terminating error.</summary>
    internal static void RunInForeground(PSCmdlet cmdlet, BackupJob job)
    {
        RunningBackups.Track(job, job.Id);
        job.Run();
        var progress = new ProgressRecord(1, $"Backup of node '{job.Source.Name}'", "Starting");
        while (!job.Completion.Wait(TimeSpan.FromMilliseconds(200)))
        {
            long total = job.BytesTotal;
            progress.PercentComplete = total == 0 ? 0 : (int)Math.Min(100, job.BytesDone * 100 / total);
            progress.StatusDescription = $"{job.Status}: {job.BytesDone:N0} of {total:N0} bytes";
            cmdlet.WriteProgress(progress);
        }
        progress.RecordType = ProgressRecordType.Completed;
        cmdlet.WriteProgress(progress);
        if (job.Error is { } error)
            cmdlet.ThrowTerminatingError(ErrorRecordFactory.From(error));
        cmdlet.WriteObject(new BackupResult(job));
    }

    private PipelineStoppedException Terminate(BlockException e)
    {
        ThrowTerminatingError(ErrorRecordFactory.From(e));
        return new PipelineStoppedException(); // not reached
    }

    #endregion
}
