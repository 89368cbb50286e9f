using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Export;

namespace BitmapBackup;

/// <summary>
/// Stop-BlockExport: ends NBD exports. The requests in flight finish and are answered, then the clients are
/// disconnected, the exported bitmaps are released and the node can be closed.
/// </summary>
[Cmdlet(VerbsLifecycle.Stop, "BlockExport", SupportsShouldProcess = true)]
[OutputType(typeof(void))]
public sealed class StopBlockExportCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The exports to stop: names or export objects.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockExportTransformation]
    [ArgumentCompleter(typeof(ExportNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[] Name { get; set; } = null!;

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        foreach (string name in Name)
        {
            if (ExportRegistry.Default.Find(name) is not BlockExport export)
            {
                WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.ExportNotFound, BlockErrorCategory.ObjectNotFound, $"NBD export '{name}' not found.", name)));
                continue;
            }
            if (!ShouldProcess($"NBD export '{export.Name}' of node '{export.Node.Name}' ({export.Uri})", "Stop NBD export"))
                continue;
            int clients = ExportRegistry.Default.Stop(export);
            WriteVerbose($"NBD export '{export.Name}' stopped; {clients} client(s) were disconnected after their requests in flight were answered.");
        }
    }

    #endregion
}
