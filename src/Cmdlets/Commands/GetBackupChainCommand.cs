using System.Management.Automation;
using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Get-BackupChain: every image of a backup chain from the base to the top, with what each stores.</summary>
[Cmdlet(VerbsCommon.Get, "BackupChain")]
[OutputType(typeof(BackupChainImage))]
public sealed class GetBackupChainCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The top image of the chain (the newest backup).</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [Alias("FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>Read the chain without image locks, even while another process writes an image of it (qemu-img -U).</summary>
    [Parameter]
    public SwitchParameter ForceShare { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        string path = ResolveFilePath(Path);
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
