using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup;

/// <summary>Get-DirtyBitmap: lists dirty bitmaps of one node or of every open node (QEMU's query-named-block-nodes).</summary>
[Cmdlet(VerbsCommon.Get, "DirtyBitmap", DefaultParameterSetName = NodeSet)]
[OutputType(typeof(DirtyBitmapInfo), ParameterSetName = [NodeSet])]
[OutputType(typeof(StoredBitmapInfo), ParameterSetName = [PathSet, LiteralPathSet])]
public sealed class GetDirtyBitmapCommand : BitmapBackupCmdlet
{
    private const string NodeSet = "Node";
    private const string PathSet = "Path";
    private const string LiteralPathSet = "LiteralPath";

    #region Parameters

    /// <summary>The node whose bitmaps to list: a name or a node object. All open nodes when omitted.</summary>
    [Parameter(ParameterSetName = NodeSet, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string? Node { get; set; }

    /// <summary>Image files that are not open (wildcards allowed): list the bitmaps stored in them, without changing them.</summary>
    [Parameter(Mandatory = true, ParameterSetName = PathSet)]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>An image file that is not open, taken as it is (no wildcards); Get-ChildItem's output binds here (PSPath).</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = LiteralPathSet)]
    [Alias("PSPath", "LP", "FullName")]
    [ValidateNotNullOrEmpty]
    public string LiteralPath { get; set; } = null!;

    /// <summary>With -Path or -LiteralPath: read the image without image locks, even while another process writes it.</summary>
    [Parameter(ParameterSetName = PathSet)]
    [Parameter(ParameterSetName = LiteralPathSet)]
    public SwitchParameter ForceShare { get; set; }

    /// <summary>With -Path: the bitmap state folder to look in, for a block device or a raw file without a sidecar (default: ~/.local/state/BitmapBackup).</summary>
    [Parameter(ParameterSetName = PathSet)]
    [ValidateNotNullOrEmpty]
    public string? BitmapStore { get; set; }

    /// <summary>Bitmap names to get; wildcards allowed. All bitmaps when omitted.</summary>
    [Parameter(Position = 1)]
    [SupportsWildcards]
    [ArgumentCompleter(typeof(BitmapNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[]? Name { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ParameterSetName is PathSet or LiteralPathSet)
        {
            bool literal = ParameterSetName == LiteralPathSet;
            foreach (string path in ResolveExistingFiles(literal ? LiteralPath : Path, literal))
                WriteStored(path);
            return;
        }
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

    #region Private methods

    private void WriteStored(string path)
    {
        IReadOnlyList<StoredBitmap> stored = [];
        if (!TryRun(() => stored = Engine.ReadStoredBitmaps(path, ForceShare, BitmapStore is null ? null : ResolveFilePath(BitmapStore))))
            return;
        if (ForceShare)
            WriteForceShareWarning(path);
        foreach (string pattern in Name ?? ["*"])
        {
            var matcher = new NameMatcher(pattern);
            StoredBitmap[] found = stored.Where(b => matcher.IsMatch(b.Name)).ToArray();
            foreach (StoredBitmap bitmap in found)
                WriteObject(new StoredBitmapInfo(path, bitmap));
            if (found.Length == 0 && !matcher.IsPattern)
                WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.BitmapNotFound, BlockErrorCategory.ObjectNotFound,
                    $"Dirty bitmap '{pattern}' is not stored in image '{path}'.", pattern)));
        }
    }

    #endregion
}
