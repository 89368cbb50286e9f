using System.Buffers;
using System.Net.Sockets;

namespace BitmapBackup.Core.Export;

/*
 * The option loop, on the connection's reader thread, one option at a time, each read whole (its length is checked
 * against the 64 KiB cap before anything is read or allocated) and answered before the next is read; every receive
 * and send gets what is left of the handshake timeout. What each option gets (QEMU's answers and
 * texts, checked against qemu-nbd 7.2 with the research note's prober):
 *
 *   EXPORT_NAME          known: size, flags (+124 zeros without NO_ZEROES), transmission; unknown: close
 *   ABORT                ACK, close
 *   LIST                 SERVER (name, description), ACK; data present: ERR_INVALID
 *   STARTTLS             ERR_POLICY "TLS not configured"
 *   INFO / GO            [NAME if asked] [DESCRIPTION] BLOCK_SIZE EXPORT ACK; GO then enters transmission;
 *                        bad lengths: ERR_INVALID; other export: ERR_UNKNOWN; export stopping: ERR_SHUTDOWN
 *   STRUCTURED_REPLY     ACK; with data or a second time: ERR_INVALID
 *   LIST_META_CONTEXT    META_CONTEXT (id 0) per match, ACK
 *   SET_META_CONTEXT     META_CONTEXT (its id) per match, ACK; before STRUCTURED_REPLY: ERR_INVALID
 *   anything else        ERR_UNSUP (EXTENDED_HEADERS included: clients fall back to structured replies)
 *
 * A client that did not set FIXED_NEWSTYLE may only send EXPORT_NAME (anything else closes), as with qemu-nbd; unknown
 * client flags, a wrong option magic and an oversized option close the connection at once.
 */
internal sealed partial class NbdConnection
{
    private enum OptionOutcome
    {
        Continue,
        Transmission,
        Close,
    }

    // Negotiated during the handshake, read-only afterwards.
    private bool _structuredReplies;
    private bool _noZeroes;
    private IReadOnlyList<MetaContext> _contexts = []; // one export per listener: a SET can only have selected this export's contexts

    private NbdTransmissionFlags _transmissionFlags;

