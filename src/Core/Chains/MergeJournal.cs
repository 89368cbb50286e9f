using System.Text;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;

namespace BitmapBackup.Core.Chains;

/*
 * The journal of a chain merge: "<image>.merge-journal" beside the image that receives the merged content, listing
 * the files the merge deletes once that image has been replaced (the older images of the chain and their digest
 * manifests), newest first. It exists so that a crash between the switch and the end of the clean-up never leaves
 * files that nothing will ever delete: the next merge of the chain finishes the job.
 *
 * It is written before the switch (to "<journal>.tmp", fsynced, renamed, folder fsynced), so it may describe a
 * switch that never happened. Whether the switch happened is read from the image itself: the merged image is
 * standalone, while the image it replaces always had a backing file. So a journal beside a standalone image is
 * carried out (each listed file deleted, newest first, then the journal), and a journal beside an image that still
 * has its backing file is dropped, together with the unfinished "<image>.merging" file. A journal that does not end
 * with its end line (never renamed into place, or damaged) is dropped too: nothing it lists is deleted.
 */

/// <summary>The list of files a merge deletes after its switch, kept beside the merged image until they are gone.</summary>
internal static class MergeJournal
{
    public const string Suffix = ".merge-journal";
    private const string FirstLine = "BitmapBackup merge journal 1";
    private const string DeletePrefix = "delete ";
    private const string EndLine = "end";

    public static string PathFor(string image) => image + Suffix;

    /// <summary>Write the journal beside <paramref name="image"/> durably, in one rename.</summary>
    public static void Write(string image, IReadOnlyList<string> doomed)
    {
        string path = PathFor(image);
        string temp = path + ".tmp";
        var text = new StringBuilder();
        text.Append(FirstLine).Append('\n');
        foreach (string file in doomed)
            text.Append(DeletePrefix).Append(file).Append('\n');
        text.Append(EndLine).Append('\n');
        ImageFiles.Io(temp, "write", () =>
        {
            using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None))
            {
                byte[] bytes = Encoding.UTF8.GetBytes(text.ToString());
                stream.Write(bytes);
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
        });
        LinuxFile.TrySyncDirectory(Folder(path));
    }

    /// <summary>The files a complete journal lists, in order; null when the journal is incomplete or not one.</summary>
    public static IReadOnlyList<string>? Read(string path)
    {
        string[] lines;
        try
        {
            lines = File.ReadAllLines(path, Encoding.UTF8);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
        if (lines.Length < 2 || lines[0] != FirstLine || lines[^1] != EndLine)
            return null;
        var files = new List<string>();
        for (int i = 1; i < lines.Length - 1; i++)
        {
            if (!lines[i].StartsWith(DeletePrefix, StringComparison.Ordinal))
                return null;
            string file = lines[i][DeletePrefix.Length..];
            if (!System.IO.Path.IsPathFullyQualified(file))
                return null;
            files.Add(file);
        }
        return files;
    }

    /// <summary>
    /// Settle what a crashed merge left beside <paramref name="image"/>: carry out its journal when the image is
    /// standalone (<paramref name="switched"/>), else drop the journal. Files of <paramref name="keep"/> (the chain as
    /// it is now) are never deleted. Returns the files deleted.
    /// </summary>
    public static IReadOnlyList<string> Recover(string image, bool switched, IReadOnlySet<string> keep)
    {
        string path = PathFor(image);
        var deleted = new List<string>();
        if (File.Exists(path))
        {
            IReadOnlyList<string>? files = switched ? Read(path) : null;
            foreach (string file in files ?? [])
            {
                if (!keep.Contains(file) && Delete(file))
                    deleted.Add(file);
            }
            Delete(path);
        }
        Delete(path + ".tmp");
        LinuxFile.TrySyncDirectory(Folder(path));
        return deleted;
    }

    /// <summary>Delete the journal once its files are gone.</summary>
    public static void Remove(string image)
    {
        string path = PathFor(image);
        Delete(path);
        LinuxFile.TrySyncDirectory(Folder(path));
    }

    /// <summary>Delete a file if it exists; true when it existed. An I/O failure is an ImageIOFailed naming the file.</summary>
    public static bool Delete(string file)
    {
        if (!File.Exists(file))
            return false;
        ImageFiles.Io(file, "delete", () => File.Delete(file));
        return true;
    }

    private static string Folder(string path) => System.IO.Path.GetDirectoryName(path) ?? "/";
}
