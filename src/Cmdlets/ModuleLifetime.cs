using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Closes every open node when the module is removed or the process exits through the normal path, so data is
/// flushed and persistent bitmaps are stored. Backups still running are cancelled first, as QEMU cancels its jobs
/// (job_cancel_sync_all) before it closes its block devices at exit: a node under a backup cannot be closed, so
/// without the cancel its data would not be synced, its bitmaps would stay in use (inconsistent at the next open) and
/// the backup's partial target would stay behind.
/// </summary>
public sealed class ModuleLifetime : IModuleAssemblyInitializer, IModuleAssemblyCleanup
{
    private static int s_hooked;

    public void OnImport()
    {
        if (Interlocked.Exchange(ref s_hooked, 1) == 0)
            AppDomain.CurrentDomain.ProcessExit += (_, _) => Shutdown();
    }

    public void OnRemove(PSModuleInfo psModuleInfo) => Shutdown();

    private static void Shutdown()
    {
        BackupJobSourceAdapter.CancelRunning(BackupPSJob.StopTimeout);
        BlockEngine.Default.CloseAll();
    }
}
