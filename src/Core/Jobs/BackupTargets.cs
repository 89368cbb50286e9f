namespace BitmapBackup.Core.Jobs;

/// <summary>The engine's way of making and opening backup targets, per format.</summary>
public static class BackupTargets
{
    // TODO(qcow2): create qcow2 targets (with backing file) and probe existing targets once the driver lands.
    public static BackupTargetOptions Options { get; } = new();
}
