using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Get-BlockNode: lists the open block nodes.</summary>
[Cmdlet(VerbsCommon.Get, "BlockNode")]
[OutputType(typeof(BlockNodeInfo))]
public sealed class GetBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>Node names to get; wildcards allowed. All nodes when omitted.</summary>
    [Parameter(Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [SupportsWildcards]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[]? Name { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        IReadOnlyList<BlockNode> nodes = Engine.Nodes;
        foreach (string pattern in Name ?? ["*"])
        {
            var matcher = new NameMatcher(pattern);
            bool found = false;
            foreach (BlockNode node in nodes.Where(n => matcher.IsMatch(n.Name)))
            {
                found = true;
                WriteObject(new BlockNodeInfo(node));
            }
            if (!found && !matcher.IsPattern)
                WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.NodeNotFound, BlockErrorCategory.ObjectNotFound, $"Node '{pattern}' not found.", pattern)));
        }
    }

    #endregion
}
