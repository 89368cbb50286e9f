using System.Buffers.Binary;
using System.Text;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The header extension area (spec "Header extensions"): after the header, records of
/// {u32 type, u32 length, data, zero padding to 8} ending with type 0. It ends at the backing file name, or at the
/// end of cluster 0 when there is none. Unknown extensions are ignored, as the spec allows.
/// </summary>
internal sealed class Qcow2HeaderExtensions
{
    public const uint EndType = 0x00000000;
    public const uint BackingFormatType = 0xE2792ACA;
    public const uint FeatureNameTableType = 0x6803F857;
    public const uint BitmapsType = 0x23852875;
    public const uint CryptoHeaderType = 0x0537BE77;
    public const uint DataFileType = 0x44415441;

    private const int RecordHeaderSize = 8;

    /// <summary>Backing file format name ("qcow2", "raw", ...), or null.</summary>
    public string? BackingFormat { get; private set; }

    public Qcow2FeatureNameTable FeatureNames { get; private set; } = Qcow2FeatureNameTable.Empty;

    /// <summary>The bitmaps extension as found (valid or not: see the auto-clear bit); kept up to date by the bitmap store.</summary>
    public Qcow2BitmapsExtension? Bitmaps { get; set; }

    public string? DataFile { get; private set; }

    public bool HasCryptoHeader { get; private set; }

    /// <summary>
    /// Parse the extension area. <paramref name="area"/> holds the bytes from the end of the header to the end of
    /// the area; a record running past it is corrupt (QEMU: "Header extension too large").
    /// </summary>
    public static Qcow2HeaderExtensions ReadFrom(ReadOnlySpan<byte> area, string path)
    {
        var ext = new Qcow2HeaderExtensions();
        int pos = 0;
        while (pos < area.Length)
        {
            if (area.Length - pos < RecordHeaderSize)
                Qcow2Errors.Corrupt(path, $"header extension at byte {pos} of the extension area is truncated");
            uint type = BinaryPrimitives.ReadUInt32BigEndian(area[pos..]);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(area[(pos + 4)..]);
            pos += RecordHeaderSize;
            if (type == EndType)
                break;
            if (length > area.Length - pos)
                Qcow2Errors.Corrupt(path, $"header extension 0x{type:x8} is {length} bytes long but only {area.Length - pos} bytes remain before the end of the extension area");
            ReadOnlySpan<byte> data = area.Slice(pos, (int)length);
            switch (type)
            {
                case BackingFormatType:
                    if (length > Qcow2Limits.MaxBackingFormatLength)
                        Qcow2Errors.Corrupt(path, $"the backing format extension is {length} bytes long (at most {Qcow2Limits.MaxBackingFormatLength})");
                    ext.BackingFormat = Encoding.UTF8.GetString(data);
                    break;
                case FeatureNameTableType:
                    ext.FeatureNames = Qcow2FeatureNameTable.ReadFrom(data);
                    break;
                case BitmapsType:
                    if (length != Qcow2BitmapsExtension.Size)
                        Qcow2Errors.Corrupt(path, $"the bitmaps extension is {length} bytes long (expected {Qcow2BitmapsExtension.Size})");
                    ext.Bitmaps = Qcow2BitmapsExtension.ReadFrom(data);
                    break;
                case CryptoHeaderType:
                    ext.HasCryptoHeader = true;
                    break;
                case DataFileType:
                    ext.DataFile = Encoding.UTF8.GetString(data);
                    break;
            }
            long next = pos + (((long)length + 7) & ~7L);
            pos = (int)Math.Min(next, area.Length);
        }
        return ext;
    }

    /// <summary>Bytes needed by <see cref="Write"/> for these extensions, including the end record.</summary>
    public static int SizeFor(string? backingFormat)
        => (backingFormat is null ? 0 : RecordHeaderSize + ((Encoding.UTF8.GetByteCount(backingFormat) + 7) & ~7)) + RecordHeaderSize;

    /// <summary>Write the backing format extension (when given) and the end record; returns the bytes written.</summary>
    public static int Write(Span<byte> dest, string? backingFormat)
    {
        int pos = 0;
        if (backingFormat is not null)
        {
            int n = Encoding.UTF8.GetBytes(backingFormat, dest[(pos + RecordHeaderSize)..]);
            BinaryPrimitives.WriteUInt32BigEndian(dest[pos..], BackingFormatType);
            BinaryPrimitives.WriteUInt32BigEndian(dest[(pos + 4)..], (uint)n);
            int padded = (n + 7) & ~7;
            dest.Slice(pos + RecordHeaderSize + n, padded - n).Clear();
            pos += RecordHeaderSize + padded;
        }
        dest.Slice(pos, RecordHeaderSize).Clear(); // end record: type 0, length 0
        return pos + RecordHeaderSize;
    }
}
