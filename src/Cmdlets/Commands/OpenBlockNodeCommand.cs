using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Open-BlockNode: opens a disk image as a block node, registered under a node name for the session.</summary>
[Cmdlet(VerbsCommon.Open, "BlockNode")]
[OutputType(typeof(BlockNodeInfo))]
public sealed class OpenBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>Path of the image file.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipelineByPropertyName = true)]
    [Alias("FullName")]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>Node name; by default the file name without extension, made unique.</summary>
    [Parameter(Position = 1)]
    [ValidateNotNullOrEmpty]
    public string? Name { get; set; }

    /// <summary>Open the image for reading only: writes are refused, and other readers may open it too.</summary>
    [Parameter]
    public SwitchParameter ReadOnly { get; set; }

    /// <summary>When writes become durable: WriteBack (synced within a few seconds) or WriteThrough (synced before each write returns).</summary>
    [Parameter]
    public CacheMode Cache { get; set; } = CacheMode.WriteBack;

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        string path = ResolveFilePath(Path);
        BlockNode? node = null;
        if (TryRun(() => node = Engine.Open(path, Name, ReadOnly, Cache)))
            WriteObject(new BlockNodeInfo(node!));
    }

    #endregion
}
