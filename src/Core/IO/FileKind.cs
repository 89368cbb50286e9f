namespace BitmapBackup.Core.IO;

/// <summary>What a path names, by the file type bits of its mode (symbolic links followed).</summary>
internal enum FileKind
{
    /// <summary>The type could not be read (no statx on this system): the open goes on and is checked no further.</summary>
    Unknown,
    RegularFile,
    BlockDevice,
    Folder,
    CharacterDevice,
    Fifo,
    Socket,
}
