using System.Management.Automation;
using System.Management.Automation.Language;
using System.Reflection;
using System.Text;

namespace BitmapBackup;

/*
 * How every completer of the module writes a name on the command line, so that PowerShell reads it back as exactly
 * that name (node, bitmap, job: all go through Results).
 *
 * PowerShell's own completers (CompletionHelpers.CompletionRequiresQuotes) tokenize the text alone and quote it when
 * it is not one token or holds '$' or '`'. That misses texts that are one token alone but not one argument: '#x'
 * is a comment, '@x' a splat, '1kb' and '0x10' are numbers. So the text is parsed where a completion lands, as the
 * argument of a command, and stays bare only when the parser reads it back as one bare word whose value is the name
 * itself, with no '$' or '`' in it. Anything else (variables, ';' and ',', groups, splats, comments, escapes, quotes
 * of any kind, '&', '|', '<', '>', a leading '-', numbers, blanks) is single-quoted with its single quotes doubled
 * (CodeGeneration.EscapeSingleQuotedStringContent, which knows PowerShell's four single-quote characters), as
 * PowerShell's completers do. A word the user began with a quote keeps that quote: a double-quoted completion
 * escapes '`', '$' and the double quotes with a backtick.
 *
 * On a parameter that takes wildcards ([SupportsWildcards]) the wildcard characters of a name are escaped
 * (WildcardPattern.Escape) before quoting, so the completion matches only the name it shows.
 */

/// <summary>The completion rule of the module: which names match what was typed, and how each is written.</summary>
internal static class CompletionText
{
    private const string SingleQuotes = "'\u2018\u2019\u201A\u201B";
    private const string DoubleQuotes = "\"\u201C\u201D\u201E";

    private static readonly Lazy<Dictionary<string, Type>> s_cmdlets = new(FindCmdlets);

    /// <summary>
    /// Completion results for the candidates whose name starts with what was typed (case-insensitive, taken
    /// literally), in the order given, each name once.
    /// </summary>
    public static IEnumerable<CompletionResult> Results(IEnumerable<(string Name, string ToolTip)> candidates, string commandName,
        string parameterName, string wordToComplete)
    {
        (string prefix, char? quote) = Typed(wordToComplete);
        var pattern = WildcardPattern.Get(WildcardPattern.Escape(prefix) + "*", WildcardOptions.IgnoreCase);
        bool wildcards = TakesWildcards(commandName, parameterName);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach ((string name, string toolTip) in candidates)
        {
            if (pattern.IsMatch(name) && seen.Add(name))
                yield return new CompletionResult(For(name, quote, wildcards), name, CompletionResultType.ParameterValue, toolTip);
        }
    }

    /// <summary>The text that stands for <paramref name="name"/> as a command argument.</summary>
    /// <param name="name">The name.</param>
    /// <param name="quote">The quote the user began the word with, or null.</param>
    /// <param name="wildcards">Whether the parameter reads its argument as a wildcard pattern.</param>
    public static string For(string name, char? quote = null, bool wildcards = false)
    {
        string text = wildcards && WildcardPattern.ContainsWildcardCharacters(name) ? WildcardPattern.Escape(name) : name;
        if (quote is char q && DoubleQuotes.Contains(q))
            return '"' + EscapeDoubleQuoted(text) + '"';
        if (quote is null && IsBareWord(text))
            return text;
        return "'" + CodeGeneration.EscapeSingleQuotedStringContent(text) + "'";
    }

    /// <summary>Whether the parser reads the text, as a command argument, as one bare word that is the text itself.</summary>
    public static bool IsBareWord(string text)
    {
        if (text.Length == 0 || text.AsSpan().ContainsAny('$', '`'))
            return false;
        ScriptBlockAst ast = Parser.ParseInput("Invoke-Completion " + text, out _, out ParseError[] errors);
        return errors.Length == 0
               && ast.BeginBlock is null && ast.ProcessBlock is null && ast.ParamBlock is null
               && ast.EndBlock.Statements is [PipelineAst { PipelineElements: [CommandAst { Redirections.Count: 0 } command] }]
               && command.CommandElements is [_, StringConstantExpressionAst { StringConstantType: StringConstantType.BareWord } word]
               && string.Equals(word.Value, text, StringComparison.Ordinal);
    }

    /// <summary>What the user typed, without its opening quote (and closing one) and quoting escapes; and that quote.</summary>
    internal static (string Prefix, char? Quote) Typed(string wordToComplete)
    {
        if (wordToComplete.Length == 0)
            return (wordToComplete, null);
        char first = wordToComplete[0];
        bool single = SingleQuotes.Contains(first);
        if (!single && !DoubleQuotes.Contains(first))
            return (wordToComplete, null);
        string inner = wordToComplete[1..];
        string family = single ? SingleQuotes : DoubleQuotes;
        if (inner.Length > 0 && family.Contains(inner[^1]) && !(single && EndsWithDoubledQuote(inner)))
            inner = inner[..^1];
        return (single ? UndoubleSingleQuotes(inner) : Unescape(inner), first);
    }

    private static bool EndsWithDoubledQuote(string inner)
    {
        int run = 0;
        for (int i = inner.Length - 1; i >= 0 && SingleQuotes.Contains(inner[i]); i--)
            run++;
        return run % 2 == 0;
    }

    private static string UndoubleSingleQuotes(string text)
    {
        var sb = new StringBuilder(text.Length);
        for (int i = 0; i < text.Length; i++)
        {
            sb.Append(text[i]);
            if (SingleQuotes.Contains(text[i]) && i + 1 < text.Length && SingleQuotes.Contains(text[i + 1]))
                i++;
        }
        return sb.ToString();
    }

    private static string Unescape(string text)
    {
        var sb = new StringBuilder(text.Length);
        for (int i = 0; i < text.Length; i++)
        {
            if (text[i] == '`' && i + 1 < text.Length)
                i++;
            sb.Append(text[i]);
        }
        return sb.ToString();
    }

    private static string EscapeDoubleQuoted(string text)
    {
        var sb = new StringBuilder(text.Length + 8);
        foreach (char c in text)
        {
            if (c is '`' or '$' || DoubleQuotes.Contains(c))
                sb.Append('`');
            sb.Append(c);
        }
        return sb.ToString();
    }

    /// <summary>Whether the module's cmdlet of that name has [SupportsWildcards] on that parameter.</summary>
    private static bool TakesWildcards(string commandName, string parameterName)
    {
        string name = commandName[(commandName.LastIndexOf('\\') + 1)..];
        return s_cmdlets.Value.TryGetValue(name, out Type? type)
               && type.GetProperty(parameterName, BindingFlags.Public | BindingFlags.Instance | BindingFlags.IgnoreCase) is { } property
               && property.IsDefined(typeof(SupportsWildcardsAttribute), inherit: true);
    }

    private static Dictionary<string, Type> FindCmdlets()
    {
        var cmdlets = new Dictionary<string, Type>(StringComparer.OrdinalIgnoreCase);
        foreach (Type type in typeof(CompletionText).Assembly.GetTypes())
        {
            if (type.GetCustomAttribute<CmdletAttribute>() is { } cmdlet)
                cmdlets[$"{cmdlet.VerbName}-{cmdlet.NounName}"] = type;
        }
        return cmdlets;
    }
}
