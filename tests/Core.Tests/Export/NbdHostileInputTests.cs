using BitmapBackup.Core.Export;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests.Export;

/// <summary>
/// The hostile-input table of the research note (§3.4, nbdprobe.py's rows), one test per row, against a real export on
/// a unix socket: each row gets the answer the table lists for this server (QEMU's, where the spec leaves a choice),
/// the connection goes on where it should (the next option or request is still served) and is dropped where it
/// should. The export is 8 MiB, writable, with bitmap bm0 dirty at [4 MiB, 4 MiB + 64 KiB).
/// </summary>
public sealed class NbdHostileInputTests : IDisposable
{
    private const long Size = 8 << 20;
    private readonly ExportFixture _f;

    public NbdHostileInputTests()
    {
        _f = new ExportFixture(Size, bitmaps: ["bm0"]);
        _f.Node.Write(4 << 20, new byte[65536]);
    }

    public void Dispose() => _f.Dispose();

    private NbdTestClient Client(uint? flags = 3) => new(_f.SocketPath, flags);

    private static void AssertError(List<ReplyChunk> reply, NbdError error, string? message = null)
    {
        ReplyChunk last = Assert.Single(reply);
        Assert.True(last.Done);
        Assert.Equal((uint)error, last.Error);
        if (message is not null)
            Assert.Contains(message, last.Message, StringComparison.Ordinal);
    }

    // ---- Handshake phase

    [Fact]
    public void ClientFlagsWithAnUnknownBit_Close()
    {
        using NbdTestClient c = Client(0x7);
        Assert.True(c.ServerClosed()); // before any option

    }

