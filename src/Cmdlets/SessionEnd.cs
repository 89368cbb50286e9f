using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Export;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/*
 * What the end of the PowerShell session does to the module's process-wide state, the way PowerShell stops a
 * session's jobs when it ends:
 *
 * 0. Every NBD export is stopped as Stop-BlockExport stops it, all at once: the requests in flight finish and are
 *    answered (within StopTimeout in all), then the clients are disconnected and the exported bitmaps released.
 *    Each export that still had clients is named in a warning.
 * 1. Every running backup is cancelled as Stop-Job cancels it (QEMU's job-cancel: its bitmap takes back every
 *    dirty bit, the new target's .partial file is deleted), and every running chain merge is stopped as Stop-Job
 *    stops it (before its switch: the merged image is deleted, the chain is as it was; after: it finishes), all at
 *    once, and awaited for at most StopTimeout in all (5 seconds per process, not per job).
 * 2. Every node is closed: persistent bitmaps stored with their bits, the image flushed and released. A node
 *    whose backup did not stop in time is left as it is: closing it would wait for that job's I/O, and a wedged
 *    job must not hold the exit. Its persistent bitmaps then load inconsistent, which is what they are.
 * 3. The returned warnings name each backup stopped, each that did not stop, and each node that could not be
 *    closed. Non-persistent bitmaps end with the process, as documented, without a warning.
 *
 * It may run twice (the PowerShell.Exiting event, then AppDomain.ProcessExit): the second run finds only what
 * appeared since, and does not wait again for a backup it gave up on.
 */

/// <summary>Stops the process's backups and closes its nodes when PowerShell exits.</summary>
internal static class SessionEnd
{
    /// <summary>How long the end of the session waits, in all, for the cancelled backups to conclude.</summary>
    public static readonly TimeSpan StopTimeout = TimeSpan.FromSeconds(5);

    private static readonly Lock s_lock = new();
    private static readonly HashSet<BackupJob> s_givenUp = new();

    /// <summary>Stop the backups, close the nodes; the warnings to show.</summary>
    public static IReadOnlyList<string> Run()
    {
        lock (s_lock)
        {
            var warnings = new List<string>(StopExports(StopTimeout));
            var running = RunningBackups.Snapshot().Where(r => !s_givenUp.Contains(r.Job)).ToArray();
            var merges = RunningMerges.Snapshot();
            foreach ((BackupJob job, _) in running)
                job.Cancel();
            foreach ((Core.Chains.ChainMerge merge, _) in merges)
                merge.Cancel();
            Task.WaitAll([.. running.Select(r => r.Job.Completion), .. merges.Select(m => m.Merge.Completion)], StopTimeout);
            foreach ((Core.Chains.ChainMerge merge, string name) in merges)
            {
                if (!merge.Completion.IsCompleted)
                    warnings.Add($"Merge job '{name}' of the chain of '{merge.TopPath}' did not stop within {StopTimeout.TotalSeconds:0} seconds of PowerShell exiting; the chain stays restorable (the old chain or the merged one), and the next Merge-BackupChain of it finishes or drops what this one left.");
                else if (merge.Error?.ErrorId == ErrorIds.MergeCancelled)
                    warnings.Add($"Merge job '{name}' of the chain of '{merge.TopPath}' was stopped because PowerShell is exiting: the chain is as it was.");
                else if (merge.Error is { } failed)
                    warnings.Add($"Merge job '{name}' of the chain of '{merge.TopPath}' failed as PowerShell exited: {failed.Message}");
            }
            var leftOpen = new HashSet<BlockNode>(s_givenUp.Select(j => j.Source));
            foreach ((BackupJob job, string name) in running)
            {
                if (!job.Completion.IsCompleted)
                {
                    s_givenUp.Add(job);
                    leftOpen.Add(job.Source);
                    warnings.Add($"Backup job '{name}' (node '{job.Source.Name}') did not stop within {StopTimeout.TotalSeconds:0} seconds of PowerShell exiting: "
                        + $"node '{job.Source.Name}' is left as it is, so its persistent bitmaps will load inconsistent, and what it wrote ('{job.TargetPath}.partial', or '{job.TargetPath}' "
                        + "with -UseExistingTarget) may be left behind.");
                }
                else if (StoppedWarning(job, name) is { } stopped)
                {
                    warnings.Add(stopped);
                }
            }
            foreach (BlockNode node in BitmapBackupCmdlet.Engine.Nodes.Where(n => !leftOpen.Contains(n)))
            {
                try
                {
                    BitmapBackupCmdlet.Engine.Close(node);
                }
                catch (Exception e) when (e is BlockException or IOException or UnauthorizedAccessException)
                {
                    warnings.Add($"Node '{node.Name}' could not be closed as PowerShell exits: {e.Message}");
                }
            }
            return warnings;
        }
    }

    /// <summary>Stop every NBD export (drain, then disconnect); the warnings naming those that had clients.</summary>
    public static IReadOnlyList<string> StopExports(TimeSpan drainTimeout)
    {
        var warnings = new List<string>();
        foreach ((BlockExport export, int clients) in ExportRegistry.Default.StopAll(drainTimeout))
        {
            if (clients > 0)
                warnings.Add($"NBD export '{export.Name}' (node '{export.Node.Name}') was stopped: its {clients} client(s) were disconnected after their requests in flight were answered.");
        }
        return warnings;
    }

    /// <summary>The warning for a backup that concluded after the cancel, or null if it succeeded meanwhile.</summary>
    private static string? StoppedWarning(BackupJob job, string name)
    {
        BlockException? error = job.Error;
        if (error is null)
            return null;
        string what = $"Backup job '{name}' (node '{job.Source.Name}' to '{job.TargetPath}')";
        if (error.ErrorId != ErrorIds.BackupCancelled)
            return $"{what} failed as PowerShell exited: {error.Message}";
        string bits = job.Bitmap is null ? string.Empty
            : job.KeptPartialTarget is { } kept
                ? $"; with -BitmapMode Always the clusters it copied are no longer dirty in bitmap '{job.Bitmap.Name}' and are kept in '{kept}'"
                : $"; bitmap '{job.Bitmap.Name}' keeps every dirty bit";
        return $"{what} was stopped because PowerShell is exiting: no backup was written{bits}.";
    }
}
