using BitmapBackup.Core.Jobs;

namespace BitmapBackup;

/// <summary>What a backup job returns (Receive-Job, or Start-IncrementalBackup -Wait).</summary>
public sealed class BackupResult
{
    internal BackupResult(BackupJob job)
    {
        Node = job.Source.Name;
        Target = job.KeptPartialTarget ?? job.TargetPath;
        Sync = job.Sync;
        Bitmap = job.Bitmap?.Name;
        BitmapMode = job.BitmapMode;
        BytesCopied = job.BytesDone;
        BytesTotal = job.BytesTotal;
        BytesRead = job.BytesRead;
        PointInTime = job.PointInTime;
        Duration = (job.EndTime ?? DateTimeOffset.Now) - job.PointInTime;
        BytesPerSecond = Duration.TotalSeconds > 0 ? (long)(BytesCopied / Duration.TotalSeconds) : BytesCopied;
        Succeeded = job.Succeeded;
        Error = job.Error?.Message;
        ErrorId = job.Error?.ErrorId;
        Manifest = job.Succeeded && job.ManifestPath is { } manifest && File.Exists(manifest) ? manifest : null;
    }

    /// <summary>Name of the node backed up.</summary>
    public string Node { get; }

    /// <summary>Path of the backup image (gone when the backup failed and created it; the kept '.partial' file after a failed -BitmapMode Always backup).</summary>
    public string Target { get; }

    public BackupSyncMode Sync { get; }

    public string? Bitmap { get; }

    public BitmapSyncMode? BitmapMode { get; }

    /// <summary>Bytes copied into the target (zero clusters count as copied).</summary>
    public long BytesCopied { get; }

    /// <summary>Bytes the backup had to copy at its start.</summary>
    public long BytesTotal { get; }

    /// <summary>Bytes read from the source's files (holes and unallocated clusters are not read): the backup's cost to the source disk.</summary>
    public long BytesRead { get; }

    /// <summary>The instant the backup represents: when the job started.</summary>
    public DateTimeOffset PointInTime { get; }

    public TimeSpan Duration { get; }

    /// <summary>Average copy rate.</summary>
    public long BytesPerSecond { get; }

    public bool Succeeded { get; }

    /// <summary>Why the backup failed, or empty.</summary>
    public string? Error { get; }

    /// <summary>The stable id of the failure, or empty.</summary>
    public string? ErrorId { get; }

    /// <summary>The digest manifest written beside the backup ('&lt;target&gt;.digests'), or empty when none was.</summary>
    public string? Manifest { get; }
}