    [Fact]
    public void NonFixedNewstyleClient_SendingListIsClosed()
    {
        using NbdTestClient c = Client(0);
        c.SendOption((uint)NbdOption.List);
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void OptionWithWrongMagic_Closes()
    {
        using NbdTestClient c = Client();
        c.SendOption((uint)NbdOption.List, magic: 0x1234567890);
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void UnknownOptionWithData_ErrUnsup_AndTheNextOptionIsServed()
    {
        using NbdTestClient c = Client();
        c.SendOption(99, "hello"u8);
        OptionReply r = Assert.Single(c.ReadOptionReplies());
        Assert.Equal(NbdOptionReply.ErrUnsupported, r.Type);
        Assert.Equal("Unsupported option 99 (<unknown>)", r.Text);
        Assert.True(c.StillNegotiates());
    }

    [Theory]
    [InlineData(99u, 0xFFFFFFFFu)]
    [InlineData((uint)NbdOption.Go, 0x10000000u)]
    [InlineData((uint)NbdOption.List, (uint)ExportPolicy.MaxOptionLength + 1)]
    public void OptionLengthAboveTheCap_ClosesWithoutWaitingForTheData(uint option, uint length)
    {
        using NbdTestClient c = Client();
        c.SendOption(option, length: length);
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void ListOrStructuredReplyWithData_ErrInvalid_Alive()
    {
        using NbdTestClient c = Client();
        c.SendOption((uint)NbdOption.List, "xx"u8);
        OptionReply list = Assert.Single(c.ReadOptionReplies());
        Assert.Equal(NbdOptionReply.ErrInvalid, list.Type);
        Assert.Equal("option 'list' has unexpected length", list.Text);
        c.SendOption((uint)NbdOption.StructuredReply, "x"u8);
        OptionReply sr = Assert.Single(c.ReadOptionReplies());
        Assert.Equal(NbdOptionReply.ErrInvalid, sr.Type);
        Assert.Equal("option 'structured reply' has unexpected length", sr.Text);
        Assert.True(c.StillNegotiates());
    }

    [Fact]
    public void StructuredReplyTwice_AckThenErrInvalid()
    {
        using NbdTestClient c = Client();
        Assert.Equal(NbdOptionReply.Ack, Assert.Single(c.Option(NbdOption.StructuredReply)).Type);
        OptionReply again = Assert.Single(c.Option(NbdOption.StructuredReply));
        Assert.Equal(NbdOptionReply.ErrInvalid, again.Type);
        Assert.Equal("structured reply already negotiated", again.Text);
    }

    [Fact]
    public void GoNameLongerThanTheOption_ErrInvalid_Alive()
    {
        using NbdTestClient c = Client();
        byte[] data = NbdTestClient.InfoData("disk");
        data[0] = 0;
        data[1] = 0;
        data[2] = 0x03;
        data[3] = 0xE8; // name length 1000
        OptionReply r = Assert.Single(c.Option(NbdOption.Go, data));
        Assert.Equal(NbdOptionReply.ErrInvalid, r.Type);
        Assert.Equal("Inconsistent lengths in option go", r.Text);
        Assert.True(c.StillNegotiates());
    }

    [Fact]
    public void GoWithTrailingJunk_ErrInvalid_Alive()
    {
        using NbdTestClient c = Client();
        OptionReply r = Assert.Single(c.Option(NbdOption.Go, [.. NbdTestClient.InfoData("disk"), .. "junk"u8]));
        Assert.Equal(NbdOptionReply.ErrInvalid, r.Type);
        Assert.Equal("option 'go' has unexpected length", r.Text);
        Assert.True(c.StillNegotiates());
    }

    [Fact]
    public void GoOrSetMetaForAnUnknownExport_ErrUnknown()
    {
        using NbdTestClient c = Client();
        OptionReply go = Assert.Single(c.Go("nosuch"));
        Assert.Equal(NbdOptionReply.ErrUnknown, go.Type);
        Assert.Equal("export 'nosuch' not present", go.Text);
        Assert.True(c.StillNegotiates());
        c.Option(NbdOption.StructuredReply);
        OptionReply meta = Assert.Single(c.Option(NbdOption.SetMetaContext, NbdTestClient.MetaData("nosuch", "base:allocation")));
        Assert.Equal(NbdOptionReply.ErrUnknown, meta.Type);
    }

    [Fact]
    public void InfoWithoutRequests_SendsBlockSizeAndExport()
    {
        using NbdTestClient c = Client();
        List<OptionReply> replies = c.Option(NbdOption.Info, NbdTestClient.InfoData("disk"));
        Assert.Equal([NbdInfoType.BlockSize, NbdInfoType.Export], replies.Where(r => r.Type == NbdOptionReply.Info).Select(r => r.InfoType));
        Assert.Equal(NbdOptionReply.Ack, replies[^1].Type);
        Assert.True(c.StillNegotiates()); // INFO stays in the handshake
    }

    [Fact]
    public void SetMetaBeforeStructuredReply_ErrInvalid_ListMetaAnswers()
    {
        using NbdTestClient c = Client();
        OptionReply set = Assert.Single(c.Option(NbdOption.SetMetaContext, NbdTestClient.MetaData("disk", "base:allocation")));
        Assert.Equal(NbdOptionReply.ErrInvalid, set.Type);
        Assert.StartsWith("request option 'set meta context' when structured reply is not negotia", set.Text, StringComparison.Ordinal);
        List<OptionReply> list = c.Option(NbdOption.ListMetaContext, NbdTestClient.MetaData("disk"));
        Assert.Equal([(0u, "base:allocation"), (0u, "qemu:dirty-bitmap:bm0")], list.Where(r => r.Type == NbdOptionReply.MetaContext).Select(r => r.MetaContext));
        Assert.Equal(NbdOptionReply.Ack, list[^1].Type);
    }

    [Theory]
    [InlineData(NbdOption.ListMetaContext, new[] { "base:" }, new[] { "0 base:allocation" })]
    [InlineData(NbdOption.ListMetaContext, new[] { "qemu:" }, new[] { "0 qemu:dirty-bitmap:bm0" })]
    [InlineData(NbdOption.ListMetaContext, new[] { "qemu:dirty-bitmap:" }, new[] { "0 qemu:dirty-bitmap:bm0" })]
    [InlineData(NbdOption.ListMetaContext, new[] { "foo:bar" }, new string[0])]
    [InlineData(NbdOption.ListMetaContext, new[] { "nocolon" }, new string[0])]
    [InlineData(NbdOption.ListMetaContext, new[] { "base:allocation", "qemu:dirty-bitmap:nosuch" }, new[] { "0 base:allocation" })]
    [InlineData(NbdOption.SetMetaContext, new[] { "base:" }, new string[0])]
    [InlineData(NbdOption.SetMetaContext, new[] { "qemu:dirty-bitmap:" }, new string[0])]
    [InlineData(NbdOption.SetMetaContext, new[] { "qemu:dirty-bitmap:bm0", "base:allocation" }, new[] { "0 base:allocation", "2 qemu:dirty-bitmap:bm0" })]
    [InlineData(NbdOption.SetMetaContext, new[] { "foo:bar" }, new string[0])]
    public void MetaContextQueries_AsQemuNbdAnswersThem(NbdOption option, string[] queries, string[] expected)
    {
        using NbdTestClient c = Client();
        c.Option(NbdOption.StructuredReply);
        List<OptionReply> replies = c.Option(option, NbdTestClient.MetaData("disk", queries));
        Assert.Equal(NbdOptionReply.Ack, replies[^1].Type);
        Assert.Equal(expected, replies.Where(r => r.Type == NbdOptionReply.MetaContext).Select(r => $"{r.MetaContext.Id} {r.MetaContext.Name}"));
    }

    [Fact]
    public void ExtendedHeadersAndStartTls_ErrUnsupAndErrPolicy_Alive()
    {
        using NbdTestClient c = Client();
        Assert.Equal(NbdOptionReply.ErrUnsupported, Assert.Single(c.Option(NbdOption.ExtendedHeaders)).Type);
        OptionReply tls = Assert.Single(c.Option(NbdOption.StartTls));
        Assert.Equal(NbdOptionReply.ErrPolicy, tls.Type);
        Assert.Equal("TLS not configured", tls.Text);
        Assert.True(c.StillNegotiates());
    }

    [Fact]
    public void Abort_AckThenClose()
    {
        using NbdTestClient c = Client();
        Assert.Equal(NbdOptionReply.Ack, Assert.Single(c.Option(NbdOption.Abort)).Type);
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void ExportNameUnknown_Closes_Known_EntersTransmissionWithoutPadding()
    {
        using (NbdTestClient unknown = Client())
        {
            unknown.SendOption((uint)NbdOption.ExportName, "nosuch"u8);
            Assert.True(unknown.ServerClosed());
        }
        using NbdTestClient c = Client();
        c.SendOption((uint)NbdOption.ExportName, "disk"u8);
        byte[] reply = c.Read(10); // NO_ZEROES negotiated: no 124 zero bytes
        Assert.Equal((ulong)Size, System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(reply));
        Assert.Equal(0x0d6d, System.Buffers.Binary.BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8))); // qemu-nbd's flags without DF
        Assert.True(c.StillServes());
    }

    [Fact]
    public void ExportNameWithoutNoZeroes_Pads124ZeroBytes()
    {
        using NbdTestClient c = Client(1);
        c.SendOption((uint)NbdOption.ExportName, "disk"u8);
        byte[] reply = c.Read(134);
        Assert.All(reply.AsSpan(10).ToArray(), b => Assert.Equal(0, b));
        Assert.True(c.StillServes());
    }

    [Fact]
    public void SilentClient_IsDroppedAfterTheHandshakeTimeout()
    {
        using var f = new ExportFixture(configure: o => o with { HandshakeTimeout = TimeSpan.FromMilliseconds(300) });
        using var c = new NbdTestClient(f.SocketPath, clientFlags: null);
        Assert.True(c.ServerClosed()); // the client sent nothing after the greeting
    }

    // ---- Transmission phase

    [Fact]
    public void ReadOfLengthZero_NoneChunk()
    {
        using NbdTestClient c = _f.Connect();
        ReplyChunk r = Assert.Single(c.Request(NbdCommand.Read, 0, 0));
        Assert.Equal(NbdChunkType.None, r.Type);
        Assert.True(r.Done);
        Assert.True(c.StillServes());
    }

    [Fact]
    public void UnalignedRead_IsServed()
    {
        _f.Node.Write(0, [1, 2, 3, 4, 5]);
        using NbdTestClient c = _f.Connect();
        List<ReplyChunk> reply = c.Request(NbdCommand.Read, 1, 3);
        Assert.Equal(new byte[] { 2, 3, 4 }, NbdTestClient.DataOf(reply, 1, 3));
        List<ReplyChunk> zeros = c.Request(NbdCommand.Read, 1 << 20, 3);
        Assert.Equal(NbdChunkType.OffsetHole, Assert.Single(zeros).Type); // all zeros: a hole chunk
        Assert.Equal(3u, zeros[0].HoleLength);
    }

    [Theory]
    [InlineData(Size - 512, 1024u)]
    [InlineData(1UL << 63, 512u)]
    [InlineData(ulong.MaxValue, 1u)]
    public void ReadPastTheEnd_EInval_WithoutOverflow(ulong offset, uint length)
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request(NbdCommand.Read, offset, length), NbdError.Invalid, "operation past EOF");
        Assert.True(c.StillServes());
    }

