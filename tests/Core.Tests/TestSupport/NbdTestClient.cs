using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using BitmapBackup.Core.Export;

namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>One option reply: its type and payload.</summary>
public sealed record OptionReply(NbdOptionReply Type, byte[] Data)
{
    public string Text => Encoding.UTF8.GetString(Data);

    /// <summary>The context id and name of a META_CONTEXT reply.</summary>
    public (uint Id, string Name) MetaContext => (BinaryPrimitives.ReadUInt32BigEndian(Data), Encoding.UTF8.GetString(Data, 4, Data.Length - 4));

    /// <summary>The info type of an INFO reply.</summary>
    public NbdInfoType InfoType => (NbdInfoType)BinaryPrimitives.ReadUInt16BigEndian(Data);
}

/// <summary>One structured reply chunk (or a simple reply, as <see cref="NbdChunkType.None"/> with <see cref="SimpleError"/>).</summary>
public sealed record ReplyChunk(bool Simple, uint SimpleError, bool Done, NbdChunkType Type, ulong Cookie, byte[] Payload)
{
    public uint Error => Simple ? SimpleError : BinaryPrimitives.ReadUInt32BigEndian(Payload);

    public string Message => Encoding.UTF8.GetString(Payload, 6, BinaryPrimitives.ReadUInt16BigEndian(Payload.AsSpan(4)));

    public ulong Offset => BinaryPrimitives.ReadUInt64BigEndian(Payload);

    public uint HoleLength => BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(8));

    public uint ContextId => BinaryPrimitives.ReadUInt32BigEndian(Payload);

    public (uint Length, uint Flags)[] Extents => Enumerable.Range(0, (Payload.Length - 4) / 8)
        .Select(i => (BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(4 + (8 * i))), BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(8 + (8 * i)))))
        .ToArray();
}

/// <summary>
/// A raw-socket NBD client for tests, after the research note's nbdprobe.py: it sends exactly the bytes a test
/// asks for (well-formed or hostile) and decodes what the server answers. Blocking I/O with a receive timeout, so a
/// server that does not answer fails the test instead of hanging it.
/// </summary>
public sealed class NbdTestClient : IDisposable
{
    private readonly Socket _socket;

