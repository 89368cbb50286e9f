using System.Diagnostics;

namespace BitmapBackup.Core.Jobs;

/// <summary>
/// Limits a copy to a number of bytes per second, as QEMU's ratelimit: each request books its share of time
/// after the previous bookings and waits until its slot starts. Zero means no limit. Thread-safe.
/// </summary>
internal sealed class RateLimiter(long bytesPerSecond)
{
    private readonly Lock _lock = new();
    private long _nextFreeTicks = Stopwatch.GetTimestamp();

    public long BytesPerSecond { get; set; } = bytesPerSecond;

    public void Wait(long bytes, CancellationToken cancel)
    {
        long rate = BytesPerSecond;
        if (rate <= 0)
            return;
        long now = Stopwatch.GetTimestamp();
        long start;
        lock (_lock)
        {
            start = Math.Max(now, _nextFreeTicks);
            _nextFreeTicks = start + (long)((double)bytes / rate * Stopwatch.Frequency);
        }
        TimeSpan delay = Stopwatch.GetElapsedTime(now, start);
        if (delay > TimeSpan.Zero)
            cancel.WaitHandle.WaitOne(delay);
    }
}
