using System.Collections;
using System.Management.Automation;
using System.Management.Automation.Language;
using BitmapBackup.Core.Bitmaps;
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
        WildcardPattern pattern = NameMatcher.Completion(wordToComplete);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (BlockNode node in nodes)
        {
            foreach (DirtyBitmap bitmap in node.Bitmaps)
            {
                string name = bitmap.Name!;
                if (pattern.IsMatch(name) && seen.Add(name))
                {
                    string text = name.Any(char.IsWhiteSpace) || name.Contains('\'') ? $"'{name.Replace("'", "''")}'" : name;
                    yield return new CompletionResult(text, name, CompletionResultType.ParameterValue, $"{node.Name}/{name}");
                }
            }
        }
    }
}
