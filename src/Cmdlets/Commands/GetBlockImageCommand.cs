using System.Management.Automation;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup;

/// <summary>Get-BlockImage: what <c>qemu-img info</c> tells of an image file, without changing it.</summary>
[Cmdlet(VerbsCommon.Get, "BlockImage")]
[OutputType(typeof(BlockImageInfo))]
public sealed class GetBlockImageCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>Path of the image file.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [Alias("FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string[] Path { get; set; } = null!;

    /// <summary>Read the image without image locks, even while another process writes it (qemu-img info -U).</summary>
    [Parameter]
    public SwitchParameter ForceShare { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        foreach (string item in Path)
        {
            string path = ResolveFilePath(item);
            BlockImageInfo? info = null;
            if (TryRun(() => info = Describe(path, ForceShare)))
            {
                if (ForceShare)
                    WriteForceShareWarning(path);
                WriteObject(info);
            }
        }
    }

    #endregion

    #region Private methods

    /// <summary>Read the image, through its node when it is open here (the file is locked then), else opened as a reader (or without locks).</summary>
    internal static BlockImageInfo Describe(string path, bool forceShare = false)
    {
        string full = System.IO.Path.GetFullPath(path);
        if (Engine.Nodes.FirstOrDefault(n => n.Path == full) is { } node)
            return new BlockImageInfo(node.Image, node.Store?.Load() ?? []);
        using IBlockImage image = BlockEngine.OpenImage(full, readOnly: true, forceShare);
        IReadOnlyList<StoredBitmap> bitmaps = BlockEngine.StoreFor(image)?.Load() ?? [];
        return new BlockImageInfo(image, bitmaps);
    }

    #endregion
}
