using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>
/// Merge-DirtyBitmap: makes a bitmap the union of itself and source bitmaps, possibly of other nodes of the same
/// size and of other granularities (QEMU's block-dirty-bitmap-merge). All or nothing.
/// </summary>
[Cmdlet(VerbsData.Merge, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class MergeDirtyBitmapCommand : DirtyBitmapCommandBase
{
    #region Parameters

    /// <summary>
    /// Source bitmaps: names of bitmaps on -Node, or bitmap objects (Get-DirtyBitmap) of any node of the same size.
    /// </summary>
    [Parameter(Mandatory = true, Position = 2)]
    [ValidateNotNull]
    [AllowEmptyCollection]
    [ArgumentCompleter(typeof(BitmapNameCompleter))]
    public object[] Source { get; set; } = null!;

    /// <summary>Write the target bitmap after the merge.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    internal override bool IsTransactional => true;

    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        var sources = new List<DirtyBitmap>();
        bool resolved = TryRun(() =>
        {
            foreach (object item in Source)
                sources.Add(ResolveSource(bitmap.Node, bitmap.Name!, item));
        });
        if (!resolved || !ShouldProcess(bitmap.ToString(), $"Merge {string.Join(", ", sources)} into dirty bitmap"))
            return;
        if (TryRun(() => bitmap.MergeFrom(sources)) && PassThru)
            WriteObject(new DirtyBitmapInfo(bitmap));
    }

    internal override (ITransactionAction, Func<Cmdlet, object?>?)? CreateTransactionAction(BlockNode node)
    {
        var sources = new List<(BlockNode, string)>();
        foreach (object item in Source)
        {
            object value = item is PSObject pso ? pso.BaseObject : item;
            (string? nodeName, string? name) = value switch
            {
                string s => (node.Name, s),
                DirtyBitmapInfo info => (info.Node, info.Name),
                _ => (PSObject.AsPSObject(item).Properties["Node"]?.Value is { } n ? BlockNodeTransformationAttribute.ToName(n)?.ToString() : null,
                      PSObject.AsPSObject(item).Properties["Name"]?.Value as string),
            };
            if (nodeName is null || name is null)
                ThrowTerminatingError(ErrorRecordFactory.From(new BlockException(ErrorIds.InvalidMergeSource, BlockErrorCategory.InvalidArgument,
                    $"Merge source '{item}' for bitmap '{node.Name}/{Name}' is neither a bitmap name nor a bitmap object (with Node and Name).", item)));
            BlockNode? sourceNode = Engine.Find(nodeName!);
            if (sourceNode is null)
                ThrowTerminatingError(ErrorRecordFactory.From(new BlockException(ErrorIds.NodeNotFound, BlockErrorCategory.ObjectNotFound, $"Node '{nodeName}' not found.", nodeName)));
            sources.Add((sourceNode!, name!));
        }
        return (new MergeBitmapAction(node, Name, sources), PassThruOutput(node, PassThru));
    }

    #endregion

    #region Private methods

    private static DirtyBitmap ResolveSource(BlockNode targetNode, string targetName, object item)
    {
        object value = item is PSObject pso ? pso.BaseObject : item;
        switch (value)
        {
            case string name:
                return targetNode.GetBitmap(name);
            case DirtyBitmapInfo info:
                return Engine.Get(info.Node).GetBitmap(info.Name);
            default:
                var ps = PSObject.AsPSObject(item);
                if (ps.Properties["Node"]?.Value is { } node && ps.Properties["Name"]?.Value is string bitmapName)
                    return Engine.Get(BlockNodeTransformationAttribute.ToName(node)?.ToString() ?? "").GetBitmap(bitmapName);
                throw new BlockException(ErrorIds.InvalidMergeSource, BlockErrorCategory.InvalidArgument,
                    $"Merge source '{item}' for bitmap '{targetNode.Name}/{targetName}' is neither a bitmap name nor a bitmap object (with Node and Name).", item);
        }
    }

    #endregion
}
