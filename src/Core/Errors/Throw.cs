using System.Diagnostics.CodeAnalysis;

namespace BitmapBackup.Core.Errors;

/// <summary>Cold-path factories for <see cref="BlockException"/>, so hot paths stay small.</summary>
internal static class Throw
{
    [DoesNotReturn]
    public static void Block(string errorId, BlockErrorCategory category, string message, object? target = null, Exception? inner = null)
        => throw new BlockException(errorId, category, message, target, inner);

    [DoesNotReturn]
    public static void OffsetOutOfRange(string node, long offset, long length, long size)
        => throw new BlockException(ErrorIds.OffsetOutOfRange, BlockErrorCategory.InvalidArgument,
            $"The range at offset {offset} of length {length} is past the end of node '{node}' ({size} bytes).", node);

    [DoesNotReturn]
    public static void ReadOnly(string node)
        => throw new BlockException(ErrorIds.NodeReadOnly, BlockErrorCategory.PermissionDenied,
            $"Node '{node}' is open read-only and cannot be written.", node);
}
