namespace BitmapBackup.Core.IO;

/// <summary>
/// Which file system holds a path (Linux: the mount in /proc/self/mounts with the longest mount point above it, links
/// in the path's folder resolved), to name it in errors. Null where that cannot be told.
/// </summary>
internal static class FileSystems
{
    /// <summary>The file system type ("ext4", "xfs", "tmpfs"...) holding <paramref name="path"/>, or null.</summary>
    public static string? TypeOf(string path)
    {
        if (!OperatingSystem.IsLinux())
            return null;
        try
        {
            string full = Path.GetFullPath(path);
            string? folder = Path.GetDirectoryName(full);
            if (folder is not null && new DirectoryInfo(folder).ResolveLinkTarget(returnFinalTarget: true) is { } target)
                full = Path.Combine(target.FullName, Path.GetFileName(full));
            string? best = null;
            string? type = null;
            foreach (string line in File.ReadLines("/proc/self/mounts"))
            {
                string[] fields = line.Split(' ');
                if (fields.Length < 3)
                    continue;
                string mountPoint = Unescape(fields[1]);
                bool above = mountPoint == "/" || full == mountPoint || full.StartsWith(mountPoint + "/", StringComparison.Ordinal);
                if (above && (best is null || mountPoint.Length >= best.Length))
                {
                    best = mountPoint;
                    type = fields[2];
                }
            }
            return type;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>Mount points escape blanks, tabs, newlines and backslashes as octal (\040).</summary>
    private static string Unescape(string field)
    {
        if (!field.Contains('\\', StringComparison.Ordinal))
            return field;
        var text = new System.Text.StringBuilder(field.Length);
        for (int i = 0; i < field.Length; i++)
        {
            if (field[i] == '\\' && IsOctal(field, i + 1))
            {
                text.Append((char)Convert.ToInt32(field.Substring(i + 1, 3), 8));
                i += 3;
            }
            else
            {
                text.Append(field[i]);
            }
        }
        return text.ToString();
    }

    private static bool IsOctal(string field, int start)
        => start + 3 <= field.Length && field.AsSpan(start, 3).IndexOfAnyExcept("01234567") < 0;
}
