using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Jobs;

/// <summary>What a user asks of a backup: Start-IncrementalBackup's parameters, before any check.</summary>
public sealed record BackupRequest
{
    public required BlockNode Source { get; init; }

    /// <summary>Full path of the target image.</summary>
    public required string Target { get; init; }

    public BackupSyncMode Sync { get; init; } = BackupSyncMode.Full;

    public string? BitmapName { get; init; }

    public BitmapSyncMode? BitmapMode { get; init; }

    /// <summary>The previous backup, as the new target's backing file (as written into the image).</summary>
    public string? BackingFile { get; init; }

    public bool UseExistingTarget { get; init; }

    public ImageFormat TargetFormat { get; init; } = ImageFormat.Qcow2;

    /// <summary>Cluster size of a new qcow2 target; default 64 KiB.</summary>
    public int? ClusterSize { get; init; }

    /// <summary>Copy rate limit in bytes per second; 0 means no limit.</summary>
    public long BytesPerSecond { get; init; }

    public bool Compress { get; init; }

    /// <summary>How a new qcow2 target compresses (with <see cref="Compress"/>): deflate, or zstd (QEMU 5.1 and later read it).</summary>
    public Formats.Qcow2.Qcow2CompressionType Compression { get; init; } = Formats.Qcow2.Qcow2CompressionType.Deflate;

    public JobErrorAction OnSourceError { get; init; } = JobErrorAction.Report;

    public JobErrorAction OnTargetError { get; init; } = JobErrorAction.Report;

    public bool AutoFinalize { get; init; } = true;

    /// <summary>Copies in flight at once (each holds at most one 1 MiB buffer).</summary>
    public int Workers { get; init; } = 4;
}

/// <summary>A request after QEMU's checks: the bitmap found and the effective modes.</summary>
public sealed record ValidatedBackup(BackupRequest Request, BackupSyncMode Sync, DirtyBitmap? Bitmap, BitmapSyncMode? BitmapMode, bool RepairsBitmap = false)
{
    /// <summary>
    /// Check a request in the order QEMU's blockdev-backup does (do_backup_common, backup_job_create), each
    /// failure with its own error id. Nothing is changed.
    /// </summary>
    public static ValidatedBackup Check(BackupRequest r)
    {
        string node = r.Source.Name;
        BackupSyncMode sync = r.Sync;
        BitmapSyncMode? mode = r.BitmapMode;
        if (sync is BackupSyncMode.Bitmap or BackupSyncMode.Incremental && r.BitmapName is null)
            Throw.Block(ErrorIds.BitmapRequired, BlockErrorCategory.InvalidArgument,
                $"A backup of node '{node}' with -Sync {sync} needs a bitmap: give -Bitmap with the name of a bitmap of the node.", node);
        if (sync == BackupSyncMode.Incremental)
        {
            if (mode is not null and not BitmapSyncMode.OnSuccess)
                Throw.Block(ErrorIds.BitmapModeInvalid, BlockErrorCategory.InvalidArgument,
                    $"Bitmap mode must be OnSuccess when using -Sync Incremental (node '{node}', bitmap '{r.BitmapName}'); use -Sync Bitmap for other modes.", r.BitmapName);
            sync = BackupSyncMode.Bitmap;
            mode = BitmapSyncMode.OnSuccess;
        }
        DirtyBitmap? bitmap = null;
        bool repair = false;
        if (r.BitmapName is not null)
        {
            bitmap = r.Source.FindBitmap(r.BitmapName)
                ?? throw new BlockException(ErrorIds.BitmapNotFound, BlockErrorCategory.ObjectNotFound,
                    $"Bitmap '{r.BitmapName}' could not be found on node '{node}'.", r.BitmapName);
            if (mode is null)
                Throw.Block(ErrorIds.BitmapModeRequired, BlockErrorCategory.InvalidArgument,
                    $"Bitmap mode must be given when providing a bitmap ('{r.BitmapName}' on node '{node}'): -BitmapMode OnSuccess, Always or Never.", r.BitmapName);
            // The way back from an inconsistent bitmap: a full backup that resets it re-anchors it (QEMU refuses).
            repair = bitmap.Inconsistent && sync == BackupSyncMode.Full && mode is BitmapSyncMode.OnSuccess or BitmapSyncMode.Always;
            if (bitmap.Inconsistent && sync == BackupSyncMode.Bitmap && !bitmap.Busy)
                RefuseInconsistentIncremental(r, bitmap);
            bitmap.Check(repair ? BitmapUse.RefuseBusy : BitmapUse.AllowReadOnly);
            if (sync == BackupSyncMode.None)
                Throw.Block(ErrorIds.BitmapWithSyncNone, BlockErrorCategory.InvalidArgument,
                    $"-Sync None does not produce meaningful bitmap outputs (bitmap '{r.BitmapName}' on node '{node}').", r.BitmapName);
            if (mode == BitmapSyncMode.Never && sync != BackupSyncMode.Bitmap)
                Throw.Block(ErrorIds.BitmapModeNeverMeaningless, BlockErrorCategory.InvalidArgument,
                    $"Bitmap mode Never has no meaningful effect when combined with -Sync {sync} (bitmap '{r.BitmapName}' on node '{node}').", r.BitmapName);
            if (mode != BitmapSyncMode.Never)
                bitmap.Check(repair ? BitmapUse.RefuseBusy | BitmapUse.RefuseReadOnly : BitmapUse.Default);
        }
        else if (mode is not null)
        {
            Throw.Block(ErrorIds.BitmapModeWithoutBitmap, BlockErrorCategory.InvalidArgument,
                $"Cannot specify a bitmap mode without a bitmap (node '{node}').", node);
        }
        if (sync == BackupSyncMode.Bitmap && !r.UseExistingTarget && r.BackingFile is null)
            Throw.Block(ErrorIds.BackingFileRequired, BlockErrorCategory.InvalidArgument,
                $"An incremental backup of node '{node}' is written on top of the previous backup: give it with -BackingFile (or write into a prepared image with -UseExistingTarget).", node);
        if (sync == BackupSyncMode.Bitmap && r.TargetFormat == ImageFormat.Raw && !r.UseExistingTarget)
            Throw.Block(ErrorIds.BackingFileRequired, BlockErrorCategory.InvalidArgument,
                $"A raw image cannot have a backing file, so an incremental backup of node '{node}' must be qcow2.", node);
        string target = Path.GetFullPath(r.Target);
        if (string.Equals(target, r.Source.Path, StringComparison.Ordinal))
            Throw.Block(ErrorIds.SourceIsTarget, BlockErrorCategory.InvalidArgument, $"Source and target cannot be the same ('{target}' is node '{node}').", target);
        if (r.BytesPerSecond < 0)
            Throw.Block(ErrorIds.InvalidSpeed, BlockErrorCategory.InvalidArgument, $"-BytesPerSecond expects a non-negative value, not {r.BytesPerSecond}.", r.BytesPerSecond);
        return new ValidatedBackup(r with { Target = target }, sync, bitmap, mode, repair);
    }

