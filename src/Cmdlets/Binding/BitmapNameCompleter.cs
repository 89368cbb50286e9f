using System.Collections;
using System.Management.Automation;
using System.Management.Automation.Language;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Tab completion of bitmap names: those of the -Node already given, else of every open node.</summary>
internal sealed class BitmapNameCompleter : IArgumentCompleter
{
    public IEnumerable<CompletionResult> CompleteArgument(string commandName, string parameterName, string wordToComplete,
        CommandAst commandAst, IDictionary fakeBoundParameters)
    {
        IEnumerable<BlockNode> nodes = BlockEngine.Default.Nodes;
        if (fakeBoundParameters["Node"] is { } bound && BlockNodeTransformationAttribute.ToName(bound) is string nodeName)
            nodes = nodes.Where(n => n.Name == nodeName);
        var candidates = nodes.SelectMany(node => node.Bitmaps.Select(b => (b.Name!, $"{node.Name}/{b.Name}")));
        return CompletionText.Results(candidates, commandName, parameterName, wordToComplete);
    }
}
