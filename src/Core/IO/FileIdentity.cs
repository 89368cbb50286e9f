namespace BitmapBackup.Core.IO;

/// <summary>
/// Which file a path names, independent of its name and contents: the file system it is on (device major:minor), its
/// inode number and its birth time (0 where the file system keeps none). A copy, or a new file put in its place, has
/// another identity; a rename keeps it. Inode numbers are reused after a delete: the birth time tells those apart.
/// </summary>
public readonly record struct FileIdentity(ulong Device, ulong Inode, long BirthSeconds, uint BirthNanoseconds)
{
    /// <summary>The identity of the file at <paramref name="path"/>, or null where it cannot be read (not Linux, no statx).</summary>
    public static FileIdentity? Of(string path)
        => OperatingSystem.IsLinux() && LinuxFile.GetIdentity(path, out FileIdentity identity) == 0 && identity.Inode != 0 ? identity : null;

    public override string ToString() => $"device {Device >> 32}:{Device & 0xFFFFFFFF}, inode {Inode}, born {BirthSeconds}.{BirthNanoseconds:D9}";
}