    /// <summary>
    /// An incremental from an inconsistent bitmap would miss writes. The way back depends on what is known of the
    /// last backup: with a digest manifest, Update-DirtyBitmap rebuilds the bitmap by content and the chain goes on;
    /// without one, a full backup starts a new chain.
    /// </summary>
    private static void RefuseInconsistentIncremental(BackupRequest r, DirtyBitmap bitmap)
    {
        string? manifest = null;
        if (r.BackingFile is { } backing)
        {
            string folder = Path.GetDirectoryName(Path.GetFullPath(r.Target)) ?? ".";
            string candidate = Digests.DigestManifest.PathFor(Path.GetFullPath(Path.Combine(folder, backing)));
            if (File.Exists(candidate))
                manifest = candidate;
        }
        manifest ??= Digests.ManifestIndex.Find(r.Source.Path, bitmap.Name!) is { } known && File.Exists(known) ? known : null;
        string node = r.Source.Name;
        string way = manifest is not null
            ? $"Rebuild it from the last backup's digest manifest, then take the incremental: Update-DirtyBitmap -Node '{node}' -Name '{bitmap.Name}' -Manifest '{manifest}' (only what changed is copied; the chain goes on)."
            : $"No digest manifest of its last backup is known, so start a new chain with a full backup that re-anchors it: Start-IncrementalBackup -Sync Full -Bitmap '{bitmap.Name}' -BitmapMode OnSuccess; or remove it with Remove-DirtyBitmap.";
        Throw.Block(ErrorIds.BitmapInconsistent, BlockErrorCategory.InvalidOperation,
            $"Bitmap '{bitmap.Name}' on node '{node}' is inconsistent (it was not saved cleanly and may have missed writes) and cannot drive an incremental backup. {way}", bitmap.Name);
    }
}
