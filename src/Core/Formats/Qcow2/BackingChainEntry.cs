using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>One image below the top of a backing chain, as <c>qemu-img info --backing-chain</c> lists it.</summary>
/// <param name="Path">Full path of the backing image file.</param>
/// <param name="Format">Its format.</param>
/// <param name="Size">Its virtual size in bytes.</param>
public sealed record BackingChainEntry(string Path, ImageFormat Format, long Size);
