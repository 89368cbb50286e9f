using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Export;

namespace BitmapBackup;

/// <summary>Get-BlockExport: lists the NBD exports with their clients and counters.</summary>
[Cmdlet(VerbsCommon.Get, "BlockExport")]
[OutputType(typeof(BlockExportInfo))]
public sealed class GetBlockExportCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>Export names to get; wildcards allowed. All exports when omitted.</summary>
    [Parameter(Position = 0)]
    [SupportsWildcards]
    [ArgumentCompleter(typeof(ExportNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[]? Name { get; set; }

    /// <summary>Only the exports of these nodes: names or node objects.</summary>
    [Parameter(ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[]? Node { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        IReadOnlyList<BlockExport> exports = ExportRegistry.Default.Exports;
        if (Node is not null)
            exports = exports.Where(e => Node.Contains(e.Node.Name, StringComparer.Ordinal)).ToArray();
        foreach (string pattern in Name ?? ["*"])
        {
            var matcher = new NameMatcher(pattern);
            bool found = false;
            foreach (BlockExport export in exports.Where(e => matcher.IsMatch(e.Name)))
            {
                found = true;
                WriteObject(new BlockExportInfo(export));
            }
            if (!found && !matcher.IsPattern && Node is null)
                WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.ExportNotFound, BlockErrorCategory.ObjectNotFound, $"NBD export '{pattern}' not found.", pattern)));
        }
    }

    #endregion
}
