using System.Buffers.Binary;
using System.Text;
using BitmapBackup.Core.Export;

namespace BitmapBackup.Core.Tests.Export;

/// <summary>
/// The wire codecs against the byte traces of the research note (nbd.md §1.7: nbdinfo against qemu-nbd) and against
/// every malformed length the parsers must refuse without reading past the data they were given.
/// </summary>
public sealed class NbdCodecTests
{
    private static byte[] Hex(string hex) => Convert.FromHexString(hex.Replace(" ", "", StringComparison.Ordinal));

    [Fact]
    public void Greeting_IsNbdMagicIHaveOptAndTheFlags()
    {
        byte[] greeting = new byte[18];
        NbdHandshakeCodec.WriteGreeting(greeting, NbdHandshakeFlags.FixedNewstyle | NbdHandshakeFlags.NoZeroes);
        Assert.Equal(Hex("4e42444d41474943 49484156454f5054 0003"), greeting);
    }

    [Theory]
    [InlineData(0x3u, true)]
    [InlineData(0x1u, true)]
    [InlineData(0x0u, true)]
    [InlineData(0x7u, false)]
    [InlineData(0x80000003u, false)]
    public void ClientFlags_UnknownBitsAreRefused(uint raw, bool accepted)
    {
        Assert.Equal(accepted, NbdHandshakeCodec.TryReadClientFlags(Hex(raw.ToString("x8")), NbdHandshakeFlags.FixedNewstyle | NbdHandshakeFlags.NoZeroes, out _));
    }

    [Fact]
    public void OptionHeader_FromTheTrace_AndAWrongMagic()
    {
        Assert.True(NbdHandshakeCodec.TryReadOptionHeader(Hex("49484156454f5054 0000000a 00000025"), out NbdOptionHeader header));
        Assert.Equal(((uint)NbdOption.SetMetaContext, 0x25u), (header.Option, header.Length));
        Assert.False(NbdHandshakeCodec.TryReadOptionHeader(Hex("0000001234567890 00000003 00000000"), out _));
    }

    [Fact]
    public void OptionReplies_AsQemuNbdSendsThem()
    {
        Assert.Equal(Hex("0003e889045565a9 00000008 00000001 00000000"), NbdHandshakeCodec.OptionReply(8, NbdOptionReply.Ack));
        Assert.Equal([.. Hex("0003e889045565a9 0000000a 00000004 00000019 00000002"), .. "qemu:dirty-bitmap:bm0"u8],
            NbdHandshakeCodec.OptionReply(10, NbdOptionReply.MetaContext, NbdHandshakeCodec.MetaContextPayload(2, "qemu:dirty-bitmap:bm0")));
        Assert.Equal(Hex("0003e889045565a9 00000007 00000003 0000000e 0003 00000001 00001000 02000000"),
            NbdHandshakeCodec.OptionReply(7, NbdOptionReply.Info, NbdHandshakeCodec.InfoBlockSizePayload(1, 4096, 32 << 20)));
        Assert.Equal(Hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000004000000 0ded"),
            NbdHandshakeCodec.OptionReply(7, NbdOptionReply.Info, NbdHandshakeCodec.InfoExportPayload(64 << 20, (NbdTransmissionFlags)0x0ded)));
        Assert.Equal([.. Hex("0002"), .. "test export"u8], NbdHandshakeCodec.InfoStringPayload(NbdInfoType.Description, "test export"));
    }

