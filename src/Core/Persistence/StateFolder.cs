namespace BitmapBackup.Core.Persistence;

/// <summary>
/// The engine's own state folder, for what belongs to no image: $XDG_STATE_HOME/BitmapBackup (by default
/// ~/.local/state/BitmapBackup), %LOCALAPPDATA%\BitmapBackup on Windows. BITMAPBACKUP_STATE_HOME overrides it (tests).
/// </summary>
public static class StateFolder
{
    public static string Path
    {
        get
        {
            if (Environment.GetEnvironmentVariable("BITMAPBACKUP_STATE_HOME") is { Length: > 0 } own)
                return own;
            string root = OperatingSystem.IsWindows()
                ? Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData)
                : Environment.GetEnvironmentVariable("XDG_STATE_HOME") is { Length: > 0 } xdg
                    ? xdg
                    : System.IO.Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".local", "state");
            return System.IO.Path.Combine(root, "BitmapBackup");
        }
    }

    /// <summary>A sub-folder of the state folder, created if missing.</summary>
    public static string Folder(string name)
    {
        string path = System.IO.Path.Combine(Path, name);
        Directory.CreateDirectory(path);
        return path;
    }
}
