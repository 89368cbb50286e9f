namespace BitmapBackup.Core.Testing;

/// <summary>
/// A test-only hook: named instants of a multi-step file operation (a chain merge's copy, switch and clean-up) where
/// a test wants the process to be killed. <see cref="PauseAt"/> makes the operation stop at one of them: it writes a
/// marker file there and then blocks, so that a test waiting for the marker kills the process (kill -9) at exactly that
/// instant. With no pause set, reaching a point is one volatile read.
/// </summary>
public static class CrashPoints
{
    private static volatile Pause? s_pause;

    /// <summary>Stop at <paramref name="point"/>: write <paramref name="markerPath"/> (the point's name) and block until the process dies.</summary>
    public static void PauseAt(string point, string markerPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(point);
        ArgumentException.ThrowIfNullOrEmpty(markerPath);
        s_pause = new Pause(point, markerPath);
    }

    public static void Clear() => s_pause = null;

    /// <summary>Called by the engine at each named instant.</summary>
    internal static void Reached(string point)
    {
        Pause? pause = s_pause;
        if (pause is null || pause.Point != point)
            return;
        File.WriteAllText(pause.MarkerPath, point);
        Thread.Sleep(Timeout.Infinite);
    }

    private sealed record Pause(string Point, string MarkerPath);
}