    [Fact]
    public void ErrorReply_CarriesItsMessage()
    {
        byte[] reply = NbdHandshakeCodec.ErrorReply(7, NbdOptionReply.ErrUnknown, "export 'x' not present");
        Assert.Equal(0x80000006u, BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(12)));
        Assert.Equal("export 'x' not present", Encoding.UTF8.GetString(reply.AsSpan(20)));
    }

    [Fact]
    public void ServerPayload_IsNameLengthNameDescription()
    {
        Assert.Equal([.. Hex("00000004"), .. "diskd"u8], NbdHandshakeCodec.ServerPayload("disk", "d"));
        Assert.Equal(8, NbdHandshakeCodec.ServerPayload("disk", null).Length);
    }

    [Theory]
    [InlineData(true, 10)]
    [InlineData(false, 134)]
    public void ExportNameReply_PadsOnlyWithoutNoZeroes(bool noZeroes, int length)
    {
        byte[] reply = NbdHandshakeCodec.ExportNameReply(64 << 20, (NbdTransmissionFlags)0x0d6d, noZeroes);
        Assert.Equal(length, reply.Length);
        Assert.Equal(Hex("0000000004000000 0d6d"), reply.AsSpan(0, 10).ToArray());
        Assert.All(reply.AsSpan(10).ToArray(), b => Assert.Equal(0, b));
    }

    [Fact]
    public void GoData_FromTheTrace_Parses()
    {
        NbdExportInfoRequest? request = NbdHandshakeCodec.ParseExportInfoRequest([.. Hex("00000004"), .. "disk"u8, .. Hex("0001 0003")], "go", out string? error);
        Assert.Null(error);
        Assert.Equal("disk", request!.Name);
        Assert.Equal([NbdInfoType.BlockSize], request.InfoRequests);
    }

    [Theory]
    [InlineData("", "option 'go' has unexpected length")]
    [InlineData("00000004 6469736b 00", "Inconsistent lengths in option go")]
    [InlineData("000003e8 6469736b 0000", "Inconsistent lengths in option go")]
    [InlineData("ffffffff 6469736b 0000", "Inconsistent lengths in option go")]
    [InlineData("00000004 6469736b 0000 6a756e6b", "option 'go' has unexpected length")]
    [InlineData("00000004 6469736b 0002 0003", "option 'go' has unexpected length")]
    [InlineData("00000004 6469736b 7fff 0003", "option 'go' has unexpected length")]
    public void GoData_WithLengthsThatDoNotAddUp_IsRefused(string hex, string message)
    {
        Assert.Null(NbdHandshakeCodec.ParseExportInfoRequest(Hex(hex), "go", out string? error));
        Assert.Equal(message, error);
    }

    [Fact]
    public void GoData_NameLongerThanTheProtocolAllows_IsRefused()
    {
        byte[] data = [.. Hex("00001001"), .. new byte[4097], .. Hex("0000")];
        Assert.Null(NbdHandshakeCodec.ParseExportInfoRequest(data, "go", out string? error));
        Assert.Equal("export name too long in option go", error);
    }

    [Fact]
    public void MetaContextData_FromTheTrace_Parses()
    {
        NbdMetaContextRequest? request = NbdHandshakeCodec.ParseMetaContextRequest([.. Hex("00000004"), .. "disk"u8, .. Hex("00000001 00000015"), .. "qemu:dirty-bitmap:bm0"u8], "set meta context", out string? error);
        Assert.Null(error);
        Assert.Equal("disk", request!.ExportName);
        Assert.Equal(["qemu:dirty-bitmap:bm0"], request.Queries);
    }

    [Theory]
    [InlineData("00000004 6469736b 000000")]
    [InlineData("00000010 6469736b 00000000")]
    [InlineData("00000004 6469736b 00000002 00000001 61")]
    [InlineData("00000004 6469736b 00000001 00000009 61")]
    [InlineData("00000004 6469736b 40000000 00000000")]
    [InlineData("00000004 6469736b 00000001 00000001 61 62")]
    public void MetaContextData_WithLengthsThatDoNotAddUp_IsRefused(string hex)
    {
        Assert.Null(NbdHandshakeCodec.ParseMetaContextRequest(Hex(hex), "list meta context", out string? error));
        Assert.NotNull(error);
    }

    [Fact]
    public void MetaContextData_AQueryLongerThanTheProtocolAllows_IsKeptAsNull()
    {
        byte[] data = [.. Hex("00000000 00000002 00001001"), .. new byte[4097], .. Hex("00000005"), .. "base:"u8];
        NbdMetaContextRequest? request = NbdHandshakeCodec.ParseMetaContextRequest(data, "list meta context", out _);
        Assert.Equal([null, "base:"], request!.Queries);
    }

    [Fact]
    public void Request_RoundTrips_AndAWrongMagicIsReported()
    {
        byte[] bytes = Hex("25609513 0000 0007 0000000000000001 0000000000000000 04000000"); // BLOCK_STATUS of the trace
        Assert.True(NbdTransmissionCodec.TryReadRequest(bytes, out NbdRequest request));
        Assert.Equal(new NbdRequest(NbdCommandFlags.None, NbdCommand.BlockStatus, 1, 0, 64 << 20), request);
        byte[] again = new byte[28];
        NbdTransmissionCodec.WriteRequest(again, request);
        Assert.Equal(bytes, again);
        bytes[0] = 0xde;
        Assert.False(NbdTransmissionCodec.TryReadRequest(bytes, out _));
    }

    [Fact]
    public void SimpleReplyAndChunks_HaveTheirLayouts()
    {
        byte[] simple = new byte[16];
        NbdTransmissionCodec.WriteSimpleReply(simple, NbdError.Invalid, 0x1122334455667788);
        Assert.Equal(Hex("67446698 00000016 1122334455667788"), simple);

        byte[] prefix = new byte[NbdTransmissionCodec.OffsetDataPrefixLength];
        NbdTransmissionCodec.WriteOffsetDataPrefix(prefix, true, 5, 4096, 512);
        Assert.Equal(Hex("668e33ef 0001 0001 0000000000000005 00000208 0000000000001000"), prefix);

        byte[] hole = new byte[NbdTransmissionCodec.OffsetHoleLength];
        NbdTransmissionCodec.WriteOffsetHole(hole, true, 5, 1, 3);
        Assert.Equal(Hex("668e33ef 0001 0002 0000000000000005 0000000c 0000000000000001 00000003"), hole);

        byte[] none = new byte[20];
        NbdTransmissionCodec.WriteNoneChunk(none, 5);
        Assert.Equal(Hex("668e33ef 0001 0000 0000000000000005 00000000"), none);

        byte[] status = new byte[NbdTransmissionCodec.BlockStatusChunkLength(2)];
        NbdTransmissionCodec.WriteBlockStatusChunk(status, true, 1, 2, [new NbdExtent(0x10000, 1), new NbdExtent(0xf0000, 0)]);
        Assert.Equal(Hex("668e33ef 0001 0005 0000000000000001 00000014 00000002 00010000 00000001 000f0000 00000000"), status);
    }

    [Fact]
    public void ErrorChunk_TruncatesLongMessages()
    {
        string message = new('x', 5000);
        byte[] chunk = new byte[NbdTransmissionCodec.ErrorChunkLength(message)];
        int written = NbdTransmissionCodec.WriteErrorChunk(chunk, true, 9, NbdError.Io, message);
        Assert.Equal(chunk.Length, written);
        Assert.Equal(20 + 6 + NbdTransmissionCodec.MaxErrorMessageBytes, written);
        Assert.Equal(0x8001, BinaryPrimitives.ReadUInt16BigEndian(chunk.AsSpan(6)));
        Assert.Equal(5u, BinaryPrimitives.ReadUInt32BigEndian(chunk.AsSpan(20)));
        Assert.Equal(NbdTransmissionCodec.MaxErrorMessageBytes, BinaryPrimitives.ReadUInt16BigEndian(chunk.AsSpan(24)));
    }
}
