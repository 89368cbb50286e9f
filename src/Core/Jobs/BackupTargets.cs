using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Jobs;

/// <summary>The engine's way of making and opening backup targets: qcow2 (with backing files) or raw.</summary>
public static class BackupTargets
{
    /// <summary>Targets with the given qcow2 cluster size and backing file (the previous backup).</summary>
    public static BackupTargetOptions For(int? clusterSize, string? backingFile, Formats.Qcow2.Qcow2CompressionType compression = Formats.Qcow2.Qcow2CompressionType.Deflate) => new()
    {
        // A new target is scratch until its commit (a crashed '.partial' is discarded): created and written without
        // the syncs of each metadata stage, made durable by one sync at the commit (BackupTarget.Commit).
        Create = (path, format, size) =>
        {
            BlockEngine.CreateImage(path, size, format, format == ImageFormat.Qcow2 ? clusterSize : null, backingFile, durable: false, compression);
        },
        Open = (path, _) =>
        {
            IBlockImage image = BlockEngine.OpenImage(path, readOnly: false);
            (image as Formats.Qcow2.Qcow2Image)?.DeferOrderingUntilFlush();
            return image;
        },
        OpenExisting = path => BlockEngine.OpenImage(path, readOnly: false),
    };
}
