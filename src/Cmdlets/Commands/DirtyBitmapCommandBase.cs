using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Base of the cmdlets that act on one named bitmap: -Node and -Name, both bindable by property name so
/// that DirtyBitmapInfo objects from Get-DirtyBitmap flow in.
/// </summary>
public abstract class DirtyBitmapCommandBase : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The node that holds the bitmap: a node name or a node or bitmap object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>The name of the bitmap.</summary>
    [Parameter(Mandatory = true, Position = 1, ValueFromPipelineByPropertyName = true)]
    [ArgumentCompleter(typeof(BitmapNameCompleter))]
    [ValidateNotNull]
    public string Name { get; set; } = null!;

    #endregion

    protected override void ProcessRecord()
    {
        if (ResolveNode(Node) is not BlockNode node)
            return;
        DirtyBitmap? bitmap = null;
        if (TryRun(() => bitmap = node.GetBitmap(Name)))
            ProcessBitmap(bitmap!);
    }

    /// <summary>Act on the bitmap found; engine errors are reported with <see cref="BitmapBackupCmdlet.TryRun"/>.</summary>
    protected abstract void ProcessBitmap(DirtyBitmap bitmap);
}
