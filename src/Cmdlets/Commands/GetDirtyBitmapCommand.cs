using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Get-DirtyBitmap: lists dirty bitmaps of one node or of every open node (QEMU's query-named-block-nodes).</summary>
[Cmdlet(VerbsCommon.Get, "DirtyBitmap")]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class GetDirtyBitmapCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The node whose bitmaps to list: a name or a node object. All open nodes when omitted.</summary>
    [Parameter(ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string? Node { get; set; }

    /// <summary>Bitmap names to get; wildcards allowed. All bitmaps when omitted.</summary>
    [Parameter(Position = 0)]
    [SupportsWildcards]
    [ArgumentCompleter(typeof(BitmapNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[]? Name { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        IReadOnlyList<BlockNode> nodes;
        if (Node is not null)
        {
            if (ResolveNode(Node) is not BlockNode node)
                return;
            nodes = [node];
        }
        else
        {
            nodes = Engine.Nodes;
        }
        foreach (string pattern in Name ?? ["*"])
        {
            var matcher = new NameMatcher(pattern);
            bool found = false;
            foreach (BlockNode node in nodes)
            {
                foreach (DirtyBitmap bitmap in node.Bitmaps.Where(b => matcher.IsMatch(b.Name!)))
                {
                    found = true;
                    WriteObject(new DirtyBitmapInfo(bitmap));
                }
            }
            if (!found && !matcher.IsPattern)
            {
                string where = Node is null ? "any open node" : $"node '{Node}'";
                WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.BitmapNotFound, BlockErrorCategory.ObjectNotFound,
                    $"Dirty bitmap '{pattern}' not found on {where}.", pattern)));
            }
        }
    }

    #endregion
}
