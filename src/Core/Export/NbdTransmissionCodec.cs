using System.Buffers.Binary;
using System.Text;

namespace BitmapBackup.Core.Export;

/*
 * The transmission phase of NBD as pure functions over spans (no I/O, no state):
 *
 *   C: request           u32 0x25609513, u16 flags, u16 type, u64 cookie, u64 offset, u32 length   (28 bytes, + payload for WRITE)
 *   S: simple reply      u32 0x67446698, u32 error, u64 cookie                                     (16 bytes, + data for a READ without SR)
 *   S: structured chunk  u32 0x668e33ef, u16 flags (bit 0 DONE), u16 type, u64 cookie, u32 length  (20 bytes + payload)
 *
 * Chunk payloads written here:
 *   NONE            (empty; only with DONE)
 *   OFFSET_DATA     u64 offset, then the data (written by the caller right after the 28-byte prefix)
 *   OFFSET_HOLE     u64 offset, u32 length
 *   BLOCK_STATUS    u32 context id, then n x (u32 extent length, u32 status flags)
 *   ERROR           u32 error, u16 message length, message (UTF-8, at most MaxErrorMessageBytes)
 * Every integer is big-endian. Replies may be sent in any order; the cookie ties them to their request.
 */

/// <summary>A request of the transmission phase.</summary>
public readonly record struct NbdRequest(NbdCommandFlags Flags, NbdCommand Command, ulong Cookie, ulong Offset, uint Length);

/// <summary>One block-status extent: a length in bytes and its status flags (<see cref="NbdState"/>).</summary>
public readonly record struct NbdExtent(uint Length, uint Flags);

/// <summary>Encoding and decoding of NBD requests and replies.</summary>
public static class NbdTransmissionCodec
{
    /// <summary>Longest error message sent in an ERROR chunk (the field is a u16; QEMU's are far shorter).</summary>
    public const int MaxErrorMessageBytes = 4096;

    /// <summary>An OFFSET_DATA chunk's header and offset: what precedes its data.</summary>
    public const int OffsetDataPrefixLength = NbdMagic.ChunkHeaderLength + 8;

    /// <summary>A whole OFFSET_HOLE chunk.</summary>
    public const int OffsetHoleLength = NbdMagic.ChunkHeaderLength + 12;

    private static readonly UTF8Encoding Utf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false);

    /// <summary>Decode a request header; false when its magic is wrong (the stream cannot be trusted any more: drop it).</summary>
    public static bool TryReadRequest(ReadOnlySpan<byte> source, out NbdRequest request)
    {
        request = new NbdRequest(
            (NbdCommandFlags)BinaryPrimitives.ReadUInt16BigEndian(source[4..]),
            (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(source[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[16..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[24..]));
        return BinaryPrimitives.ReadUInt32BigEndian(source) == NbdMagic.Request;
    }

    /// <summary>Encode a request header (clients, and tests that play one).</summary>
    public static void WriteRequest(Span<byte> destination, in NbdRequest request)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.Request);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], (ushort)request.Flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)request.Command);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], request.Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(destination[16..], request.Offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[24..], request.Length);
    }

    /// <summary>Write a simple reply (16 bytes).</summary>
    public static void WriteSimpleReply(Span<byte> destination, NbdError error, ulong cookie)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.SimpleReply);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], (uint)error);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
    }

    /// <summary>Write a structured reply chunk header (20 bytes).</summary>
    public static void WriteChunkHeader(Span<byte> destination, bool done, NbdChunkType type, ulong cookie, uint payloadLength)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.StructuredReply);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], done ? (ushort)1 : (ushort)0);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], payloadLength);
    }

    /// <summary>Write the 28 bytes that precede the data of an OFFSET_DATA chunk of <paramref name="dataLength"/> bytes.</summary>
    public static void WriteOffsetDataPrefix(Span<byte> destination, bool done, ulong cookie, ulong offset, int dataLength)
    {
        WriteChunkHeader(destination, done, NbdChunkType.OffsetData, cookie, (uint)(8 + dataLength));
        BinaryPrimitives.WriteUInt64BigEndian(destination[NbdMagic.ChunkHeaderLength..], offset);
    }

    /// <summary>Write a whole OFFSET_HOLE chunk (32 bytes): the range reads as zeros.</summary>
    public static void WriteOffsetHole(Span<byte> destination, bool done, ulong cookie, ulong offset, uint length)
    {
        WriteChunkHeader(destination, done, NbdChunkType.OffsetHole, cookie, 12);
        BinaryPrimitives.WriteUInt64BigEndian(destination[NbdMagic.ChunkHeaderLength..], offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[(NbdMagic.ChunkHeaderLength + 8)..], length);
    }

    /// <summary>Write a NONE chunk with DONE (20 bytes): the reply to a zero-length READ.</summary>
    public static void WriteNoneChunk(Span<byte> destination, ulong cookie)
        => WriteChunkHeader(destination, done: true, NbdChunkType.None, cookie, 0);

    /// <summary>Bytes of an ERROR chunk carrying <paramref name="message"/> (truncated to <see cref="MaxErrorMessageBytes"/>).</summary>
    public static int ErrorChunkLength(string message) => NbdMagic.ChunkHeaderLength + 6 + Math.Min(Utf8.GetByteCount(message), MaxErrorMessageBytes);

    /// <summary>Write an ERROR chunk; returns its length (<see cref="ErrorChunkLength"/>).</summary>
    public static int WriteErrorChunk(Span<byte> destination, bool done, ulong cookie, NbdError error, string message)
    {
        byte[] text = Utf8.GetBytes(message);
        int length = Math.Min(text.Length, MaxErrorMessageBytes);
        WriteChunkHeader(destination, done, NbdChunkType.Error, cookie, (uint)(6 + length));
        BinaryPrimitives.WriteUInt32BigEndian(destination[NbdMagic.ChunkHeaderLength..], (uint)error);
        BinaryPrimitives.WriteUInt16BigEndian(destination[(NbdMagic.ChunkHeaderLength + 4)..], (ushort)length);
        text.AsSpan(0, length).CopyTo(destination[(NbdMagic.ChunkHeaderLength + 6)..]);
        return NbdMagic.ChunkHeaderLength + 6 + length;
    }

    /// <summary>Bytes of a BLOCK_STATUS chunk with <paramref name="extents"/> extents.</summary>
    public static int BlockStatusChunkLength(int extents) => NbdMagic.ChunkHeaderLength + 4 + (8 * extents);

    /// <summary>Write a BLOCK_STATUS chunk for one metadata context; returns its length.</summary>
    public static int WriteBlockStatusChunk(Span<byte> destination, bool done, ulong cookie, uint contextId, ReadOnlySpan<NbdExtent> extents)
    {
        WriteChunkHeader(destination, done, NbdChunkType.BlockStatus, cookie, (uint)(4 + (8 * extents.Length)));
        Span<byte> payload = destination[NbdMagic.ChunkHeaderLength..];
        BinaryPrimitives.WriteUInt32BigEndian(payload, contextId);
        for (int i = 0; i < extents.Length; i++)
        {
            BinaryPrimitives.WriteUInt32BigEndian(payload[(4 + (8 * i))..], extents[i].Length);
            BinaryPrimitives.WriteUInt32BigEndian(payload[(8 + (8 * i))..], extents[i].Flags);
        }
        return BlockStatusChunkLength(extents.Length);
    }
}
