using System.Collections;
using System.Management.Automation;
using System.Management.Automation.Language;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Tab completion of open node names.</summary>
internal sealed class NodeNameCompleter : IArgumentCompleter
{
    public IEnumerable<CompletionResult> CompleteArgument(string commandName, string parameterName, string wordToComplete,
        CommandAst commandAst, IDictionary fakeBoundParameters)
    {
        WildcardPattern pattern = NameMatcher.Completion(wordToComplete);
        foreach (BlockNode node in BlockEngine.Default.Nodes)
        {
            if (pattern.IsMatch(node.Name))
                yield return new CompletionResult(node.Name, node.Name, CompletionResultType.ParameterValue, $"{node.Name}: {node.Path}");
        }
    }
}
