using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Jobs;

/// <summary>The engine's way of making and opening backup targets: qcow2 (with backing files) or raw.</summary>
public static class BackupTargets
{
    /// <summary>Targets with the given qcow2 cluster size and backing file (the previous backup).</summary>
    public static BackupTargetOptions For(int? clusterSize, string? backingFile) => new()
    {
        Create = (path, format, size) =>
        {
            BlockEngine.CreateImage(path, size, format, format == ImageFormat.Qcow2 ? clusterSize : null, backingFile);
        },
        Open = (path, _) => BlockEngine.OpenImage(path, readOnly: false),
        OpenExisting = path => BlockEngine.OpenImage(path, readOnly: false),
    };
}
