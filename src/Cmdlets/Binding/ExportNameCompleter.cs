using System.Collections;
using System.Management.Automation;
using System.Management.Automation.Language;
using BitmapBackup.Core.Export;

namespace BitmapBackup;

/// <summary>Tab completion of the names of running NBD exports.</summary>
internal sealed class ExportNameCompleter : IArgumentCompleter
{
    public IEnumerable<CompletionResult> CompleteArgument(string commandName, string parameterName, string wordToComplete,
        CommandAst commandAst, IDictionary fakeBoundParameters)
        => CompletionText.Results(ExportRegistry.Default.Exports.Select(e => (e.Name, $"{e.Name}: node {e.Node.Name} at {e.Uri}")), commandName, parameterName, wordToComplete);
}
