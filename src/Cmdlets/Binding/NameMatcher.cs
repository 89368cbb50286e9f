using System.Management.Automation;

namespace BitmapBackup;

/// <summary>
/// Matches names against what a user typed: an exact name always matches itself (names may contain '[' or
/// '*'), otherwise the text is a wildcard pattern when it is a valid one. Names are case-sensitive, as in QEMU.
/// </summary>
internal sealed class NameMatcher
{
    private readonly string _text;
    private readonly WildcardPattern? _pattern;

    public NameMatcher(string text)
    {
        _text = text;
        try
        {
            var pattern = WildcardPattern.Get(text, WildcardOptions.None);
            pattern.IsMatch(string.Empty); // invalid patterns throw on first use
            _pattern = pattern;
            IsPattern = WildcardPattern.ContainsWildcardCharacters(text);
        }
        catch (WildcardPatternException)
        {
            _pattern = null; // not a pattern ('x['): the text is a literal name
        }
    }

    /// <summary>Whether the text is a (valid) wildcard pattern: then finding nothing is not an error.</summary>
    public bool IsPattern { get; }

    public bool IsMatch(string name) => string.Equals(name, _text, StringComparison.Ordinal) || (_pattern?.IsMatch(name) ?? false);
}