    [Fact]
    public void ReadAboveTheMaxPayload_EInval_NothingAllocated_Alive()
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request(NbdCommand.Read, 0, 64 << 20), NbdError.Invalid, "len (67108864) is larger than max len (33554432)");
        Assert.True(c.StillServes());
    }

    [Fact]
    public void ReadWithDontFragment_OneDataChunkEvenForZeros()
    {
        using NbdTestClient c = _f.Connect();
        ReplyChunk r = Assert.Single(c.Request(NbdCommand.Read, 0, 65536, NbdCommandFlags.DontFragment));
        Assert.Equal(NbdChunkType.OffsetData, r.Type);
        Assert.Equal(65536 + 8, r.Payload.Length);
    }

    [Fact]
    public void ReadWithReqOne_EInvalUnsupportedFlags()
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request(NbdCommand.Read, 0, 512, NbdCommandFlags.ReqOne), NbdError.Invalid, "unsupported flags for command read (got 0x8)");
        Assert.True(c.StillServes());
    }

    [Fact]
    public void WithoutStructuredReplies_ErrorsAreSimpleReplies_AndReadsCarryTheirData()
    {
        _f.Node.Write(0, [9, 8, 7]);
        using NbdTestClient c = _f.Connect(structuredReplies: false);
        ReplyChunk past = Assert.Single(c.Request(NbdCommand.Read, Size, 512));
        Assert.True(past.Simple);
        Assert.Equal((uint)NbdError.Invalid, past.Error);
        ReplyChunk unknown = Assert.Single(c.Request((NbdCommand)99, 0, 512));
        Assert.True(unknown.Simple);
        Assert.Equal((uint)NbdError.Invalid, unknown.Error);
        ReplyChunk read = Assert.Single(c.Request(NbdCommand.Read, 0, 3, simpleReadLength: 3));
        Assert.Equal(new byte[] { 9, 8, 7 }, read.Payload);
        Assert.True(c.StillServes());
    }

    [Fact]
    public void WritePastTheEndWithPayload_ENoSpc_PayloadConsumed_Alive()
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request(NbdCommand.Write, Size - 512, 1024, payload: new byte[1024]), NbdError.NoSpace, "operation past EOF");
        Assert.True(c.StillServes()); // the 1024 payload bytes were not read as a request
    }

    [Fact]
    public void WriteAboveTheMaxPayloadHeaderOnly_EInvalThenClose()
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request(NbdCommand.Write, 0, 64 << 20), NbdError.Invalid, "is larger than max len");
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void WriteZeroesPastTheEnd_ENoSpc_TrimPastTheEnd_EInval()
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request(NbdCommand.WriteZeroes, Size - 512, 1024), NbdError.NoSpace);
        AssertError(c.Request(NbdCommand.Trim, Size - 512, 1024), NbdError.Invalid);
        Assert.True(c.StillServes());
    }

    [Fact]
    public void WriteZeroesWithFastZero_Succeeds()
    {
        using NbdTestClient c = _f.Connect();
        ReplyChunk r = Assert.Single(c.Request(NbdCommand.WriteZeroes, 0, 65536, NbdCommandFlags.FastZero));
        Assert.Equal(0u, r.Error);
    }

    [Fact]
    public void FlushWithOffsetAndLength_AndCache_Succeed()
    {
        using NbdTestClient c = _f.Connect();
        Assert.Equal(0u, Assert.Single(c.Request(NbdCommand.Flush, 4096, 4096)).Error);
        Assert.Equal(0u, Assert.Single(c.Request(NbdCommand.Cache, 0, 65536)).Error);
    }

    [Fact]
    public void UnknownCommand_EInval_Alive()
    {
        using NbdTestClient c = _f.Connect();
        AssertError(c.Request((NbdCommand)99, 0, 512), NbdError.Invalid, "invalid request type (99) received");
        Assert.True(c.StillServes());
    }

    [Fact]
    public void BlockStatusWithoutContext_OfLengthZero_PastTheEnd_EInval()
    {
        using (NbdTestClient none = _f.Connect())
            AssertError(none.Request(NbdCommand.BlockStatus, 0, 65536), NbdError.Invalid, "CMD_BLOCK_STATUS not negotiated");
        using NbdTestClient c = _f.Connect(true, "base:allocation");
        AssertError(c.Request(NbdCommand.BlockStatus, 0, 0), NbdError.Invalid, "need non-zero length");
        AssertError(c.Request(NbdCommand.BlockStatus, Size - 512, 1024), NbdError.Invalid, "operation past EOF");
        Assert.True(c.StillServes());
    }

    [Fact]
    public void BlockStatusOfTwoContexts_OneChunkEach_DoneOnTheLast()
    {
        using NbdTestClient c = _f.Connect(true, "base:allocation", "qemu:dirty-bitmap:bm0");
        List<ReplyChunk> reply = c.Request(NbdCommand.BlockStatus, 0, (uint)Size);
        Assert.Equal(2, reply.Count);
        Assert.Equal((0u, false), (reply[0].ContextId, reply[0].Done));
        Assert.Equal((2u, true), (reply[1].ContextId, reply[1].Done));
        Assert.Equal([(4u << 20, 3u), (65536u, 0u), ((uint)Size - (4u << 20) - 65536u, 3u)], reply[0].Extents);
        Assert.Equal([(4u << 20, 0u), (65536u, 1u), ((uint)Size - (4u << 20) - 65536u, 0u)], reply[1].Extents);
    }

    [Fact]
    public void BlockStatusWithReqOne_OneExtentWithinTheRange()
    {
        using NbdTestClient c = _f.Connect(true, "qemu:dirty-bitmap:bm0");
        Assert.Equal([(4096u, 1u)], Assert.Single(c.Request(NbdCommand.BlockStatus, (4 << 20) + 4096, 4096, NbdCommandFlags.ReqOne)).Extents);
        Assert.Equal([(1u, 0u)], Assert.Single(c.Request(NbdCommand.BlockStatus, 1, 1)).Extents);
        Assert.Equal([(4u << 20, 0u)], Assert.Single(c.Request(NbdCommand.BlockStatus, 0, (uint)Size, NbdCommandFlags.ReqOne)).Extents);
    }

    [Fact]
    public void RequestWithWrongMagic_ClosesWithoutReply()
    {
        using NbdTestClient c = _f.Connect();
        c.SendRequest(NbdCommand.Read, 0, 512, magic: 0xdeadbeef);
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void PipelinedReads_EachReplyCarriesItsCookie()
    {
        using NbdTestClient c = _f.Connect();
        for (ulong i = 0; i < 8; i++)
            c.SendRequest(NbdCommand.Read, i * 65536, 65536, cookie: 0xFFFFFFFF00000000 + i);
        var cookies = new HashSet<ulong>();
        for (int i = 0; i < 8; i++)
            cookies.Add(Assert.Single(c.ReadReply()).Cookie);
        Assert.Equal(Enumerable.Range(0, 8).Select(i => 0xFFFFFFFF00000000 + (ulong)i).ToHashSet(), cookies);
    }

    [Fact]
    public void Disconnect_NoReplyThenClose()
    {
        using NbdTestClient c = _f.Connect();
        c.SendRequest(NbdCommand.Disconnect);
        Assert.True(c.ServerClosed());
    }

    [Fact]
    public void ClientClosingMidWritePayload_WritesNothing_AndOthersAreServed()
    {
        using (NbdTestClient c = _f.Connect())
        {
            c.SendRequest(NbdCommand.Write, 0, 65536, payload: Enumerable.Repeat((byte)0x5a, 1000).ToArray());
        }
        Wait.Until(() => _f.Export.Statistics.Clients == 0, "the connection ended");
        using NbdTestClient next = _f.Connect();
        Assert.Equal(NbdChunkType.OffsetHole, Assert.Single(next.Request(NbdCommand.Read, 0, 16)).Type); // still zeros
        Assert.False(_f.Node.Bitmaps[0].IsDirty(0));
    }

    [Fact]
    public void ClientClosingWithAReadReplyPending_IsSwallowed_AndTheNextClientIsServed()
    {
        using (NbdTestClient c = _f.Connect())
            c.SendRequest(NbdCommand.Read, 0, 1 << 20);
        using NbdTestClient next = _f.Connect();
        Assert.True(next.StillServes());
    }
}
