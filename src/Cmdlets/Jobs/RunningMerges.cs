using System.Collections.Concurrent;
using BitmapBackup.Core.Chains;

namespace BitmapBackup;

/// <summary>
/// Every chain merge the cmdlets have started in this process and that has not concluded, whatever runspace started it
/// and whether it runs as a job or in the foreground (-Wait): what the end of the session stops.
/// </summary>
internal static class RunningMerges
{
    private static readonly ConcurrentDictionary<ChainMerge, string> s_running = new();

    /// <summary>Follow a merge until it concludes; <paramref name="name"/> is what warnings call it.</summary>
    public static void Track(ChainMerge merge, string name)
    {
        s_running[merge] = name;
        merge.Completion.ContinueWith(_ => s_running.TryRemove(merge, out string? _), TaskScheduler.Default);
    }

    /// <summary>The merges running now, with their names.</summary>
    public static IReadOnlyList<(ChainMerge Merge, string Name)> Snapshot()
        => s_running.Where(e => !e.Key.Completion.IsCompleted).Select(e => (e.Key, e.Value)).ToArray();
}
