using System.Management.Automation;
using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Get-BackupChain: every image of a backup chain from the base to the top, with what each stores.</summary>
[Cmdlet(VerbsCommon.Get, "BackupChain", DefaultParameterSetName = "Path")]
[OutputType(typeof(BackupChainImage))]
public sealed class GetBackupChainCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The top image of the chain (the newest backup); wildcards allowed (each image they match is listed).</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true, ParameterSetName = "Path")]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>The top image of the chain, taken as it is (no wildcards); Get-ChildItem's output (PSPath) and a backup's result (Target) bind here.</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = "LiteralPath")]
    [Alias("PSPath", "LP", "FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string LiteralPath { get; set; } = null!;

    /// <summary>Read the chain without image locks, even while another process writes an image of it (qemu-img -U).</summary>
    [Parameter]
    public SwitchParameter ForceShare { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        bool literal = ParameterSetName == "LiteralPath";
        foreach (string path in ResolveExistingFiles(literal ? LiteralPath : Path, literal))
            WriteChain(path);
    }

    #endregion

    #region Private methods

    private void WriteChain(string path)
    {
        IReadOnlyList<ChainImage> chain = [];
        if (!TryRun(() =>
        {
            using IBlockImage top = BlockEngine.OpenImage(path, readOnly: true, ForceShare);
            _ = BlockEngine.StoreFor(top)?.Load(); // one validation for every reader: damaged bitmap metadata is refused here too
            chain = BackupChain.Describe(top);
        }))
        {
            return;
        }
        if (ForceShare)
            WriteForceShareWarning(path);
        foreach (ChainImage image in chain)
            WriteObject(new BackupChainImage(image));
    }

    #endregion
}
