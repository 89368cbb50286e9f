using System.Buffers.Binary;
using System.Text;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// One entry of the bitmap directory (spec "Bitmap directory"), as stored: where the bitmap's table is, its flags,
/// granularity and name. Only the directory is read here; the bitmap data is not.
/// </summary>
/// <param name="Name">Bitmap name, unique within the image.</param>
/// <param name="GranularityBits">log2 of the granularity in bytes.</param>
/// <param name="Flags">Raw flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible.</param>
/// <param name="Type">1 = dirty tracking bitmap.</param>
/// <param name="TableOffset">File offset of the bitmap table.</param>
/// <param name="TableSize">Entries (u64) in the bitmap table.</param>
/// <param name="EntryOffset">File offset of this directory entry (its flags are at +12).</param>
public sealed record Qcow2BitmapDirectoryEntry(
    string Name, int GranularityBits, uint Flags, byte Type, long TableOffset, uint TableSize, long EntryOffset)
{
    public const uint InUseFlag = 1u << 0;
    public const uint AutoFlag = 1u << 1;
    public const uint ExtraDataCompatibleFlag = 1u << 2;
    public const byte DirtyTrackingType = 1;
    internal const int FixedSize = 24;
    internal const int FlagsOffset = 12;

    /// <summary>Granularity in bytes (one bit covers this many bytes of the disk).</summary>
    public long Granularity => GranularityBits < 63 ? 1L << GranularityBits : long.MaxValue;

    /// <summary>The in-file copy is stale (the image was open for writing, or was not closed cleanly).</summary>
    public bool InUse => (Flags & InUseFlag) != 0;

    /// <summary>The bitmap records writes (QEMU: enabled).</summary>
    public bool Auto => (Flags & AutoFlag) != 0;

    /// <summary>Bytes of type-specific extra data before the name (none is defined; QEMU refuses any).</summary>
    public uint ExtraDataSize { get; init; }

    /// <summary>Bytes this entry takes in the directory, padding included.</summary>
    internal static int SizeFor(int nameBytes, long extraDataSize = 0) => (int)((FixedSize + extraDataSize + nameBytes + 7) & ~7L);

    /// <summary>
    /// Encode one entry (no extra data) at the start of <paramref name="dest"/>, which must be zeroed and hold
    /// <see cref="SizeFor"/> bytes; returns the bytes used.
    /// </summary>
    internal static int Write(Span<byte> dest, long tableOffset, uint tableSize, uint flags, int granularityBits, ReadOnlySpan<byte> name)
    {
        BinaryPrimitives.WriteUInt64BigEndian(dest, (ulong)tableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(dest[8..], tableSize);
        BinaryPrimitives.WriteUInt32BigEndian(dest[12..], flags);
        dest[16] = DirtyTrackingType;
        dest[17] = (byte)granularityBits;
        BinaryPrimitives.WriteUInt16BigEndian(dest[18..], (ushort)name.Length);
        BinaryPrimitives.WriteUInt32BigEndian(dest[20..], 0);
        name.CopyTo(dest[FixedSize..]);
        return SizeFor(name.Length);
    }

    /// <summary>
    /// Parse <paramref name="count"/> entries from the directory bytes. Returns null (with <paramref name="problem"/>)
    /// when an entry does not fit in the directory or a field is out of range.
    /// </summary>
    internal static List<Qcow2BitmapDirectoryEntry>? ReadDirectory(ReadOnlySpan<byte> directory, long directoryOffset, int count, out string? problem)
        => ReadDirectory(directory, directoryOffset, count, out problem, out _);

    /// <summary>As above; <paramref name="used"/> is the number of bytes the entries take.</summary>
    internal static List<Qcow2BitmapDirectoryEntry>? ReadDirectory(ReadOnlySpan<byte> directory, long directoryOffset, int count, out string? problem, out int used)
    {
        used = 0;
        var entries = new List<Qcow2BitmapDirectoryEntry>(Math.Min(count, 1024));
        int pos = 0;
        for (int i = 0; i < count; i++)
        {
            if (directory.Length - pos < FixedSize)
            {
                problem = $"bitmap directory entry {i} is past the end of the directory ({directory.Length} bytes)";
                return null;
            }
            ReadOnlySpan<byte> e = directory[pos..];
            ulong tableOffset = BinaryPrimitives.ReadUInt64BigEndian(e);
            uint tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            byte type = e[16];
            byte granularityBits = e[17];
            ushort nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            uint extraSize = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            long length = FixedSize + (long)extraSize + nameSize;
            long padded = (length + 7) & ~7L;
            if (nameSize == 0 || nameSize > Qcow2Limits.MaxBitmapNameLength)
            {
                problem = $"bitmap directory entry {i} has a name length of {nameSize} (1-{Qcow2Limits.MaxBitmapNameLength} allowed)";
                return null;
            }
            if (padded > directory.Length - pos)
            {
                problem = $"bitmap directory entry {i} ({length} bytes) does not fit in the directory";
                return null;
            }
            if (granularityBits > 63 || tableOffset > long.MaxValue)
            {
                problem = $"bitmap directory entry {i} has an invalid granularity or table offset";
                return null;
            }
            string name = Encoding.UTF8.GetString(e.Slice(FixedSize + (int)extraSize, nameSize));
            entries.Add(new Qcow2BitmapDirectoryEntry(name, granularityBits, flags, type, (long)tableOffset, tableSize, directoryOffset + pos)
            {
                ExtraDataSize = extraSize,
            });
            pos += (int)padded;
        }
        used = pos;
        problem = null;
        return entries;
    }
}
