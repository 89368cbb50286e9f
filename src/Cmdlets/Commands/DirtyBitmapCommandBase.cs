using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions;

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

    private bool _nameGiven;

    protected override void BeginProcessing()
    {
        _nameGiven = MyInvocation.BoundParameters.ContainsKey(nameof(Name)); // before pipeline input: given on the command line
        base.BeginProcessing();
    }

    protected override void ProcessRecord()
    {
        if (!_nameGiven && BlockNodeTransformationAttribute.LastNodeObject is { } info && info.Name == Node && info.Name == Name)
        {
            // Get-BlockNode vm | Clear-DirtyBitmap: the node object's Name is the node's, not a bitmap's.
            WriteError(new ErrorRecord(new PSArgumentException($"A node object (node '{info.Name}') gives only the node: name the bitmap with -Name, as in Get-BlockNode {info.Name} | {MyInvocation.MyCommand.Name} -Name <bitmap>."),
                "BitmapNameRequired", ErrorCategory.InvalidArgument, info));
            return;
        }
        if (ResolveNode(Node) is not BlockNode node)
            return;
        if (TransactionScope.Current is { } scope && CreateTransactionAction(node) is { } queued)
        {
            if (ShouldProcess($"{node.Name}/{Name}", $"Queue in the transaction: {queued.Action.Description}"))
                scope.Enqueue(this, queued.Action, queued.Output);
            return;
        }
        DirtyBitmap? bitmap = null;
        if (TryRun(() => bitmap = node.GetBitmap(Name)))
            ProcessBitmap(bitmap!);
    }

    /// <summary>Act on the bitmap found; engine errors are reported with <see cref="BitmapBackupCmdlet.TryRun"/>.</summary>
    protected abstract void ProcessBitmap(DirtyBitmap bitmap);

    /// <summary>
    /// Inside Invoke-BitmapTransaction: the action to queue instead of acting, and what to write once the
    /// transaction has committed; null when the cmdlet acts at once even there (it only reads).
    /// </summary>
    internal virtual (ITransactionAction Action, Func<Cmdlet, object?>? Output)? CreateTransactionAction(BlockNode node) => null;

    /// <summary>After commit: the bitmap as it is then, when -PassThru asked for it.</summary>
    private protected Func<Cmdlet, object?>? PassThruOutput(BlockNode node, bool passThru)
    {
        string name = Name; // this record's name: the property changes with the next pipeline input
        return passThru ? _ => new DirtyBitmapInfo(node.GetBitmap(name)) : null;
    }
}