    /// <summary>Run the handshake; true when the client entered the transmission phase.</summary>
    private bool Handshake()
    {
        const NbdHandshakeFlags offered = NbdHandshakeFlags.FixedNewstyle | NbdHandshakeFlags.NoZeroes;
        DateTime deadline = DateTime.UtcNow + _export.HandshakeTimeout;
        byte[] greeting = new byte[NbdMagic.GreetingLength];
        NbdHandshakeCodec.WriteGreeting(greeting, offered);
        if (!Within(deadline))
            return false;
        SendHandshake(greeting);

        byte[] header = new byte[NbdMagic.OptionHeaderLength];
        if (!Within(deadline) || !_reader.ReadExactly(header.AsSpan(0, 4)))
            return false;
        if (!NbdHandshakeCodec.TryReadClientFlags(header, offered, out NbdHandshakeFlags clientFlags))
            return false;
        _noZeroes = (clientFlags & NbdHandshakeFlags.NoZeroes) != 0;
        bool fixedNewstyle = (clientFlags & NbdHandshakeFlags.FixedNewstyle) != 0;

        while (true)
        {
            if (!Within(deadline) || !_reader.ReadExactly(header))
                return false;
            if (!NbdHandshakeCodec.TryReadOptionHeader(header, out NbdOptionHeader option))
                return false;
            if (option.Length > ExportPolicy.MaxOptionLength)
                return false; // never allocate what a length field claims
            if (!fixedNewstyle && option.Option != (uint)NbdOption.ExportName)
                return false;
            byte[] data = ArrayPool<byte>.Shared.Rent((int)option.Length);
            try
            {
                if (!Within(deadline) || !_reader.ReadExactly(data.AsSpan(0, (int)option.Length)))
                    return false;
                var replies = new List<byte[]>();
                OptionOutcome outcome = Answer(option.Option, data.AsSpan(0, (int)option.Length), replies);
                if (!Within(deadline))
                    return false;
                try
                {
                    foreach (byte[] reply in replies)
                        SendHandshake(reply);
                }
                catch (SocketException) when (outcome == OptionOutcome.Close)
                {
                    // the client closed first after ABORT: tolerated
                }
                if (outcome != OptionOutcome.Continue)
                {
                    _socket.ReceiveTimeout = 0;
                    _socket.SendTimeout = 0;
                    return outcome == OptionOutcome.Transmission;
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(data);
            }
        }
    }

    /// <summary>Give the next receive or send what is left of the handshake's time; false when none is left or the export stops.</summary>
    private bool Within(DateTime deadline)
    {
        int left = (int)Math.Ceiling((deadline - DateTime.UtcNow).TotalMilliseconds);
        if (left <= 0)
            return false;
        _socket.ReceiveTimeout = left;
        _socket.SendTimeout = left;
        return true;
    }

    /// <summary>Decide the answer to one option: the replies to send and what happens next.</summary>
    private OptionOutcome Answer(uint option, ReadOnlySpan<byte> data, List<byte[]> replies)
    {
        string name = NbdHandshakeCodec.NameOf(option);
        if (_export.IsStopping && option != (uint)NbdOption.Abort)
        {
            if (option != (uint)NbdOption.ExportName)
                replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrShutdown, "Server is shutting down"));
            return OptionOutcome.Close;
        }
        switch ((NbdOption)option)
        {
            case NbdOption.ExportName:
            {
                string requested = NbdHandshakeCodec.DecodeString(data);
                if (!Policy.Matches(requested))
                    return OptionOutcome.Close; // no error path in EXPORT_NAME: the connection just ends
                _transmissionFlags = Policy.TransmissionFlags(_structuredReplies);
                replies.Add(NbdHandshakeCodec.ExportNameReply((ulong)Policy.Size, _transmissionFlags, _noZeroes));
                return OptionOutcome.Transmission;
            }
            case NbdOption.Abort:
                replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Ack));
                return OptionOutcome.Close;
            case NbdOption.List:
                if (!data.IsEmpty)
                {
                    replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrInvalid, $"option '{name}' has unexpected length"));
                    return OptionOutcome.Continue;
                }
                replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Server, NbdHandshakeCodec.ServerPayload(Policy.Name, Policy.Description)));
                replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Ack));
                return OptionOutcome.Continue;
            case NbdOption.StartTls:
                replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrPolicy, "TLS not configured"));
                return OptionOutcome.Continue;
            case NbdOption.Info:
            case NbdOption.Go:
                return AnswerInfo(option, data, name, replies);
            case NbdOption.StructuredReply:
                if (!data.IsEmpty)
                    replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrInvalid, $"option '{name}' has unexpected length"));
                else if (_structuredReplies)
                    replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrInvalid, "structured reply already negotiated"));
                else
                {
                    _structuredReplies = true;
                    replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Ack));
                }
                return OptionOutcome.Continue;
            case NbdOption.ListMetaContext:
            case NbdOption.SetMetaContext:
                AnswerMetaContext(option, data, name, replies);
                return OptionOutcome.Continue;
            default:
                replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrUnsupported, $"Unsupported option {option} ({name})"));
                return OptionOutcome.Continue;
        }
    }

    private OptionOutcome AnswerInfo(uint option, ReadOnlySpan<byte> data, string name, List<byte[]> replies)
    {
        NbdExportInfoRequest? request = NbdHandshakeCodec.ParseExportInfoRequest(data, name, out string? error);
        if (request is null)
        {
            replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrInvalid, error!));
            return OptionOutcome.Continue;
        }
        if (!Policy.Matches(request.Name))
        {
            replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrUnknown, ExportPolicy.UnknownExportMessage(request.Name)));
            return OptionOutcome.Continue;
        }
        if (request.InfoRequests.Contains(NbdInfoType.Name))
            replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Info, NbdHandshakeCodec.InfoStringPayload(NbdInfoType.Name, Policy.Name)));
        if (Policy.Description is { } description)
            replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Info, NbdHandshakeCodec.InfoStringPayload(NbdInfoType.Description, description)));
        replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Info,
            NbdHandshakeCodec.InfoBlockSizePayload(ExportPolicy.MinimumBlockSize, ExportPolicy.PreferredBlockSize, ExportPolicy.MaxPayload)));
        NbdTransmissionFlags flags = Policy.TransmissionFlags(_structuredReplies);
        replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Info, NbdHandshakeCodec.InfoExportPayload((ulong)Policy.Size, flags)));
        replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Ack));
        if (option != (uint)NbdOption.Go)
            return OptionOutcome.Continue;
        _transmissionFlags = flags;
        return OptionOutcome.Transmission;
    }

    private void AnswerMetaContext(uint option, ReadOnlySpan<byte> data, string name, List<byte[]> replies)
    {
        bool list = option == (uint)NbdOption.ListMetaContext;
        if (!list && !_structuredReplies)
        {
            replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrInvalid, $"request option '{name}' when structured reply is not negotiated"));
            return;
        }
        NbdMetaContextRequest? request = NbdHandshakeCodec.ParseMetaContextRequest(data, name, out string? error);
        if (request is null)
        {
            replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrInvalid, error!));
            return;
        }
        if (!Policy.Matches(request.ExportName))
        {
            replies.Add(NbdHandshakeCodec.ErrorReply(option, NbdOptionReply.ErrUnknown, ExportPolicy.UnknownExportMessage(request.ExportName)));
            return;
        }
        IReadOnlyList<MetaContext> selected = Policy.Resolve(request.Queries, list);
        foreach (MetaContext context in selected)
            replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.MetaContext, NbdHandshakeCodec.MetaContextPayload(list ? 0 : context.Id, context.Name)));
        replies.Add(NbdHandshakeCodec.OptionReply(option, NbdOptionReply.Ack));
        if (!list)
            _contexts = selected;
    }
}
