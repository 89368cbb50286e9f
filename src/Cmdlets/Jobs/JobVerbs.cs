using System.ComponentModel;

namespace BitmapBackup;

/// <summary>What the module's Job2 classes (backups and merges) share for their asynchronous verbs.</summary>
internal static class JobVerbs
{
    /// <summary>
    /// Run a verb on the thread pool and always raise its completion event (without it Stop-Job and
    /// Remove-Job -Force wait forever).
    /// </summary>
    public static void RunAsync(Action verb, Action<AsyncCompletedEventArgs> completed)
        => Task.Run(() =>
        {
            Exception? error = null;
            try
            {
                verb();
            }
            catch (Exception e)
            {
                error = e;
            }
            completed(new AsyncCompletedEventArgs(error, false, null));
        });
}
