using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Open-BlockNode: opens a disk image as a block node, registered under a node name for the session.</summary>
[Cmdlet(VerbsCommon.Open, "BlockNode", DefaultParameterSetName = "Path")]
[OutputType(typeof(BlockNodeInfo))]
public sealed class OpenBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>Path of the image file; wildcards allowed (each file they match is opened).</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipelineByPropertyName = true, ParameterSetName = "Path")]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>Path of the image file, taken as it is (no wildcards); Get-ChildItem's output binds here (PSPath).</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = "LiteralPath")]
    [Alias("PSPath", "LP", "FullName")]
    [ValidateNotNullOrEmpty]
    public string LiteralPath { get; set; } = null!;

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

    /// <summary>With -ReadOnly: open the image without image locks, even while another process writes it (QEMU's force-share).</summary>
    [Parameter]
    public SwitchParameter ForceShare { get; set; }

    /// <summary>
    /// The bitmap state folder that keeps the persistent bitmaps of a block device, or of a raw file that cannot keep a
    /// sidecar; by default $XDG_STATE_HOME/BitmapBackup (~/.local/state/BitmapBackup). Refused for a qcow2 image.
    /// </summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? BitmapStore { get; set; }

    #endregion

    #region Overrides

    protected override void BeginProcessing()
    {
        if (ForceShare && !ReadOnly)
            ThrowTerminatingError(ErrorRecordFactory.Create(ErrorIds.ForceShareRequiresReadOnly, ErrorCategory.InvalidArgument,
                "-ForceShare can only be used with -ReadOnly: a node that may write an image never ignores its locks (QEMU: force-share=on can only be used with read-only images).", ForceShare));
    }

    protected override void ProcessRecord()
    {
        bool literal = ParameterSetName == "LiteralPath";
        string? bitmapStore = BitmapStore is null ? null : ResolveFilePath(BitmapStore);
        foreach (string path in ResolveExistingFiles(literal ? LiteralPath : Path, literal))
        {
            BlockNode? node = null;
            if (TryRun(() => node = Engine.Open(path, Name, ReadOnly, ForceShare, Cache, bitmapStore)))
            {
                if (ForceShare)
                    WriteForceShareWarning(path);
                WriteObject(new BlockNodeInfo(node!));
            }
        }
    }

    #endregion
}
