using System.Collections.Concurrent;

namespace BitmapBackup.Core.Errors;

/// <summary>
/// Warnings the engine has for the user outside any error: something it goes on without (image locks a file
/// system refuses). Each is posted once under a key; the cmdlets write the pending ones as PowerShell warnings
/// after their engine calls (whichever cmdlet runs next, if the one that caused it has ended).
/// </summary>
public static class EngineWarnings
{
    private static readonly ConcurrentDictionary<string, byte> s_posted = new(StringComparer.Ordinal);
    private static readonly ConcurrentQueue<string> s_pending = new();

    /// <summary>Queue <paramref name="message"/> unless a warning with <paramref name="key"/> was posted before in this process.</summary>
    public static void PostOnce(string key, string message)
    {
        if (s_posted.TryAdd(key, 0))
            s_pending.Enqueue(message);
    }

    /// <summary>Take the warnings not written yet, oldest first.</summary>
    public static IReadOnlyList<string> TakePending()
    {
        var taken = new List<string>();
        while (s_pending.TryDequeue(out string? message))
            taken.Add(message);
        return taken;
    }
}
