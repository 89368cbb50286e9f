namespace BitmapBackup.Core.Jobs;

/// <summary>What a backup copies (QEMU's MirrorSyncMode for backups).</summary>
public enum BackupSyncMode
{
    /// <summary>Every allocated cluster of the node (holes stay holes).</summary>
    Full,
    /// <summary>What the node's top image allocates.</summary>
    Top,
    /// <summary>Only what is overwritten while the job runs (copy-before-write; for fleecing).</summary>
    None,
    /// <summary>The bitmap's dirty clusters, on top of the previous backup.</summary>
    Bitmap,
    /// <summary><see cref="Bitmap"/> with <see cref="BitmapSyncMode.OnSuccess"/>.</summary>
    Incremental,
}

/// <summary>What happens to the backup's bitmap when the job ends (QEMU's BitmapSyncMode).</summary>
public enum BitmapSyncMode
{
    /// <summary>Keep only writes made since the start if the job succeeded; otherwise lose nothing.</summary>
    OnSuccess,
    /// <summary>Like OnSuccess even on failure, then add back the clusters that were not copied.</summary>
    Always,
    /// <summary>Never clear: the bitmap keeps growing (differential backups).</summary>
    Never,
}

/// <summary>What a backup does when a read or a write fails (QEMU's BlockdevOnError).</summary>
public enum JobErrorAction
{
    /// <summary>Fail the job.</summary>
    Report,
    /// <summary>Pause the job; resuming retries.</summary>
    Stop,
    /// <summary>Keep going; the failed clusters are retried later.</summary>
    Ignore,
}
