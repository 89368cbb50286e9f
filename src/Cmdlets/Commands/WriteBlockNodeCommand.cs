using System.Diagnostics;
using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Write-BlockNode: writes bytes, a repeated byte, or zeros to a node; its recording bitmaps mark the range dirty.</summary>
[Cmdlet(VerbsCommunications.Write, "BlockNode", SupportsShouldProcess = true, DefaultParameterSetName = DataSet)]
[OutputType(typeof(void))]
public sealed class WriteBlockNodeCommand : BitmapBackupCmdlet
{
    private const string DataSet = "Data";
    private const string PatternSet = "Pattern";
    private const string ZeroSet = "Zero";
    private const int ChunkSize = 1 << 20;

    #region Parameters

    /// <summary>The node to write: a name or a node object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>Byte offset of the first byte written.</summary>
    [Parameter(Mandatory = true, Position = 1)]
    [ValidateRange(0, long.MaxValue)]
    public long Offset { get; set; }

    /// <summary>The bytes to write.</summary>
    [Parameter(Mandatory = true, ParameterSetName = DataSet)]
    [ValidateNotNull]
    public byte[] Data { get; set; } = null!;

    /// <summary>A byte value written Length times.</summary>
    [Parameter(Mandatory = true, ParameterSetName = PatternSet)]
    public byte Pattern { get; set; }

    /// <summary>Make the range read as zeros (deallocating where the format can).</summary>
    [Parameter(Mandatory = true, ParameterSetName = ZeroSet)]
    public SwitchParameter Zero { get; set; }

    /// <summary>Number of bytes to write with -Pattern or -Zero.</summary>
    [Parameter(Mandatory = true, ParameterSetName = PatternSet)]
    [Parameter(Mandatory = true, ParameterSetName = ZeroSet)]
    [ValidateRange(0, long.MaxValue)]
    public long Length { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ResolveNode(Node) is not BlockNode node)
            return;
        long length = ParameterSetName == DataSet ? Data.LongLength : Length;
        if (!ShouldProcess(node.Name, $"Write {length} bytes at offset {Offset}"))
            return;
        switch (ParameterSetName)
        {
            case DataSet:
                TryRun(() => node.Write(Offset, Data));
                break;
            case PatternSet:
                TryRun(() => WritePattern(node));
                break;
            case ZeroSet:
                TryRun(() => node.WriteZeroes(Offset, Length));
                break;
            default:
                Debug.Fail("Invalid parameter set");
                break;
        }
    }

    #endregion

    #region Private methods

    private void WritePattern(BlockNode node)
    {
        node.CheckRange(Offset, Length);
        byte[] chunk = new byte[(int)Math.Min(Length, ChunkSize)];
        chunk.AsSpan().Fill(Pattern);
        for (long done = 0; done < Length; done += chunk.Length)
            node.Write(Offset + done, chunk.AsSpan(0, (int)Math.Min(chunk.Length, Length - done)));
    }

    #endregion
}
