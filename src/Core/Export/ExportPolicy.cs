using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Export;

/*
 * What an export offers, apart from how it is spoken (the codecs) and from the sockets (NbdConnection), as nbdkit
 * keeps its backend apart from its protocol layer. Everything here is a pure decision on values:
 *
 *   - which name a client may ask for (the export's, or "" for the listener's default export);
 *   - the transmission flags:   HAS_FLAGS FLUSH FUA CACHE, then READ_ONLY, or TRIM WRITE_ZEROES FAST_ZERO when writable;
 *                               DF once structured replies are on; CAN_MULTI_CONN when more than one connection may
 *                               share the node (every connection writes the same BlockNode and FLUSH syncs all of it);
 *   - block sizes 1 / 4096 / 32 MiB (qemu-nbd's): any alignment is served, requests above 32 MiB are refused;
 *   - the metadata contexts a LIST or SET query selects, with QEMU's rules (table below);
 *   - every check of a request, each mapped to one NBD error (nbdkit's validate_request);
 *   - the bitmap rules at start: busy or inconsistent bitmaps are refused (BitmapUse.AllowReadOnly), and an enabled
 *     bitmap cannot be exported read-only from a writable node, in QEMU's words.
 *
 * Metadata queries (QEMU's nbd/server.c; anything else, or a query without a colon, selects nothing and is no error):
 *
 *   query                       LIST                         SET
 *   (no query at all)           every context                nothing
 *   base:                       base:allocation              nothing
 *   base:allocation             base:allocation              base:allocation
 *   qemu:                       every qemu:dirty-bitmap:     nothing
 *   qemu:dirty-bitmap:          every qemu:dirty-bitmap:     nothing
 *   qemu:dirty-bitmap:NAME      that bitmap, if exported     that bitmap, if exported
 *
 * Replies list the selected contexts in QEMU's fixed order (base first, then bitmaps in export order), whatever
 * the order of the queries, each once.
 */

/// <summary>The decision of a request check: no error, or the NBD error, QEMU's message and whether the connection must end.</summary>
public readonly record struct RequestVerdict(NbdError Error, string? Message, bool Disconnect)
{
    public static RequestVerdict Accept => default;

    public bool IsAccepted => Error == NbdError.None;
}

/// <summary>What one export offers and allows: names, flags, block sizes, metadata contexts, request checks.</summary>
public sealed class ExportPolicy
{
    /// <summary>Smallest request alignment advertised: any byte offset and length is served.</summary>
    public const uint MinimumBlockSize = 1;

    /// <summary>Preferred request alignment advertised.</summary>
    public const uint PreferredBlockSize = 4096;

    /// <summary>Largest READ or WRITE payload served (qemu-nbd's NBD_MAX_BUFFER_SIZE); larger requests get EINVAL.</summary>
    public const int MaxPayload = 32 << 20;

    /// <summary>Largest option data read during the handshake; a client that announces more is disconnected without anything being allocated.</summary>
    public const int MaxOptionLength = 64 << 10;

    /// <summary>Most extents in one BLOCK_STATUS chunk (QEMU's cap, 1 MiB of extents).</summary>
    public const int MaxExtentsPerChunk = 131072;

    /// <summary>Longest range one BLOCK_STATUS request describes; the client asks again from where the answer ended.</summary>
    public const long MaxStatusWindow = 1L << 30;

    /// <summary>Same, for base:allocation with REQ_ONE (one extent per round trip: no need to map further ahead).</summary>
    public const long MaxSingleExtentAllocationWindow = 64L << 20;

    public ExportPolicy(string name, string? description, long size, bool writable, bool multiConnection, IReadOnlyList<string> bitmaps)
    {
        Name = name;
        Description = description;
        Size = size;
        Writable = writable;
        MultiConnection = multiConnection;
        Bitmaps = bitmaps;
    }

    /// <summary>The export's name.</summary>
    public string Name { get; }

    public string? Description { get; }

    /// <summary>Exported size in bytes (the node's size, a multiple of 512).</summary>
    public long Size { get; }

    public bool Writable { get; }

    /// <summary>Whether CAN_MULTI_CONN is advertised (more than one connection allowed).</summary>
    public bool MultiConnection { get; }

    /// <summary>Names of the exported bitmaps, in export order (context ids 2, 3, ...).</summary>
    public IReadOnlyList<string> Bitmaps { get; }

    /// <summary>Whether a client asking for <paramref name="requested"/> gets this export ("" is the default export of the listener).</summary>
    public bool Matches(string requested) => requested.Length == 0 || string.Equals(requested, Name, StringComparison.Ordinal);

    /// <summary>The ERR_UNKNOWN text for an export name that is not this one (QEMU's).</summary>
    public static string UnknownExportMessage(string requested) => $"export '{requested}' not present";

