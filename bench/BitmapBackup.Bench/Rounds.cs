using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// One contender of a side-by-side metric: untimed set-up, a timed body that returns its own elapsed seconds
/// (a Stopwatch around our code, or a child process's wall time), untimed clean-up.
/// </summary>
internal sealed class Contender(string label, Func<double> timed, Action? setup = null, Action? cleanup = null)
{
    public string Label { get; } = label;

    public List<double> Samples { get; } = [];

    public double Median => BenchSupport.Median(Samples);

    public void RunOnce()
    {
        setup?.Invoke();
        Settle(); // earlier dirty pages are not written back inside this timing (and, cold, the cache is dropped)
        Samples.Add(timed());
        cleanup?.Invoke();
    }
}

internal static class Rounds
{
    /// <summary>
    /// Run every contender once per round, in a new (seeded) random order each round, so that neither a slow phase
    /// of the shared machine nor the state the previous contender leaves (e.g. a 1 GiB file just deleted, whose
    /// discards are still running) always favours the same one. Ratios are then taken per round.
    /// </summary>
    public static void Run(IReadOnlyList<Contender> contenders, int rounds)
    {
        var random = new Random(contenders.Count * 7919 + rounds);
        for (int r = 0; r < rounds; r++)
        {
            Contender[] order = [.. contenders];
            random.Shuffle(order);
            foreach (Contender c in order)
                c.RunOnce();
        }
    }
}
