using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup;

/// <summary>
/// Set-DirtyBitmap: changes a property of an existing bitmap that QEMU fixes at creation, keeping its bits. Today
/// that is -CrashSafe: an existing persistent bitmap starts (or stops) being protected by the node's write-intent log
/// without being removed and added again, which would lose the writes it recorded and force a full backup.
/// </summary>
[Cmdlet(VerbsCommon.Set, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(DirtyBitmapInfo))]
public sealed class SetDirtyBitmapCommand : DirtyBitmapCommandBase
{
    #region Parameters

    /// <summary>Crash-safe (-CrashSafe) or a plain persistent bitmap again (-CrashSafe:$false); not given: unchanged.</summary>
    [Parameter]
    public SwitchParameter CrashSafe { get; set; }

    /// <summary>Write the bitmap after the change.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        if (MyInvocation.BoundParameters.ContainsKey(nameof(CrashSafe)))
        {
            string action = CrashSafe ? "Make dirty bitmap crash-safe (write-intent log)" : "Stop logging dirty bitmap's writes (no longer crash-safe)";
            if (!ShouldProcess(bitmap.ToString(), action))
                return;
            bool changed = false;
            if (!TryRun(() => changed = bitmap.Node.SetCrashSafe(bitmap, CrashSafe.IsPresent)))
                return;
            WriteVerbose(changed
                ? $"Bitmap '{bitmap.Name}' of node '{bitmap.Node.Name}' is {(CrashSafe ? "crash-safe now: its write-intent log lists it" : "no longer crash-safe: after a crash it loads inconsistent")}."
                : $"Bitmap '{bitmap.Name}' of node '{bitmap.Node.Name}' is {(CrashSafe ? "already" : "already not")} crash-safe: nothing changed.");
        }
        if (PassThru)
            WriteObject(new DirtyBitmapInfo(bitmap));
    }

    #endregion
}
