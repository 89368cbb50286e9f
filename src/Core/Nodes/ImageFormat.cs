namespace BitmapBackup.Core.Nodes;

/// <summary>Disk image formats the engine knows.</summary>
public enum ImageFormat
{
    Raw,
    Qcow2,
}