    /// <summary>Transmission flags for a connection, with or without structured replies.</summary>
    public NbdTransmissionFlags TransmissionFlags(bool structuredReplies)
    {
        NbdTransmissionFlags flags = NbdTransmissionFlags.HasFlags | NbdTransmissionFlags.SendFlush | NbdTransmissionFlags.SendFua | NbdTransmissionFlags.SendCache;
        flags |= Writable
            ? NbdTransmissionFlags.SendTrim | NbdTransmissionFlags.SendWriteZeroes | NbdTransmissionFlags.SendFastZero
            : NbdTransmissionFlags.ReadOnly;
        if (structuredReplies)
            flags |= NbdTransmissionFlags.SendDf;
        if (MultiConnection)
            flags |= NbdTransmissionFlags.CanMultiConn;
        return flags;
    }

    /// <summary>Every context this export offers, in reply order.</summary>
    public IReadOnlyList<MetaContext> AllContexts()
    {
        var all = new List<MetaContext>(1 + Bitmaps.Count) { new(0, MetaContext.BaseAllocation, MetaContextKind.BaseAllocation, -1) };
        for (int i = 0; i < Bitmaps.Count; i++)
            all.Add(BitmapContext(i));
        return all;
    }

    private MetaContext BitmapContext(int index) => new((uint)(2 + index), MetaContext.DirtyBitmapPrefix + Bitmaps[index], MetaContextKind.DirtyBitmap, index);

    /// <summary>
    /// The contexts selected by the queries of NBD_OPT_LIST_META_CONTEXT (<paramref name="list"/>) or
    /// NBD_OPT_SET_META_CONTEXT, by the table in this file's header; each once, base first, bitmaps in export order.
    /// A null query (longer than the protocol allows) selects nothing.
    /// </summary>
    public IReadOnlyList<MetaContext> Resolve(IReadOnlyList<string?> queries, bool list)
    {
        if (list && queries.Count == 0)
            return AllContexts();
        bool baseAllocation = false;
        bool[] bitmaps = new bool[Bitmaps.Count];
        foreach (string? query in queries)
        {
            if (query is null)
                continue;
            if (query.StartsWith("base:", StringComparison.Ordinal))
            {
                string leaf = query[5..];
                if (leaf == "allocation" || (list && leaf.Length == 0))
                    baseAllocation = true;
            }
            else if (query.StartsWith("qemu:", StringComparison.Ordinal))
            {
                string leaf = query[5..];
                if (leaf.Length == 0 || leaf == "dirty-bitmap:")
                {
                    if (list)
                        Array.Fill(bitmaps, true);
                }
                else if (leaf.StartsWith("dirty-bitmap:", StringComparison.Ordinal))
                {
                    int index = IndexOfBitmap(leaf["dirty-bitmap:".Length..]);
                    if (index >= 0)
                        bitmaps[index] = true;
                }
            }
        }
        var selected = new List<MetaContext>();
        if (baseAllocation)
            selected.Add(new MetaContext(0, MetaContext.BaseAllocation, MetaContextKind.BaseAllocation, -1));
        for (int i = 0; i < bitmaps.Length; i++)
        {
            if (bitmaps[i])
                selected.Add(BitmapContext(i));
        }
        return selected;
    }

    private int IndexOfBitmap(string name)
    {
        for (int i = 0; i < Bitmaps.Count; i++)
        {
            if (string.Equals(Bitmaps[i], name, StringComparison.Ordinal))
                return i;
        }
        return -1;
    }

    /// <summary>
    /// Every check of a request, in QEMU's order, each giving one error: unknown command and flags not valid for it
    /// (EINVAL); a READ or WRITE above <see cref="MaxPayload"/> (EINVAL; for a WRITE the connection must end, since
    /// its payload cannot be skipped safely); a change to a read-only export (EPERM); BLOCK_STATUS without a selected
    /// context or of length 0 (EINVAL); a range past the end (ENOSPC for WRITE and WRITE_ZEROES, EINVAL otherwise),
    /// checked without overflow. FLUSH and DISC ignore their offset and length.
    /// </summary>
    public RequestVerdict Validate(in NbdRequest request, bool structuredReplies, bool contextsSelected)
    {
        NbdCommand command = request.Command;
        if (command > NbdCommand.BlockStatus)
            return new RequestVerdict(NbdError.Invalid, $"invalid request type ({(ushort)command}) received", false);

        NbdCommandFlags valid = NbdCommandFlags.Fua;
        if (command == NbdCommand.Read && structuredReplies)
            valid |= NbdCommandFlags.DontFragment;
        else if (command == NbdCommand.BlockStatus)
            valid |= NbdCommandFlags.ReqOne;
        else if (command == NbdCommand.WriteZeroes)
            valid |= NbdCommandFlags.NoHole | NbdCommandFlags.FastZero;

        if (command == NbdCommand.Write && request.Length > MaxPayload)
            return new RequestVerdict(NbdError.Invalid, $"len ({request.Length}) is larger than max len ({MaxPayload})", Disconnect: true);
        if ((request.Flags & ~valid) != 0)
            return new RequestVerdict(NbdError.Invalid, $"unsupported flags for command {CommandName(command)} (got 0x{(ushort)request.Flags:x})", false);
        if (command == NbdCommand.Read && request.Length > MaxPayload)
            return new RequestVerdict(NbdError.Invalid, $"len ({request.Length}) is larger than max len ({MaxPayload})", false);
        if (!Writable && command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim)
            return new RequestVerdict(NbdError.Perm, $"export '{Name}' is read-only", false);
        if (command == NbdCommand.BlockStatus)
        {
            if (!structuredReplies || !contextsSelected)
                return new RequestVerdict(NbdError.Invalid, "CMD_BLOCK_STATUS not negotiated", false);
            if (request.Length == 0)
                return new RequestVerdict(NbdError.Invalid, "need non-zero length", false);
        }
        if (command is NbdCommand.Flush or NbdCommand.Disconnect)
            return RequestVerdict.Accept;
        if (request.Offset > (ulong)Size || request.Length > (ulong)Size - request.Offset)
        {
            NbdError error = command is NbdCommand.Write or NbdCommand.WriteZeroes ? NbdError.NoSpace : NbdError.Invalid;
            return new RequestVerdict(error, $"operation past EOF; From: {request.Offset}, Len: {request.Length}, Size: {Size}", false);
        }
        return RequestVerdict.Accept;
    }

