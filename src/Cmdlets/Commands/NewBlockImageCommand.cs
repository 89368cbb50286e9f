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

    /// <summary>Virtual size in bytes (a positive multiple of 512; 64MB and the like work).</summary>
    [Parameter(Mandatory = true, Position = 1)]
    public long Size { get; set; }

    /// <summary>Image format. Without it the format follows the extension: .qcow2 is Qcow2, anything else Raw.</summary>
    [Parameter]
    public ImageFormat Format { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        string path = ResolveFilePath(Path);
        ImageFormat format = MyInvocation.BoundParameters.ContainsKey(nameof(Format)) ? Format
            : path.EndsWith(".qcow2", StringComparison.OrdinalIgnoreCase) ? ImageFormat.Qcow2 : ImageFormat.Raw;
        if (!ShouldProcess(path, $"Create {format} image of {Size} bytes"))
            return;
        if (TryRun(() => BlockEngine.CreateImage(path, Size, format)))
            WriteObject(new BlockImageInfo(path, format, Size));
    }

    #endregion
}
