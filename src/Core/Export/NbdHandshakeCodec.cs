using System.Buffers.Binary;
using System.Text;

namespace BitmapBackup.Core.Export;

/*
 * The handshake phase of NBD as pure functions over spans: nothing here reads or writes a socket, allocates what a
 * length field claims, or keeps state; NbdConnection does the I/O and ExportPolicy decides what to answer.
 *
 *   S: greeting        "NBDMAGIC" "IHAVEOPT" u16 handshake flags                              (18 bytes)
 *   C: client flags    u32                                                                    (4 bytes)
 *   C: option          "IHAVEOPT" u32 option u32 length, then length bytes of data            (16 + n)
 *   S: option reply    0x3e889045565a9 u32 option u32 reply-type u32 length, then data        (20 + n)
 *   S: EXPORT_NAME     u64 size u16 transmission flags [124 zero bytes unless NO_ZEROES]      (10 or 134)
 *
 * Option data parsed here (lengths are checked against the data actually received, never trusted):
 *   INFO / GO          u32 name length, name, u16 n, n x u16 information request
 *   LIST/SET_META      u32 name length, name, u32 n, n x (u32 query length, query)
 * Every integer is big-endian. Names and queries are UTF-8.
 */

/// <summary>An option header from the client.</summary>
public readonly record struct NbdOptionHeader(ulong Magic, uint Option, uint Length);

/// <summary>The data of NBD_OPT_INFO / NBD_OPT_GO: the export asked for and the information types requested.</summary>
public sealed record NbdExportInfoRequest(string Name, IReadOnlyList<NbdInfoType> InfoRequests);

/// <summary>
/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. A query longer than the protocol allows is kept
/// as null: QEMU skips such a query (it can match nothing) rather than failing the option.
/// </summary>
public sealed record NbdMetaContextRequest(string ExportName, IReadOnlyList<string?> Queries);

