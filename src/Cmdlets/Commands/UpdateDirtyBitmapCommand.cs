using System.Diagnostics;
using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Digests;

namespace BitmapBackup;

/// <summary>
/// Update-DirtyBitmap: reads the node, compares every cluster with the digest manifest of the bitmap's last backup,
/// and marks the clusters that differ. Rebuilds an inconsistent bitmap (after a crash) so that the chain goes on with
/// an incremental backup instead of a full one.
/// </summary>
[Cmdlet(VerbsData.Update, "DirtyBitmap", SupportsShouldProcess = true)]
[OutputType(typeof(BitmapUpdateResult))]
public sealed class UpdateDirtyBitmapCommand : DirtyBitmapCommandBase
{
    private static readonly TimeSpan ProgressInterval = TimeSpan.FromMilliseconds(250);
    private readonly CancellationTokenSource _stop = new();

    #region Parameters

    /// <summary>The digest manifest of the bitmap's last backup; by default the one that backup recorded.</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? Manifest { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        string? manifest = Manifest is null ? null : ResolveFilePath(Manifest);
        bool act = ShouldProcess(bitmap.ToString(), "Mark the clusters that differ from the last backup's digest manifest", "Update dirty bitmap", out ShouldProcessReason reason);
        if (!act && reason != ShouldProcessReason.WhatIf)
            return;
        var progress = new ProgressRecord(1, $"Update-DirtyBitmap {bitmap}", "Comparing with the last backup");
        var clock = Stopwatch.StartNew();
        long size = bitmap.Node.Size;
        TryRun(() =>
        {
            BitmapContentUpdateResult result = BitmapContentUpdate.Run(bitmap.Node, bitmap, manifest, whatIf: !act, scanned =>
            {
                if (clock.Elapsed < ProgressInterval)
                    return;
                clock.Restart();
                progress.PercentComplete = (int)(scanned * 100 / Math.Max(1, size));
                progress.StatusDescription = $"{scanned:N0} of {size:N0} bytes compared";
                WriteProgress(progress);
            }, _stop.Token);
            progress.RecordType = ProgressRecordType.Completed;
            WriteProgress(progress);
            if (!act)
                WriteVerbose($"What if: {result.Scan.ClustersDiffering} clusters ({result.BytesDiffering} bytes) of '{bitmap}' differ from '{result.Manifest}' and would be marked.");
            WriteObject(new BitmapUpdateResult(result));
        });
    }

    protected override void StopProcessing() => _stop.Cancel();

    #endregion
}