    public NbdTestClient(string socketPath, uint? clientFlags = 3, int timeoutMs = 10000)
    {
        _socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = timeoutMs, SendTimeout = timeoutMs };
        _socket.Connect(new UnixDomainSocketEndPoint(socketPath));
        byte[] greeting = Read(18);
        HandshakeFlags = BinaryPrimitives.ReadUInt16BigEndian(greeting.AsSpan(16));
        if (BinaryPrimitives.ReadUInt64BigEndian(greeting) != NbdMagic.Greeting || BinaryPrimitives.ReadUInt64BigEndian(greeting.AsSpan(8)) != NbdMagic.Option)
            throw new InvalidDataException("bad greeting");
        if (clientFlags is uint flags)
            Send(BigEndian(flags));
    }

    public ushort HandshakeFlags { get; }

    public NbdTransmissionFlags TransmissionFlags { get; private set; }

    public ulong ExportSize { get; private set; }

    public Socket Socket => _socket;

    #region Raw I/O

    public void Send(ReadOnlySpan<byte> data) => _socket.Send(data);

    public byte[] Read(int count)
    {
        byte[] buffer = new byte[count];
        int done = 0;
        while (done < count)
        {
            int n = _socket.Receive(buffer, done, count - done, SocketFlags.None);
            if (n == 0)
                throw new EndOfStreamException($"server closed the connection ({done} of {count} bytes read)");
            done += n;
        }
        return buffer;
    }

    /// <summary>Whether the server closed the connection (a read returns end of stream) rather than sending anything.</summary>
    public bool ServerClosed()
    {
        try
        {
            byte[] one = new byte[1];
            return _socket.Receive(one) == 0;
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.ConnectionReset)
        {
            return true;
        }
    }

    public static byte[] BigEndian(uint value)
    {
        byte[] b = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        return b;
    }

    #endregion

    #region Handshake

    public void SendOption(uint option, ReadOnlySpan<byte> data = default, uint? length = null, ulong magic = NbdMagic.Option)
    {
        byte[] header = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(header, magic);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(8), option);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(12), length ?? (uint)data.Length);
        Send([.. header, .. data]);
    }

    public OptionReply ReadOptionReply()
    {
        byte[] header = Read(20);
        if (BinaryPrimitives.ReadUInt64BigEndian(header) != NbdMagic.OptionReply)
            throw new InvalidDataException("bad option reply magic");
        var type = (NbdOptionReply)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
        uint length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(16));
        return new OptionReply(type, Read((int)length));
    }

    /// <summary>Replies up to and including the final one (ACK or an error).</summary>
    public List<OptionReply> ReadOptionReplies()
    {
        var replies = new List<OptionReply>();
        while (true)
        {
            OptionReply r = ReadOptionReply();
            replies.Add(r);
            if (r.Type is not (NbdOptionReply.Info or NbdOptionReply.Server or NbdOptionReply.MetaContext))
                return replies;
        }
    }

    public List<OptionReply> Option(NbdOption option, ReadOnlySpan<byte> data = default)
    {
        SendOption((uint)option, data);
        return ReadOptionReplies();
    }

    public static byte[] InfoData(string name, params NbdInfoType[] infos)
    {
        byte[] n = Encoding.UTF8.GetBytes(name);
        byte[] data = new byte[4 + n.Length + 2 + (2 * infos.Length)];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)n.Length);
        n.CopyTo(data, 4);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(4 + n.Length), (ushort)infos.Length);
        for (int i = 0; i < infos.Length; i++)
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(6 + n.Length + (2 * i)), (ushort)infos[i]);
        return data;
    }

    public static byte[] MetaData(string name, params string[] queries)
    {
        var data = new List<byte>();
        byte[] n = Encoding.UTF8.GetBytes(name);
        data.AddRange(BigEndian((uint)n.Length));
        data.AddRange(n);
        data.AddRange(BigEndian((uint)queries.Length));
        foreach (string q in queries)
        {
            byte[] b = Encoding.UTF8.GetBytes(q);
            data.AddRange(BigEndian((uint)b.Length));
            data.AddRange(b);
        }
        return [.. data];
    }

    /// <summary>NBD_OPT_GO; on success the export's size and flags are kept and the client is in transmission.</summary>
    public List<OptionReply> Go(string name, params NbdInfoType[] infos)
    {
        List<OptionReply> replies = Option(NbdOption.Go, InfoData(name, infos));
        foreach (OptionReply r in replies.Where(r => r.Type == NbdOptionReply.Info && r.InfoType == NbdInfoType.Export))
        {
            ExportSize = BinaryPrimitives.ReadUInt64BigEndian(r.Data.AsSpan(2));
            TransmissionFlags = (NbdTransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(r.Data.AsSpan(10));
        }
        return replies;
    }

    /// <summary>The usual negotiation: structured replies, optional metadata contexts, GO. Throws unless it succeeds.</summary>
    public NbdTestClient Negotiate(string export, bool structuredReplies = true, params string[] contexts)
    {
        if (structuredReplies && Option(NbdOption.StructuredReply)[^1].Type != NbdOptionReply.Ack)
            throw new InvalidOperationException("structured replies refused");
        if (contexts.Length > 0 && Option(NbdOption.SetMetaContext, MetaData(export, contexts))[^1].Type != NbdOptionReply.Ack)
            throw new InvalidOperationException("meta contexts refused");
        List<OptionReply> go = Go(export, NbdInfoType.BlockSize);
        if (go[^1].Type != NbdOptionReply.Ack)
            throw new InvalidOperationException($"GO refused: {go[^1].Type} {go[^1].Text}");
        return this;
    }

    #endregion

    #region Transmission

    public void SendRequest(NbdCommand command, ulong offset = 0, uint length = 0, NbdCommandFlags flags = NbdCommandFlags.None, ulong cookie = 0x1122334455667788, ReadOnlySpan<byte> payload = default, uint magic = NbdMagic.Request)
    {
        byte[] header = new byte[28];
        NbdTransmissionCodec.WriteRequest(header, new NbdRequest(flags, command, cookie, offset, length));
        BinaryPrimitives.WriteUInt32BigEndian(header, magic);
        Send([.. header, .. payload]);
    }

    /// <summary>
    /// Read one whole reply: a simple reply (with <paramref name="simpleReadLength"/> bytes of data when it is a
    /// successful READ without structured replies) or every chunk up to DONE.
    /// </summary>
    public List<ReplyChunk> ReadReply(int simpleReadLength = 0)
    {
        var chunks = new List<ReplyChunk>();
        while (true)
        {
            uint magic = BinaryPrimitives.ReadUInt32BigEndian(Read(4));
            if (magic == NbdMagic.SimpleReply)
            {
                byte[] rest = Read(12);
                uint error = BinaryPrimitives.ReadUInt32BigEndian(rest);
                ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4));
                byte[] data = error == 0 && simpleReadLength > 0 ? Read(simpleReadLength) : [];
                chunks.Add(new ReplyChunk(true, error, true, NbdChunkType.None, cookie, data));
                return chunks;
            }
            if (magic != NbdMagic.StructuredReply)
                throw new InvalidDataException($"bad reply magic 0x{magic:x}");
            byte[] header = Read(16);
            bool done = (BinaryPrimitives.ReadUInt16BigEndian(header) & 1) != 0;
            var type = (NbdChunkType)BinaryPrimitives.ReadUInt16BigEndian(header.AsSpan(2));
            ulong chunkCookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(4));
            uint length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
            chunks.Add(new ReplyChunk(false, 0, done, type, chunkCookie, Read((int)length)));
            if (done)
                return chunks;
        }
    }

    /// <summary>Send a request and read its whole reply.</summary>
    public List<ReplyChunk> Request(NbdCommand command, ulong offset = 0, uint length = 0, NbdCommandFlags flags = NbdCommandFlags.None, ReadOnlySpan<byte> payload = default, int simpleReadLength = 0)
    {
        SendRequest(command, offset, length, flags, payload: payload);
        return ReadReply(simpleReadLength);
    }

    /// <summary>Read whole replies until the server closes the connection; returns how many came.</summary>
    public int ReadRepliesUntilClosed()
    {
        int count = 0;
        while (true)
        {
            try
            {
                ReadReply();
                count++;
            }
            catch (EndOfStreamException)
            {
                return count;
            }
        }
    }

    /// <summary>Whether the connection still works: a FLUSH gets a successful reply.</summary>
    public bool StillServes()
    {
        SendRequest(NbdCommand.Flush, cookie: 7);
        List<ReplyChunk> reply = ReadReply();
        return reply.Count == 1 && reply[0].Cookie == 7 && reply[0].Error == 0;
    }

    /// <summary>Whether the handshake still goes on: an OPT_LIST gets its export list.</summary>
    public bool StillNegotiates() => Option(NbdOption.List)[^1].Type == NbdOptionReply.Ack;

    /// <summary>The data of a READ reply (OFFSET_DATA and OFFSET_HOLE chunks placed at their offsets).</summary>
    public static byte[] DataOf(List<ReplyChunk> reply, ulong offset, int length)
    {
        byte[] data = new byte[length];
        foreach (ReplyChunk c in reply)
        {
            if (c.Simple)
                return c.Payload;
            if (c.Type == NbdChunkType.OffsetData)
                c.Payload.AsSpan(8).CopyTo(data.AsSpan((int)(c.Offset - offset)));
        }
        return data;
    }

    #endregion

    public void Dispose() => _socket.Dispose();
}
