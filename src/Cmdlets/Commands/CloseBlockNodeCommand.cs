using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Close-BlockNode: flushes and closes a node; its non-persistent bitmaps end with it.</summary>
[Cmdlet(VerbsCommon.Close, "BlockNode", SupportsShouldProcess = true)]
[OutputType(typeof(void))]
public sealed class CloseBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The nodes to close: names or node objects.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[] Node { get; set; } = null!;

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        foreach (string name in Node)
        {
            if (ResolveNode(name) is not BlockNode node || !ShouldProcess(node.Name, "Close block node"))
                continue;
            string? warning = null;
            if (TryRun(() => warning = NodeClosing.Close(Engine, node)) && warning is not null)
                WriteWarning(warning);
        }
    }

    #endregion
}
