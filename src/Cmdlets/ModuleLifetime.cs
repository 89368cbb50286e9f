using System.Diagnostics;
using System.Management.Automation;
using System.Management.Automation.Host;
using System.Management.Automation.Runspaces;
using Microsoft.PowerShell.Commands;

namespace BitmapBackup;

/*
 * Nodes and backups belong to the process (one engine, BlockEngine.Default), not to the runspace that imported the
 * module. So:
 *
 * - Removal: PowerShell calls OnImport on every import into a runspace (not again for an import of a module already
 *   imported there) and OnRemove on every Remove-Module; a runspace that closes calls neither (verified on pwsh 7.6
 *   with ForEach-Object -Parallel and Start-ThreadJob). Import-Module -Force calls OnImport again, and OnRemove before
 *   it only when the assembly is the root module: the cmdlets are the manifest's nested module (the root module is
 *   the DSC resources' script), for which it does not. So each runspace that has the module imported is remembered
 *   once, however many OnImports it saw; it is forgotten when its module is removed or when it closes, and only the
 *   last removal in the process stops the NBD exports (drained, then disconnected, as Stop-BlockExport does), then closes the nodes, with Close-BlockNode's warning for the non-persistent bitmaps that
 *   end with them. A removal inside Import-Module -Force (seen on the call stack) is a reload, not a removal.
 * - Exit: the PowerShell.Exiting engine event of the host's own runspace runs when pwsh -File ends, on exit, and when
 *   -Command ends, while the host can still show warnings; AppDomain.ProcessExit runs for [Environment]::Exit and
 *   for anything else, after the runspace is gone, with only stderr left. Both run SessionEnd: the backups are
 *   stopped (bounded), the nodes closed, and each stopped backup named in a warning.
 */

/// <summary>The module's lifetime hooks: import and removal per runspace, and the end of the process.</summary>
public sealed class ModuleLifetime : IModuleAssemblyInitializer, IModuleAssemblyCleanup
{
    private static readonly Lock s_lock = new();
    private static readonly HashSet<Runspace> s_importers = new();
    private static readonly HashSet<Runspace> s_followed = new();
    private static int s_processExitHooked;
    private static int s_importsWithoutRunspace;

    public void OnImport()
    {
        if (Interlocked.Exchange(ref s_processExitHooked, 1) == 0)
            AppDomain.CurrentDomain.ProcessExit += (_, _) => WriteToStandardError(SessionEnd.Run());
        Runspace? runspace = Runspace.DefaultRunspace;
        lock (s_lock)
        {
            if (runspace is null)
            {
                s_importsWithoutRunspace++;
                return;
            }
            s_importers.Add(runspace);
            if (!s_followed.Add(runspace))
                return;
        }
        Follow(runspace);
    }

    public void OnRemove(PSModuleInfo psModuleInfo)
    {
        if (!RemoveImporter(Runspace.DefaultRunspace) || IsReload())
            return;
        var warnings = new List<string>(SessionEnd.StopExports(SessionEnd.StopTimeout));
        foreach (Core.Nodes.BlockNode node in BitmapBackupCmdlet.Engine.Nodes)
        {
            try
            {
                if (NodeClosing.Close(BitmapBackupCmdlet.Engine, node) is { } dropped)
                    warnings.Add(dropped);
            }
            catch (Core.Errors.BlockException e)
            {
                warnings.Add($"Node '{node.Name}' stays open after the module's removal: {e.Message}");
            }
        }
        if (warnings.Count > 0)
            ScriptBlock.Create("param([string[]] $Warnings) foreach ($w in $Warnings) { Write-Warning -Message $w }").Invoke([warnings.ToArray()]);
    }

    /// <summary>Forget a runspace's import; true when no runspace of the process has the module imported any more.</summary>
    private static bool RemoveImporter(Runspace? runspace)
    {
        lock (s_lock)
        {
            bool known = runspace is not null && s_importers.Remove(runspace);
            if (!known && s_importsWithoutRunspace > 0)
                s_importsWithoutRunspace--;
            return s_importers.Count == 0 && s_importsWithoutRunspace == 0;
        }
    }

    /// <summary>Forget a runspace's imports when it closes; end the session when it is the host's own runspace.</summary>
    private static void Follow(Runspace runspace)
    {
        runspace.StateChanged += (_, e) =>
        {
            if (e.RunspaceStateInfo.State is RunspaceState.Closed or RunspaceState.Broken)
            {
                lock (s_lock)
                {
                    s_importers.Remove(runspace);
                    s_followed.Remove(runspace);
                }
            }
        };
        if (HostOf(runspace) is not { } host)
            return;
        // Raised on the thread that closes the runspace, where no script can run any more: the host still writes.
        runspace.Events.SubscribeEvent(null, null, PSEngineEvent.Exiting, null, (_, _) => WriteToHost(host, SessionEnd.Run()),
            supportEvent: true, forwardEvent: false);
    }

    /// <summary>
    /// The host of the runspace when the runspace is the host's interactive one (pwsh's own), whose end is the end
    /// of the session; null for the runspaces of ForEach-Object -Parallel and thread jobs, which close on their
    /// own while the session goes on, and for a host without an interactive runspace.
    /// </summary>
    private static PSHost? HostOf(Runspace runspace)
    {
        try
        {
            // On the importing pipeline's thread: $Host is the runspace's host.
            return ScriptBlock.Create("$Host").Invoke() is [{ BaseObject: PSHost host }]
                   && host is IHostSupportsInteractiveSession { Runspace: { } own } && own.InstanceId == runspace.InstanceId
                ? host
                : null;
        }
        catch (Exception e) when (e is NotImplementedException or NotSupportedException or PSNotImplementedException or RuntimeException or InvalidOperationException)
        {
            return null; // no interactive runspace (PSNotImplementedException), or no script can run here
        }
    }

    /// <summary>Whether this removal is Import-Module -Force reloading the module (it imports it again at once).</summary>
    private static bool IsReload()
        => new StackTrace().GetFrames().Any(f => f.GetMethod()?.DeclaringType is { } type
                                                 && (type == typeof(ImportModuleCommand) || type.DeclaringType == typeof(ImportModuleCommand)));

    private static void WriteToHost(PSHost host, IReadOnlyList<string> warnings)
    {
        try
        {
            foreach (string warning in warnings)
                host.UI.WriteWarningLine(warning);
        }
        catch (Exception e) when (e is IOException or InvalidOperationException or NotImplementedException or PSNotImplementedException)
        {
            WriteToStandardError(warnings);
        }
    }

    private static void WriteToStandardError(IReadOnlyList<string> warnings)
    {
        foreach (string warning in warnings)
            Console.Error.WriteLine("WARNING: " + warning);
        Console.Error.Flush();
    }
}
