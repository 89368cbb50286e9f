using BitmapBackup.Core.Chains;

namespace BitmapBackup;

/// <summary>What a chain merge returns (Receive-Job, or Merge-BackupChain -Wait).</summary>
public sealed class BackupChainMergeResult
{
    internal BackupChainMergeResult(ChainMerge merge)
    {
        Path = merge.TopPath;
        Keep = merge.Keep;
        Into = merge.Into;
        ImagesBefore = merge.ChainBefore.Count;
        Chain = [.. merge.Succeeded ? merge.ChainAfter : merge.ChainBefore];
        ImagesAfter = Chain.Length;
        MergedImage = merge.NothingToMerge ? null : merge.MergedImage;
        Removed = [.. merge.Recovered, .. merge.Removed];
        BytesCopied = merge.BytesDone;
        BytesTotal = merge.BytesTotal;
        StartTime = merge.StartTime;
        Duration = (merge.EndTime ?? DateTimeOffset.Now) - merge.StartTime;
        Succeeded = merge.Succeeded;
        Error = merge.Error?.Message;
        ErrorId = merge.Error?.ErrorId;
    }

    /// <summary>The top image of the chain.</summary>
    public string Path { get; }

    /// <summary>The -Keep asked for, or empty with -Into.</summary>
    public int? Keep { get; }

    /// <summary>The new image of -Into, or empty.</summary>
    public string? Into { get; }

    /// <summary>Images of the chain before the merge.</summary>
    public int ImagesBefore { get; }

    /// <summary>Images of the chain after the merge (the same with -Into, or when the merge failed).</summary>
    public int ImagesAfter { get; }

    /// <summary>The chain after the merge, base first (as it was when the merge failed or was stopped).</summary>
    public string[] Chain { get; }

    /// <summary>The image that holds the merged content (the image it replaced keeps its name; the new image of -Into), or empty when there was nothing to merge.</summary>
    public string? MergedImage { get; }

    /// <summary>The files deleted: older images and their digest manifests (also those of an earlier merge a crash interrupted).</summary>
    public string[] Removed { get; }

    /// <summary>Bytes of the chain read into the merged image.</summary>
    public long BytesCopied { get; }

    /// <summary>Bytes the merge had to read: what the merged images store.</summary>
    public long BytesTotal { get; }

    public DateTimeOffset StartTime { get; }

    public TimeSpan Duration { get; }

    public bool Succeeded { get; }

    /// <summary>Why the merge failed or stopped, or empty.</summary>
    public string? Error { get; }

    /// <summary>The stable id of the failure, or empty.</summary>
    public string? ErrorId { get; }

    public override string ToString() => $"{Path}: {ImagesBefore} → {ImagesAfter} images";
}
