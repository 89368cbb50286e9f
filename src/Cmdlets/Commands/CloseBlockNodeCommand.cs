using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Close-BlockNode: flushes and closes a node; its non-persistent bitmaps end with it.</summary>
[Cmdlet(VerbsCommon.Close, "BlockNode", SupportsShouldProcess = true)]
[OutputType(typeof(void))]
public sealed class CloseBlockNodeCommand : BitmapBackupCmdlet
{
    #region Parameters

    /// <summary>The nodes to close: names or node objects.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[] Node { get; set; } = null!;

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        foreach (string name in Node)
        {
            if (ResolveNode(name) is not BlockNode node || !ShouldProcess(node.Name, "Close block node"))
                continue;
            var dropped = node.Bitmaps.Where(b => !b.Persistent).Select(b => $"'{b.Name}' ({b.Count} dirty bytes)").ToArray();
            if (TryRun(() => Engine.Close(node)) && dropped.Length > 0)
                WriteWarning($"Node '{node.Name}' closed; its bitmaps {string.Join(", ", dropped)} were not persistent and are gone.");
        }
    }

    #endregion
}
