namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>Bounded polling: wait for a condition that another thread makes true, failing with what was awaited.</summary>
public static class Wait
{
    public static void Until(Func<bool> condition, string what, double timeoutSeconds = 30)
    {
        DateTime deadline = DateTime.UtcNow.AddSeconds(timeoutSeconds);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"Still waiting after {timeoutSeconds} s for: {what}.");
            Thread.Sleep(5);
        }
    }
}
