using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Read-BlockNode: reads a range of a node and writes it as one byte array.</summary>
[Cmdlet(VerbsCommunications.Read, "BlockNode")]
[OutputType(typeof(byte[]))]
public sealed class ReadBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The node to read: a name or a node object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>Byte offset of the first byte read.</summary>
    [Parameter(Mandatory = true, Position = 1)]
    [ValidateRange(0, long.MaxValue)]
    public long Offset { get; set; }

    /// <summary>Number of bytes to read (at most 2 GiB less a little: one .NET array).</summary>
    [Parameter(Mandatory = true, Position = 2)]
    [ValidateRange(0, long.MaxValue)]
    public long Length { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ResolveNode(Node) is not BlockNode node)
            return;
        if (Length > Array.MaxLength)
        {
            WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.InvalidLength, BlockErrorCategory.InvalidArgument,
                $"Length {Length} is more than one read can return ({Array.MaxLength} bytes); read node '{node.Name}' in parts.", node.Name)));
            return;
        }
        byte[]? buffer = null;
        if (TryRun(() =>
        {
            node.CheckRange(Offset, Length);
            buffer = new byte[Length];
            node.Read(Offset, buffer);
        }))
        {
            WriteObject(buffer, enumerateCollection: false);
        }
    }

    #endregion
}
