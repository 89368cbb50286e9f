using System.Collections.Concurrent;
using BitmapBackup.Core.Jobs;

namespace BitmapBackup;

/// <summary>
/// Every backup the cmdlets have started in this process and that has not concluded, whatever runspace started it
/// and whether it runs as a job or in the foreground (-Wait): what the end of the session stops.
/// </summary>
internal static class RunningBackups
{
    private static readonly ConcurrentDictionary<BackupJob, string> s_running = new();

    /// <summary>Follow a job until it concludes; <paramref name="name"/> is what warnings call it (the PowerShell job's name).</summary>
    public static void Track(BackupJob job, string name)
    {
        s_running[job] = name;
        job.Completion.ContinueWith(_ => s_running.TryRemove(job, out string? _), TaskScheduler.Default);
    }

    /// <summary>The jobs running now, with their names.</summary>
    public static IReadOnlyList<(BackupJob Job, string Name)> Snapshot()
        => s_running.Where(e => !e.Key.Completion.IsCompleted).Select(e => (e.Key, e.Value)).ToArray();
}
