using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Resize-BlockNode: changes a node's virtual size; its bitmaps follow.</summary>
[Cmdlet(VerbsCommon.Resize, "BlockNode", SupportsShouldProcess = true)]
[OutputType(typeof(BlockNodeInfo))]
public sealed class ResizeBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The node to resize: a name or a node object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>New virtual size in bytes (a positive multiple of 512).</summary>
    [Parameter(Mandatory = true, Position = 1)]
    public long Size { get; set; }

    /// <summary>Write the resized node.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ResolveNode(Node) is not BlockNode node)
            return;
        if (!ShouldProcess(node.Name, $"Resize block node from {node.Size} to {Size} bytes"))
            return;
        if (TryRun(() => node.Resize(Size)) && PassThru)
            WriteObject(new BlockNodeInfo(node));
    }

    #endregion
}
