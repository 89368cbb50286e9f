using BitmapBackup.Core.Persistence;

namespace BitmapBackup;

/// <summary>A bitmap stored in an image that is not open (Get-DirtyBitmap -Path), as qemu-img info lists it.</summary>
public sealed class StoredBitmapInfo
{
    internal StoredBitmapInfo(string path, StoredBitmap stored)
    {
        Path = path;
        Name = stored.Name;
        Granularity = stored.Granularity;
        Count = stored.Count;
        InUse = stored.InUse;
        Auto = stored.Auto;
        CrashSafe = stored.CrashSafe;
        Recoverable = stored.Recoverable;
        Flags = [.. stored.InUse ? new[] { "in-use" } : [], .. stored.Auto ? new[] { "auto" } : []];
    }

    /// <summary>The image file.</summary>
    public string Path { get; }

    public string Name { get; }

    public long Granularity { get; }

    /// <summary>Dirty bytes (dirty bits × granularity); 0 for an in-use bitmap, whose bits are not trusted.</summary>
    public long Count { get; }

    /// <summary>Marked in use: open for writing now, or its last writer crashed (then it loads inconsistent).</summary>
    public bool InUse { get; }

    /// <summary>Records writes when loaded (the qcow2 'auto' flag): enabled.</summary>
    public bool Auto { get; }

    /// <summary>Listed by the image's write-intent log: a crash-safe bitmap (New-DirtyBitmap -CrashSafe, Set-DirtyBitmap -CrashSafe).</summary>
    public bool CrashSafe { get; }

    /// <summary>
    /// In use after a crash, but its write-intent log can rebuild it: the next Open-BlockNode loads it consistent
    /// (Recovered), not inconsistent.
    /// </summary>
    public bool Recoverable { get; }

    /// <summary>The flags as qemu-img info shows them: in-use, auto.</summary>
    public string[] Flags { get; }

    public override string ToString() => $"{Path}: {Name}";
}
