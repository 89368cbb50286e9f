using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Transactions.Actions;

namespace BitmapBackup;

/// <summary>New-DirtyBitmap: adds a dirty bitmap to a node (QEMU's block-dirty-bitmap-add).</summary>
[Cmdlet(VerbsCommon.New, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class NewDirtyBitmapCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The node whose writes the bitmap records: a name or a node object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>Name of the new bitmap: unique on the node, 1 to 1023 bytes of UTF-8.</summary>
    [Parameter(Mandatory = true, Position = 1)]
    [AllowEmptyString]
    [ValidateNotNull]
    public string Name { get; set; } = null!;

    /// <summary>Bytes per bit: a power of two from 512 bytes to 2 GiB. Default: the node's cluster size clamped to 4-64 KiB (64 KiB for raw).</summary>
    [Parameter]
    public long Granularity { get; set; }

    /// <summary>Store the bitmap in the image so it survives closing the node.</summary>
    [Parameter]
    public SwitchParameter Persistent { get; set; }

    /// <summary>Create the bitmap without recording writes until Enable-DirtyBitmap.</summary>
    [Parameter]
    public SwitchParameter Disabled { get; set; }

    /// <summary>
    /// With -Persistent: the bitmap state folder to keep the bitmap in, for a block device or a raw file without a
    /// sidecar (the folder the node was opened with, or any folder while the node keeps no persistent bitmap yet).
    /// </summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? BitmapStore { get; set; }

    /// <summary>With -Persistent: keep a write-intent log beside the image, so that after a crash the bitmap loads as a superset of the writes it recorded instead of inconsistent.</summary>
    [Parameter]
    public SwitchParameter CrashSafe { get; set; }

    #endregion

    internal override bool IsTransactional => true;

    #region Overrides

    protected override void BeginProcessing()
    {
        base.BeginProcessing();
        if (CrashSafe && !Persistent)
            ThrowTerminatingError(ErrorRecordFactory.Create(ErrorIds.CrashSafeRequiresPersistent, ErrorCategory.InvalidArgument,
                "-CrashSafe needs -Persistent: a crash-safe bitmap is a persistent bitmap whose writes are also logged beside the image, so that a crash does not leave it inconsistent.", CrashSafe));
    }

    protected override void ProcessRecord()
    {
        if (ResolveNode(Node) is not BlockNode node)
            return;
        if (!ShouldProcess($"{node.Name}/{Name}", "Add dirty bitmap"))
            return;
        long? granularity = MyInvocation.BoundParameters.ContainsKey(nameof(Granularity)) ? Granularity : null;
        if (BitmapStore is not null && !TryRun(() => node.UseBitmapStore(ResolveFilePath(BitmapStore))))
            return;
        if (TransactionScope.Current is { } scope)
        {
            var action = new AddBitmapAction(node, Name, granularity, Persistent, Disabled, CrashSafe);
            scope.Enqueue(this, action, _ => new DirtyBitmapInfo(action.Bitmap!));
            return;
        }
        DirtyBitmap? bitmap = null;
        if (TryRun(() => bitmap = node.AddBitmap(Name, granularity, Persistent, Disabled, CrashSafe)))
            WriteObject(new DirtyBitmapInfo(bitmap!));
    }

    #endregion
}
