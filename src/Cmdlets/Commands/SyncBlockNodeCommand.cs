using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Sync-BlockNode: makes every write made so far durable (data and metadata written back, fdatasync).</summary>
[Cmdlet(VerbsData.Sync, "BlockNode")]
[OutputType(typeof(BlockNodeInfo))]
public sealed class SyncBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The nodes to sync: names or node objects.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[] Node { get; set; } = null!;

    /// <summary>Write each synced node.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        foreach (string name in Node)
        {
            if (ResolveNode(name) is not BlockNode node)
                continue;
            if (TryRun(node.Flush) && PassThru)
                WriteObject(new BlockNodeInfo(node));
        }
    }

    #endregion
}