    /// <summary>The command's name in QEMU's messages.</summary>
    public static string CommandName(NbdCommand command) => command switch
    {
        NbdCommand.Read => "read",
        NbdCommand.Write => "write",
        NbdCommand.Disconnect => "disconnect",
        NbdCommand.Flush => "flush",
        NbdCommand.Trim => "trim",
        NbdCommand.Cache => "cache",
        NbdCommand.WriteZeroes => "write zeroes",
        NbdCommand.BlockStatus => "block status",
        _ => "<unknown>",
    };

    /// <summary>
    /// Refuse a bitmap an export cannot take (QEMU's nbd_export_create): one that is busy or inconsistent
    /// (<see cref="BitmapUse.AllowReadOnly"/>), or an enabled one on a read-only export of a writable node, whose
    /// bits would change under a reader that was promised a read-only view.
    /// </summary>
    /// <exception cref="BlockException">BitmapBusy, BitmapInconsistent, BitmapEnabledForReadOnlyExport.</exception>
    public static void CheckBitmap(DirtyBitmap bitmap, bool exportWritable)
    {
        bitmap.Check(BitmapUse.AllowReadOnly);
        if (!exportWritable && !bitmap.Node.ReadOnly && bitmap.Enabled)
            Throw.Block(ErrorIds.BitmapEnabledForReadOnlyExport, BlockErrorCategory.InvalidOperation,
                $"Enabled bitmap '{bitmap.Name}' incompatible with readonly export: node '{bitmap.Node.Name}' is writable, so the bitmap would change under the export's readers. "
                + "Disable it first (Disable-DirtyBitmap), or export the node with -Writable.", bitmap.Name);
    }

    /// <summary>Refuse a name or description the protocol cannot carry.</summary>
    /// <exception cref="BlockException">ExportNameInvalid, ExportDescriptionTooLong.</exception>
    public static void CheckNames(string name, string? description)
    {
        if (name.Length == 0 || NbdHandshakeCodec.EncodedLength(name) > NbdMagic.MaxStringLength)
            Throw.Block(ErrorIds.ExportNameInvalid, BlockErrorCategory.InvalidArgument,
                $"Export name '{name}' is invalid: it must be 1 to {NbdMagic.MaxStringLength} bytes of UTF-8.", name);
        if (description is not null && NbdHandshakeCodec.EncodedLength(description) > NbdMagic.MaxStringLength)
            Throw.Block(ErrorIds.ExportDescriptionTooLong, BlockErrorCategory.InvalidArgument,
                $"The description of export '{name}' is longer than {NbdMagic.MaxStringLength} bytes of UTF-8, the most NBD can carry.", name);
    }

    /// <summary>The NBD error for an engine failure: ENOSPC for a full file system or quota, EPERM for a read-only node, EIO otherwise.</summary>
    public static NbdError ErrorFor(Exception e)
    {
        if (e is BlockException { ErrorId: ErrorIds.NodeReadOnly })
            return NbdError.Perm;
        if (e is BlockException { ErrorId: ErrorIds.NodeClosed })
            return NbdError.Shutdown;
        for (Exception? inner = e; inner is not null; inner = inner.InnerException)
        {
            if (inner is IOException { HResult: Errno.NoSpace or Errno.QuotaExceeded or Errno.FileTooBig })
                return NbdError.NoSpace;
            if (inner.Message.Contains("No space left on device", StringComparison.Ordinal) || inner.Message.Contains("Disk quota exceeded", StringComparison.Ordinal))
                return NbdError.NoSpace;
        }
        return NbdError.Io;
    }

    /// <summary>Linux errno values the error mapping looks for (.NET puts the raw errno in an IOException's HResult on Unix).</summary>
    private static class Errno
    {
        public const int FileTooBig = 27;
        public const int NoSpace = 28;
        public const int QuotaExceeded = 122;
    }
}
