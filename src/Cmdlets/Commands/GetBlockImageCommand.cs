using System.Management.Automation;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;

namespace BitmapBackup;

/// <summary>Get-BlockImage: what <c>qemu-img info</c> tells of an image file, without changing it.</summary>
[Cmdlet(VerbsCommon.Get, "BlockImage", DefaultParameterSetName = PathSet)]
[OutputType(typeof(BlockImageInfo))]
public sealed class GetBlockImageCommand : BitmapBackupCmdlet
{
    private const string PathSet = "Path";
    private const string LiteralPathSet = "LiteralPath";

    #region Parameters

    /// <summary>Paths of image files; wildcards allowed.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true, ParameterSetName = PathSet)]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string[] Path { get; set; } = null!;

    /// <summary>Paths of image files, taken as they are (no wildcards); Get-ChildItem's output binds here (PSPath).</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = LiteralPathSet)]
    [Alias("PSPath", "LP", "FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string[] LiteralPath { get; set; } = null!;

    /// <summary>Read the image without image locks, even while another process writes it (qemu-img info -U).</summary>
    [Parameter]
    public SwitchParameter ForceShare { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        bool literal = ParameterSetName == LiteralPathSet;
        foreach (string item in literal ? LiteralPath : Path)
        {
            foreach (string path in ResolveExistingFiles(item, literal))
            {
                BlockImageInfo? info = null;
                if (TryRun(() => info = Describe(path, ForceShare)))
                {
                    if (ForceShare)
                        WriteForceShareWarning(path);
                    WriteObject(info);
                }
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
