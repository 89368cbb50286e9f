using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Chains;

/// <summary>One image of a backup chain and what it stores itself.</summary>
public sealed record ChainImage(
    int Depth,
    string Path,
    ImageFormat Format,
    long Size,
    int ClusterSize,
    string? BackingFile,
    long DataBytes,
    long ZeroBytes,
    long FileSize);
