using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Testing;

/// <summary>Which I/O a fault rule fails.</summary>
public enum FaultOperation
{
    /// <summary>A read of a node (guest offsets), as the backup's source side sees it.</summary>
    Read,

    /// <summary>A write of a backup target (guest offsets).</summary>
    Write,

    /// <summary>A write system call on an image file (file offsets): what a full or failing disk refuses.</summary>
    FileWrite,

    /// <summary>A read system call on an image file (file offsets).</summary>
    FileRead,

    /// <summary>An fsync/fdatasync of an image file.</summary>
    FileSync,
}

/// <summary>
/// A test-only hook: rules that make engine reads or writes of an image fail with an I/O error, as QEMU's
/// blkdebug does in iotests 124 and 257. Source reads (<see cref="Nodes.BlockNode.Read"/>) and backup target
/// writes consult it at guest offsets; the file drivers consult it at every read, write and sync of an image file
/// (<see cref="FaultOperation.FileWrite"/> and friends, file offsets), where a real disk fails. With no rule the check is one volatile read. Tests (xunit, or Pester through
/// <c>[BitmapBackup.Core.Testing.FaultInjection]::Add(...)</c>) must <see cref="Clear"/> what they add.
/// </summary>
public static class FaultInjection
{
    private static readonly Lock s_lock = new();
    private static FaultRule[] s_rules = [];

    /// <summary>
    /// Fail the next <paramref name="times"/> (-1: every) <paramref name="operation"/> of the image whose file
    /// name or full path is <paramref name="path"/> that overlaps [offset, offset+length).
    /// </summary>
    public static FaultRule Add(string path, FaultOperation operation, long offset = 0, long length = long.MaxValue, int times = 1, string message = "Input/output error (injected)")
    {
        var rule = new FaultRule(path, operation, offset, length, times, message);
        lock (s_lock)
            s_rules = [.. s_rules, rule];
        return rule;
    }

    /// <summary>Drop one rule (tests running in parallel keep theirs).</summary>
    public static void Remove(FaultRule rule)
    {
        lock (s_lock)
            s_rules = s_rules.Where(r => r != rule).ToArray();
    }

    public static void Clear()
    {
        lock (s_lock)
            s_rules = [];
    }

    /// <summary>Throws the injected error if a rule matches.</summary>
    private static string Describe(FaultOperation operation) => operation switch
    {
        FaultOperation.Read or FaultOperation.FileRead => "read",
        FaultOperation.FileSync => "flush",
        _ => "write",
    };

    public static void Check(string path, FaultOperation operation, long offset, long length)
    {
        FaultRule[] rules = Volatile.Read(ref s_rules);
        if (rules.Length == 0)
            return;
        foreach (FaultRule rule in rules)
        {
            if (rule.Matches(path, operation, offset, length) && rule.TryConsume())
                throw new BlockException(ErrorIds.ImageIOFailed, operation is FaultOperation.Read or FaultOperation.FileRead ? BlockErrorCategory.ReadError : BlockErrorCategory.WriteError,
                    $"I/O error on image '{path}' during {Describe(operation)} at offset {offset}: {rule.Message}", path);
        }
    }
}

/// <summary>One injected fault; <see cref="Hits"/> counts the failures it caused.</summary>
public sealed class FaultRule(string path, FaultOperation operation, long offset, long length, int times, string message)
{
    private int _remaining = times;
    private int _hits;

    public string Path { get; } = path;
    public FaultOperation Operation { get; } = operation;
    public long Offset { get; } = offset;
    public long Length { get; } = length;
    public string Message { get; } = message;
    public int Hits => Volatile.Read(ref _hits);

    internal bool Matches(string path, FaultOperation operation, long offset, long length)
        => operation == Operation
           && (string.Equals(path, Path, StringComparison.Ordinal) || string.Equals(System.IO.Path.GetFileName(path), Path, StringComparison.Ordinal))
           && offset < (Offset > long.MaxValue - Length ? long.MaxValue : Offset + Length) && offset + length > Offset;

    internal bool TryConsume()
    {
        while (true)
        {
            int left = Volatile.Read(ref _remaining);
            if (left == 0)
                return false;
            if (left < 0 || Interlocked.CompareExchange(ref _remaining, left - 1, left) == left)
            {
                Interlocked.Increment(ref _hits);
                return true;
            }
        }
    }
}