/// <summary>Encoding and decoding of the NBD handshake (fixed newstyle negotiation).</summary>
public static class NbdHandshakeCodec
{
    private static readonly UTF8Encoding Utf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false);

    /// <summary>Write the greeting: NBDMAGIC, IHAVEOPT, handshake flags.</summary>
    public static void WriteGreeting(Span<byte> destination, NbdHandshakeFlags flags)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.Greeting);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], NbdMagic.Option);
        BinaryPrimitives.WriteUInt16BigEndian(destination[16..], (ushort)flags);
    }

    /// <summary>
    /// The client's flags. Returns false when a bit is set that the server did not offer in
    /// <paramref name="offered"/>: the server must then drop the connection (proto.md, "Client flags").
    /// </summary>
    public static bool TryReadClientFlags(ReadOnlySpan<byte> source, NbdHandshakeFlags offered, out NbdHandshakeFlags flags)
    {
        uint raw = BinaryPrimitives.ReadUInt32BigEndian(source);
        flags = (NbdHandshakeFlags)(raw & 0xFFFF);
        return (raw & ~(uint)offered) == 0;
    }

    /// <summary>An option header; false when its magic is not IHAVEOPT (the client is not speaking NBD: drop it).</summary>
    public static bool TryReadOptionHeader(ReadOnlySpan<byte> source, out NbdOptionHeader header)
    {
        header = new NbdOptionHeader(
            BinaryPrimitives.ReadUInt64BigEndian(source),
            BinaryPrimitives.ReadUInt32BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[12..]));
        return header.Magic == NbdMagic.Option;
    }

    /// <summary>Write an option reply header followed by <paramref name="payload"/>; returns the bytes written.</summary>
    public static int WriteOptionReply(Span<byte> destination, uint option, NbdOptionReply type, ReadOnlySpan<byte> payload)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.OptionReply);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], (uint)type);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], (uint)payload.Length);
        payload.CopyTo(destination[NbdMagic.OptionReplyHeaderLength..]);
        return NbdMagic.OptionReplyHeaderLength + payload.Length;
    }

    /// <summary>An option reply (header and payload) as a new array.</summary>
    public static byte[] OptionReply(uint option, NbdOptionReply type, ReadOnlySpan<byte> payload = default)
    {
        byte[] reply = new byte[NbdMagic.OptionReplyHeaderLength + payload.Length];
        WriteOptionReply(reply, option, type, payload);
        return reply;
    }

    /// <summary>An error reply carrying a human-readable message, as QEMU sends them.</summary>
    public static byte[] ErrorReply(uint option, NbdOptionReply error, string message) => OptionReply(option, error, Utf8.GetBytes(message));

    /// <summary>NBD_REP_SERVER payload: u32 name length, name, then the description (rest of the payload).</summary>
    public static byte[] ServerPayload(string name, string? description)
    {
        byte[] n = Utf8.GetBytes(name);
        byte[] d = description is null ? [] : Utf8.GetBytes(description);
        byte[] payload = new byte[4 + n.Length + d.Length];
        BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)n.Length);
        n.CopyTo(payload, 4);
        d.CopyTo(payload, 4 + n.Length);
        return payload;
    }

    /// <summary>NBD_INFO_EXPORT payload (12 bytes): u16 type, u64 size, u16 transmission flags.</summary>
    public static byte[] InfoExportPayload(ulong size, NbdTransmissionFlags flags)
    {
        byte[] payload = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(payload, (ushort)NbdInfoType.Export);
        BinaryPrimitives.WriteUInt64BigEndian(payload.AsSpan(2), size);
        BinaryPrimitives.WriteUInt16BigEndian(payload.AsSpan(10), (ushort)flags);
        return payload;
    }

    /// <summary>NBD_INFO_BLOCK_SIZE payload (14 bytes): u16 type, u32 minimum, u32 preferred, u32 maximum payload.</summary>
    public static byte[] InfoBlockSizePayload(uint minimum, uint preferred, uint maximum)
    {
        byte[] payload = new byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(payload, (ushort)NbdInfoType.BlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(2), minimum);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(6), preferred);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(10), maximum);
        return payload;
    }

    /// <summary>NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload: u16 type, then the string.</summary>
    public static byte[] InfoStringPayload(NbdInfoType type, string value)
    {
        byte[] text = Utf8.GetBytes(value);
        byte[] payload = new byte[2 + text.Length];
        BinaryPrimitives.WriteUInt16BigEndian(payload, (ushort)type);
        text.CopyTo(payload, 2);
        return payload;
    }

    /// <summary>NBD_REP_META_CONTEXT payload: u32 context id, then the context name.</summary>
    public static byte[] MetaContextPayload(uint id, string name)
    {
        byte[] text = Utf8.GetBytes(name);
        byte[] payload = new byte[4 + text.Length];
        BinaryPrimitives.WriteUInt32BigEndian(payload, id);
        text.CopyTo(payload, 4);
        return payload;
    }

    /// <summary>
    /// The reply to NBD_OPT_EXPORT_NAME (no header: u64 size, u16 flags), followed by 124 zero bytes unless both
    /// sides agreed on NO_ZEROES.
    /// </summary>
    public static byte[] ExportNameReply(ulong size, NbdTransmissionFlags flags, bool noZeroes)
    {
        byte[] reply = new byte[noZeroes ? 10 : 134];
        BinaryPrimitives.WriteUInt64BigEndian(reply, size);
        BinaryPrimitives.WriteUInt16BigEndian(reply.AsSpan(8), (ushort)flags);
        return reply;
    }

    /// <summary>UTF-8 text of a name or query (invalid sequences become U+FFFD: such a name matches nothing).</summary>
    public static string DecodeString(ReadOnlySpan<byte> bytes) => Utf8.GetString(bytes);

    /// <summary>Bytes of a string on the wire.</summary>
    public static int EncodedLength(string value) => Utf8.GetByteCount(value);

    /// <summary>
    /// Parse the data of NBD_OPT_INFO / NBD_OPT_GO. Returns null and the reason (QEMU's wording) when the lengths
    /// inside do not add up to the option's length exactly; the option is then answered with NBD_REP_ERR_INVALID.
    /// </summary>
    public static NbdExportInfoRequest? ParseExportInfoRequest(ReadOnlySpan<byte> data, string optionName, out string? error)
    {
        error = null;
        if (data.Length < 6)
        {
            error = $"option '{optionName}' has unexpected length";
            return null;
        }
        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > (uint)(data.Length - 6))
        {
            error = $"Inconsistent lengths in option {optionName}";
            return null;
        }
        if (nameLength > NbdMagic.MaxStringLength)
        {
            error = $"export name too long in option {optionName}";
            return null;
        }
        string name = DecodeString(data.Slice(4, (int)nameLength));
        ReadOnlySpan<byte> rest = data[(4 + (int)nameLength)..];
        int count = BinaryPrimitives.ReadUInt16BigEndian(rest);
        if (rest.Length - 2 != count * 2)
        {
            error = $"option '{optionName}' has unexpected length";
            return null;
        }
        var requests = new NbdInfoType[count];
        for (int i = 0; i < count; i++)
            requests[i] = (NbdInfoType)BinaryPrimitives.ReadUInt16BigEndian(rest[(2 + (2 * i))..]);
        return new NbdExportInfoRequest(name, requests);
    }

    /// <summary>
    /// Parse the data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. Returns null and the reason when a
    /// length inside runs past the option's data or data is left over.
    /// </summary>
    public static NbdMetaContextRequest? ParseMetaContextRequest(ReadOnlySpan<byte> data, string optionName, out string? error)
    {
        error = null;
        if (data.Length < 8)
        {
            error = $"option '{optionName}' has unexpected length";
            return null;
        }
        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > (uint)(data.Length - 8))
        {
            error = $"Inconsistent lengths in option {optionName}";
            return null;
        }
        if (nameLength > NbdMagic.MaxStringLength)
        {
            error = $"export name too long in option {optionName}";
            return null;
        }
        string name = DecodeString(data.Slice(4, (int)nameLength));
        ReadOnlySpan<byte> rest = data[(4 + (int)nameLength)..];
        uint count = BinaryPrimitives.ReadUInt32BigEndian(rest);
        rest = rest[4..];
        if (count > (uint)rest.Length / 4)
        {
            error = $"Inconsistent lengths in option {optionName}";
            return null;
        }
        var queries = new List<string?>((int)count);
        for (uint i = 0; i < count; i++)
        {
            if (rest.Length < 4)
            {
                error = $"Inconsistent lengths in option {optionName}";
                return null;
            }
            uint length = BinaryPrimitives.ReadUInt32BigEndian(rest);
            if (length > (uint)(rest.Length - 4))
            {
                error = $"Inconsistent lengths in option {optionName}";
                return null;
            }
            queries.Add(length > NbdMagic.MaxStringLength ? null : DecodeString(rest.Slice(4, (int)length)));
            rest = rest[(4 + (int)length)..];
        }
        if (!rest.IsEmpty)
        {
            error = $"option '{optionName}' has unexpected length";
            return null;
        }
        return new NbdMetaContextRequest(name, queries);
    }

    /// <summary>The option's name in QEMU's messages ("go", "list", "structured reply"...).</summary>
    public static string NameOf(uint option) => (NbdOption)option switch
    {
        NbdOption.ExportName => "export name",
        NbdOption.Abort => "abort",
        NbdOption.List => "list",
        NbdOption.StartTls => "starttls",
        NbdOption.Info => "info",
        NbdOption.Go => "go",
        NbdOption.StructuredReply => "structured reply",
        NbdOption.ListMetaContext => "list meta context",
        NbdOption.SetMetaContext => "set meta context",
        NbdOption.ExtendedHeaders => "extended headers",
        _ => "<unknown>",
    };
}
