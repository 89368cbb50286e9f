using System.Buffers.Binary;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The fixed qcow2 header at the start of cluster 0 (spec "Header"), big-endian. Version 2 stops after
/// <c>snapshots_offset</c> (72 bytes); version 3 adds the feature masks, <c>refcount_order</c> and
/// <c>header_length</c> (104 bytes), and optionally <c>compression_type</c> (QEMU writes 112 bytes).
/// <see cref="ReadFrom"/> only decodes; <see cref="Qcow2HeaderValidator"/> decides whether the values can be trusted.
/// </summary>
internal sealed class Qcow2Header
{
    /// <summary>"QFI\xfb".</summary>
    public const uint Magic = 0x514649FB;

    public const int V2Length = 72;
    public const int V3MinLength = 104;

    /// <summary>The v3 header with <c>compression_type</c> and its padding, as QEMU writes it.</summary>
    public const int V3Length = 112;

    // Byte offsets of the fields that are rewritten in place.
    public const int BackingFileOffsetOffset = 8;
    public const int SizeOffset = 24;
    public const int L1SizeOffset = 36; // l1_size (4) then l1_table_offset (8): one 12-byte write
    public const int RefcountTableOffsetOffset = 48; // refcount_table_offset (8) then refcount_table_clusters (4)
    public const int IncompatibleFeaturesOffset = 72;
    public const int AutoclearFeaturesOffset = 88;
    public const int CompressionTypeOffset = 104;

    public uint MagicValue { get; set; }
    public uint Version { get; set; }
    public ulong BackingFileOffset { get; set; }
    public uint BackingFileSize { get; set; }
    public uint ClusterBits { get; set; }
    public ulong Size { get; set; }
    public uint CryptMethod { get; set; }
    public uint L1Size { get; set; }
    public ulong L1TableOffset { get; set; }
    public ulong RefcountTableOffset { get; set; }
    public uint RefcountTableClusters { get; set; }
    public uint SnapshotCount { get; set; }
    public ulong SnapshotsOffset { get; set; }
    public ulong IncompatibleFeatures { get; set; }
    public ulong CompatibleFeatures { get; set; }
    public ulong AutoclearFeatures { get; set; }
    public uint RefcountOrder { get; set; } = 4;
    public uint HeaderLength { get; set; } = V2Length;
    public byte CompressionType { get; set; }

    public bool IsValid => MagicValue == Magic;

    /// <summary>Decode a header from the first bytes of the file (at least <see cref="V2Length"/>).</summary>
    public static Qcow2Header ReadFrom(ReadOnlySpan<byte> buffer)
    {
        var h = new Qcow2Header
        {
            MagicValue = BinaryPrimitives.ReadUInt32BigEndian(buffer),
            Version = BinaryPrimitives.ReadUInt32BigEndian(buffer[4..]),
            BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(buffer[8..]),
            BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(buffer[16..]),
            ClusterBits = BinaryPrimitives.ReadUInt32BigEndian(buffer[20..]),
            Size = BinaryPrimitives.ReadUInt64BigEndian(buffer[24..]),
            CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(buffer[32..]),
            L1Size = BinaryPrimitives.ReadUInt32BigEndian(buffer[36..]),
            L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(buffer[40..]),
            RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(buffer[48..]),
            RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(buffer[56..]),
            SnapshotCount = BinaryPrimitives.ReadUInt32BigEndian(buffer[60..]),
            SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(buffer[64..]),
        };
        if (h.Version < 3 || buffer.Length < V3MinLength)
            return h; // v2: features 0, refcount_order 4, header_length 72
        h.IncompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(buffer[72..]);
        h.CompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(buffer[80..]);
        h.AutoclearFeatures = BinaryPrimitives.ReadUInt64BigEndian(buffer[88..]);
        h.RefcountOrder = BinaryPrimitives.ReadUInt32BigEndian(buffer[96..]);
        h.HeaderLength = BinaryPrimitives.ReadUInt32BigEndian(buffer[100..]);
        if (h.HeaderLength > CompressionTypeOffset && buffer.Length > CompressionTypeOffset)
            h.CompressionType = buffer[CompressionTypeOffset];
        return h;
    }

    /// <summary>Encode the header into <paramref name="buffer"/> (<see cref="HeaderLength"/> bytes; padding zeroed).</summary>
    public void WriteTo(Span<byte> buffer)
    {
        buffer[..(int)HeaderLength].Clear();
        BinaryPrimitives.WriteUInt32BigEndian(buffer, MagicValue);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[4..], Version);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[8..], BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[16..], BackingFileSize);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[20..], ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[24..], Size);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[32..], CryptMethod);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[36..], L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[40..], L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[48..], RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[56..], RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[60..], SnapshotCount);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[64..], SnapshotsOffset);
        if (Version < 3)
            return;
        BinaryPrimitives.WriteUInt64BigEndian(buffer[72..], IncompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[80..], CompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(buffer[88..], AutoclearFeatures);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[96..], RefcountOrder);
        BinaryPrimitives.WriteUInt32BigEndian(buffer[100..], HeaderLength);
        if (HeaderLength > CompressionTypeOffset)
            buffer[CompressionTypeOffset] = CompressionType;
    }
}
