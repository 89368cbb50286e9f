using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The bitmaps header extension (spec "Bitmaps extension"): where the bitmap directory is and how many
/// entries it has. 24 bytes: nb_bitmaps u32, reserved u32, bitmap_directory_size u64, bitmap_directory_offset u64.
/// </summary>
internal sealed class Qcow2BitmapsExtension
{
    public const int Size = 24;

    public uint BitmapCount { get; init; }
    public uint Reserved { get; init; }
    public ulong DirectorySize { get; init; }
    public ulong DirectoryOffset { get; init; }

    public static Qcow2BitmapsExtension ReadFrom(ReadOnlySpan<byte> data) => new()
    {
        BitmapCount = BinaryPrimitives.ReadUInt32BigEndian(data),
        Reserved = BinaryPrimitives.ReadUInt32BigEndian(data[4..]),
        DirectorySize = BinaryPrimitives.ReadUInt64BigEndian(data[8..]),
        DirectoryOffset = BinaryPrimitives.ReadUInt64BigEndian(data[16..]),
    };

    public void WriteTo(Span<byte> data)
    {
        BinaryPrimitives.WriteUInt32BigEndian(data, BitmapCount);
        BinaryPrimitives.WriteUInt32BigEndian(data[4..], Reserved);
        BinaryPrimitives.WriteUInt64BigEndian(data[8..], DirectorySize);
        BinaryPrimitives.WriteUInt64BigEndian(data[16..], DirectoryOffset);
    }
}
