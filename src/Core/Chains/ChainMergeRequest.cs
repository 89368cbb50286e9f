namespace BitmapBackup.Core.Chains;

/// <summary>What Merge-BackupChain asks for: exactly one of <see cref="Keep"/> and <see cref="Into"/>.</summary>
public sealed record ChainMergeRequest
{
    /// <summary>The top image of the chain.</summary>
    public required string Top { get; init; }

    /// <summary>Keep at most this many images (at least 1).</summary>
    public int? Keep { get; init; }

    /// <summary>Write the flattened chain to this new file instead.</summary>
    public string? Into { get; init; }

    /// <summary>Limit the reads of the copy to this many bytes per second (0: no limit).</summary>
    public long BytesPerSecond { get; init; }
}
