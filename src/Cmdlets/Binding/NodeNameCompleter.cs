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
        => CompletionText.Results(BlockEngine.Default.Nodes.Select(n => (n.Name, $"{n.Name}: {n.Path}")), commandName, parameterName, wordToComplete);
}
