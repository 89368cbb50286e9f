using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>New-BlockImage: creates an empty (sparse) disk image file.</summary>
[Cmdlet(VerbsCommon.New, "BlockImage", SupportsShouldProcess = true)]
[OutputType(typeof(BlockImageInfo))]
public sealed class NewBlockImageCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>Path of the image file to create; it must not exist.</summary>
    [Parameter(Mandatory = true, Position = 0)]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>Virtual size in bytes (a positive multiple of 512; 64MB and the like work). With -BackingFile it may be omitted: the backing image's size.</summary>
    [Parameter(Position = 1)]
    public long Size { get; set; }

    /// <summary>Image format. Without it the format follows the extension: .qcow2 is Qcow2, anything else Raw.</summary>
    [Parameter]
    public ImageFormat Format { get; set; }

    /// <summary>qcow2 cluster size: a power of two from 512 bytes to 2 MiB (default 64 KiB).</summary>
    [Parameter]
    [ValidateRange(512, 2 * 1024 * 1024)]
    public int ClusterSize { get; set; }

    /// <summary>
    /// Make a qcow2 overlay on this image (qcow2 or raw): unallocated clusters read from it. A relative name is
    /// relative to the new image's folder and recorded as given, as qemu-img does.
    /// </summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? BackingFile { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        string path = ResolveFilePath(Path);
        string? backingFile = BackingFile is null ? null : ResolveBackingFileName(BackingFile);
        ImageFormat format = MyInvocation.BoundParameters.ContainsKey(nameof(Format)) ? Format
            : path.EndsWith(".qcow2", StringComparison.OrdinalIgnoreCase) ? ImageFormat.Qcow2 : ImageFormat.Raw;
        if (!MyInvocation.BoundParameters.ContainsKey(nameof(Size)) && BackingFile is null)
        {
            ThrowTerminatingError(ErrorRecordFactory.Create("SizeRequired", ErrorCategory.InvalidArgument,
                $"Give the size of image '{path}' with -Size (it may only be left out for an overlay, with -BackingFile).", path));
        }
        int? clusterSize = MyInvocation.BoundParameters.ContainsKey(nameof(ClusterSize)) ? ClusterSize : null;
        if (!ShouldProcess(path, BackingFile is null ? $"Create {format} image of {Size} bytes" : $"Create {format} overlay on '{backingFile}'"))
            return;
        BlockImageInfo? info = null;
        if (TryRun(() =>
        {
            BlockEngine.CreateImage(path, Size, format, clusterSize, backingFile);
            info = GetBlockImageCommand.Describe(path);
        }))
        {
            WriteObject(info);
        }
    }

    #endregion
}
