using System.Management.Automation;
using Microsoft.PowerShell.Commands;

namespace BitmapBackup;

/*
 * How the cmdlets read the paths they are given, as PowerShell's own file cmdlets do:
 *
 * - A path is a PowerShell path: relative to the current location, '~' is the home folder, a drive (Temp:,
 *   TestDrive:, a New-PSDrive) or a provider-qualified path (FileSystem::/x) names a folder of that drive.
 * - Only the FileSystem provider holds images. A path on another provider (Env:, Alias:, Variable:, Function:, or
 *   a relative path while the current location is on one) is refused with ReadWriteFileNotFileSystemProvider, the
 *   id Out-File uses, and an unknown drive with DriveNotFound: nothing is written to the process's folder instead.
 * - Where a cmdlet takes existing files, -Path expands wildcards (a name that exists as it is, brackets included,
 *   is taken as it is) and -LiteralPath (alias PSPath, LP) takes names as they are, so Get-ChildItem output binds.
 * - A -BackingFile name is stored in the new image: a bare relative name stays relative to the image's folder (as
 *   qemu-img stores and reads it), while '~', drive-qualified and provider-qualified names are resolved here to the
 *   absolute file-system path that qemu-img will read.
 */

/// <summary>Turns the paths users give into file-system paths (see the comment above).</summary>
internal static class FilePaths
{
    public const string NotFileSystemId = "ReadWriteFileNotFileSystemProvider";
    public const string DriveNotFoundId = "DriveNotFound";

    /// <summary>The file-system path of <paramref name="path"/> (which need not exist), or an error record saying why there is none.</summary>
    public static string? ToFileSystem(PSCmdlet cmdlet, string path, out ErrorRecord? error)
    {
        error = null;
        ProviderInfo provider;
        string resolved;
        try
        {
            resolved = cmdlet.SessionState.Path.GetUnresolvedProviderPathFromPSPath(path, out provider, out _);
        }
        catch (System.Management.Automation.DriveNotFoundException e)
        {
            error = new ErrorRecord(e, DriveNotFoundId, ErrorCategory.ObjectNotFound, path);
            return null;
        }
        catch (ProviderNotFoundException e)
        {
            error = new ErrorRecord(e, DriveNotFoundId, ErrorCategory.ObjectNotFound, path);
            return null;
        }
        if (provider.ImplementingType != typeof(FileSystemProvider))
        {
            error = new ErrorRecord(
                new PSArgumentException($"'{path}' is a path of the {provider.Name} provider: images are files, so give a path of the FileSystem provider (a folder, or a drive such as Temp:)."),
                NotFileSystemId, ErrorCategory.InvalidArgument, path);
            return null;
        }
        return resolved;
    }

    /// <summary>
    /// The existing files that -Path (wildcards; a name that exists as it is wins) or -LiteralPath names. A name
    /// without wildcards is returned whether it exists or not: the engine then reports ImageNotFound as for any
    /// missing image. A pattern that matches nothing returns nothing, as Get-Item does, without an error.
    /// </summary>
    public static IReadOnlyList<string> ResolveExisting(PSCmdlet cmdlet, string path, bool literal, out ErrorRecord? error)
    {
        string? single = ToFileSystem(cmdlet, path, out error);
        if (single is null)
            return [];
        if (literal || !WildcardPattern.ContainsWildcardCharacters(path) || File.Exists(single) || Directory.Exists(single))
            return [single];
        try
        {
            return cmdlet.SessionState.Path.GetResolvedProviderPathFromPSPath(path, out _).ToArray();
        }
        catch (ItemNotFoundException)
        {
            return [];
        }
    }

    /// <summary>
    /// The name to store for a -BackingFile: a bare relative name as it is (relative to the new image's folder), a
    /// '~', drive-qualified or provider-qualified one resolved to its absolute file-system path.
    /// </summary>
    public static string? BackingFileName(PSCmdlet cmdlet, string name, out ErrorRecord? error)
    {
        error = null;
        bool home = name == "~" || name.StartsWith("~/", StringComparison.Ordinal) || name.StartsWith("~\\", StringComparison.Ordinal);
        bool qualified = name.Contains("::", StringComparison.Ordinal)
            || (cmdlet.SessionState.Path.IsPSAbsolute(name, out string? drive) && !string.IsNullOrEmpty(drive) && !Path.IsPathRooted(name));
        return home || qualified ? ToFileSystem(cmdlet, name, out error) : name;
    }
}
