using System.Management.Automation;
using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// Merge-BackupChain: chain retention. -Keep n merges the oldest images of a backup chain into one standalone image so
/// that the chain keeps at most n images; -Into flattens the chain into a new synthetic full. The chain is restorable
/// at every instant (ChainMerge). Returns a job at once, or waits with -Wait.
/// </summary>
[Cmdlet(VerbsData.Merge, "BackupChain", SupportsShouldProcess = true, DefaultParameterSetName = KeepSet)]
[OutputType(typeof(MergePSJob), typeof(BackupChainMergeResult))]
public sealed class MergeBackupChainCommand : BitmapBackupCmdlet
{
    private const string KeepSet = "Keep";
    private const string IntoSet = "Into";
    private const string KeepLiteralSet = "KeepLiteralPath";
    private const string IntoLiteralSet = "IntoLiteralPath";
    private ChainMerge? _waitingFor;

    #region Parameters

    /// <summary>The top image of the chain (the newest backup); wildcards allowed, they must match one file.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true, ParameterSetName = KeepSet)]
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true, ParameterSetName = IntoSet)]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>The top image of the chain, taken as it is (no wildcards); Get-ChildItem's and a backup's output bind here.</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = KeepLiteralSet)]
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = IntoLiteralSet)]
    [Alias("PSPath", "LP", "FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string LiteralPath { get; set; } = null!;

    /// <summary>Keep at most this many images: the oldest are merged into one standalone image (1 flattens the chain into its top).</summary>
    [Parameter(Mandatory = true, ParameterSetName = KeepSet)]
    [Parameter(Mandatory = true, ParameterSetName = KeepLiteralSet)]
    public int Keep { get; set; }

    /// <summary>Flatten the chain into this new standalone image (a synthetic full); the chain stays as it is.</summary>
    [Parameter(Mandatory = true, ParameterSetName = IntoSet)]
    [Parameter(Mandatory = true, ParameterSetName = IntoLiteralSet)]
    [ValidateNotNullOrEmpty]
    public string Into { get; set; } = null!;

    /// <summary>Limit the reads of the chain to this many bytes per second (0: no limit).</summary>
    [Parameter]
    public long BytesPerSecond { get; set; }

    /// <summary>Name of the PowerShell job (default: the engine's merge id, mergeN).</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? JobName { get; set; }

    /// <summary>Run in the foreground with a progress bar; write the result, or a terminating error if the merge failed.</summary>
    [Parameter]
    public SwitchParameter Wait { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        bool literal = ParameterSetName is KeepLiteralSet or IntoLiteralSet;
        string path = ResolveSingleFile(literal ? LiteralPath : Path, literal);
        string? into = ParameterSetName is IntoSet or IntoLiteralSet ? ResolveFilePath(Into) : null;
        string action = into is null
            ? $"Merge the oldest images of the chain so that it keeps at most {Keep} (older images and their manifests are deleted)"
            : $"Flatten the chain into the new image '{into}'";
        if (!ShouldProcess(path, action))
            return;
        ChainMerge merge;
        try
        {
            merge = ChainMerge.Prepare(new ChainMergeRequest
            {
                Top = path,
                Keep = into is null ? Keep : null,
                Into = into,
                BytesPerSecond = BytesPerSecond,
            }, Engine);
        }
        catch (BlockException e)
        {
            ThrowTerminatingError(ErrorRecordFactory.From(e));
            return;
        }
        finally
        {
            WriteEngineWarnings();
        }
        foreach (string file in merge.Recovered)
            WriteVerbose($"Deleted '{file}', left by an earlier merge of the chain that was interrupted.");
        if (merge.NothingToMerge)
            WriteVerbose($"The chain of '{path}' has {merge.ChainBefore.Count} image(s), no more than -Keep {Keep}: nothing to merge.");
        if (Wait)
            RunInForeground(merge);
        else
            WriteObject(StartAsPSJob(merge));
    }

    protected override void StopProcessing() => _waitingFor?.Cancel();

    #endregion

    #region Private methods

    private MergePSJob StartAsPSJob(ChainMerge merge)
    {
        var psJob = new MergePSJob(merge, MyInvocation.Line, JobName);
        BackupJobSourceAdapter.Register(this, psJob, MyInvocation.Line);
        RunningMerges.Track(merge, psJob.Name);
        psJob.StartJob();
        return psJob;
    }

    /// <summary>Run the merge with a progress bar; write its result, or its error as a terminating error.</summary>
    private void RunInForeground(ChainMerge merge)
    {
        _waitingFor = merge;
        RunningMerges.Track(merge, merge.Id);
        merge.Run();
        int activity = (int)(merge.GetHashCode() & 0x7fffffff);
        while (!merge.Completion.Wait(TimeSpan.FromMilliseconds(200)))
            WriteProgress(MergePSJob.CreateProgressRecord(activity, merge));
        WriteProgress(MergePSJob.CreateProgressRecord(activity, merge));
        _waitingFor = null;
        foreach (string warning in merge.Warnings)
            WriteWarning(warning);
        if (merge.Error is { } error)
            ThrowTerminatingError(ErrorRecordFactory.From(error));
        WriteObject(new BackupChainMergeResult(merge));
    }

    #endregion
}
