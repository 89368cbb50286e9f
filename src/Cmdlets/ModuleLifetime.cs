using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Closes every open node when the module is removed or the process exits through the normal path, so data is
/// flushed and (later) persistent bitmaps are stored.
/// </summary>
public sealed class ModuleLifetime : IModuleAssemblyInitializer, IModuleAssemblyCleanup
{
    private static int s_hooked;

    public void OnImport()
    {
        if (Interlocked.Exchange(ref s_hooked, 1) == 0)
            AppDomain.CurrentDomain.ProcessExit += (_, _) => BlockEngine.Default.CloseAll();
    }

    public void OnRemove(PSModuleInfo psModuleInfo) => BlockEngine.Default.CloseAll();
}
