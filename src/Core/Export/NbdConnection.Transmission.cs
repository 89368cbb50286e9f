using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Export;

/*
 * The request path, as nbdkit's protocol.c splits it: read → validate (ExportPolicy.Validate, every check in one
 * place) → execute (a switch that calls the node and nothing else) → encode the reply (NbdTransmissionCodec) under
 * the send lock.
 *
 * Reader loop (one per connection, in stream order):
 *   header     28 bytes; wrong magic: close without a reply (the stream cannot be trusted any more)
 *   DISC       stop reading; the requests in flight finish and reply; close
 *   check      a WRITE above 32 MiB: EINVAL, then close; any other refusal: its error, after a refused WRITE's
 *              payload has been read and dropped through the 64 KiB buffer (nothing allocated for it)
 *   admit      wait for room among the requests in flight (MaxRequestsInFlight, MaxBytesInFlight)
 *   payload    a WRITE's payload into a pooled buffer; a client that leaves mid-payload had nothing written
 *   run        BLOCK_STATUS and CACHE right here (metadata only, no data I/O); READ, WRITE, WRITE_ZEROES, TRIM, FLUSH
 *              on the thread pool, so replies may go out of order
 *
 * Semantics (QEMU's, through the node's one write path: write gate, copy-before-write of a running backup, every
 * recording bitmap marked even when the write fails):
 *   READ          structured: one OFFSET_HOLE chunk when the data read is all zeros and DF is not set, else one
 *                 OFFSET_DATA chunk; simple: the reply header then the data; length 0: NONE (structured) or no data
 *   WRITE         BlockNode.Write; FUA: then BlockNode.Flush
 *   WRITE_ZEROES  BlockNode.WriteZeroes (the range may be deallocated: NO_HOLE is a SHOULD, and the range reads as
 *                 zeros either way); FAST_ZERO is honoured, zeroing is a hole punch or a metadata change here
 *   TRIM          BlockNode.WriteZeroes too: the range reads as zeros afterwards and is marked dirty like any write.
 *                 QEMU's default (--discard=ignore) makes TRIM a no-op; zeroing is chosen because FUSE and file
 *                 systems expect a punched hole to read as zeros (nbdfuse maps fallocate PUNCH_HOLE to TRIM)
 *   FLUSH         BlockNode.Flush: every write replied to before it is durable (Sync-BlockNode's call)
 *   CACHE         success (a hint)
 *   BLOCK_STATUS  one chunk per selected context, DONE on the last (BlockStatusExtents)
 * Engine errors become NBD errors (ExportPolicy.ErrorFor): ENOSPC for a full file system, EIO otherwise, and the
 * connection goes on.
 */
internal sealed partial class NbdConnection
{
    private async Task TransmissionAsync()
    {
        byte[] header = new byte[NbdMagic.RequestLength];
        while (!_broken)
        {
            try
            {
                if (!await _reader.ReadExactlyAsync(header, _stopping).ConfigureAwait(false))
                    return;
            }
            catch (OperationCanceledException)
            {
                return; // the export is stopping: no new request
            }
            if (!NbdTransmissionCodec.TryReadRequest(header, out NbdRequest request))
                return;
            if (request.Command == NbdCommand.Disconnect)
                return;
            _export.Statistics.AddRequest();
            RequestVerdict verdict = Policy.Validate(request, _structuredReplies, _contexts.Count > 0);
            if (verdict.Disconnect)
            {
                await ReplyErrorAsync(request, verdict.Error, verdict.Message!).ConfigureAwait(false);
                return;
            }
            long bytes = verdict.IsAccepted && request.Command is NbdCommand.Read or NbdCommand.Write ? request.Length : 0;
            try
            {
                await AdmitAsync(bytes, _stopping).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            if (!verdict.IsAccepted)
            {
                bool inSync = request.Command != NbdCommand.Write || await SkipPayloadAsync(request.Length).ConfigureAwait(false);
                if (inSync)
                    await ReplyErrorAsync(request, verdict.Error, verdict.Message!).ConfigureAwait(false);
                Complete(bytes);
                if (!inSync)
                    return;
                continue;
            }
            byte[]? payload = null;
            if (request.Command == NbdCommand.Write && request.Length > 0)
            {
                payload = _export.Buffers.Rent((int)request.Length);
                if (!await ReadPayloadAsync(payload, (int)request.Length).ConfigureAwait(false))
                {
                    _export.Buffers.Return(payload);
                    Complete(bytes);
                    return; // the client left mid-payload: nothing was written
                }
            }
            if (request.Command is NbdCommand.BlockStatus or NbdCommand.Cache)
                await ExecuteAsync(request, payload, bytes).ConfigureAwait(false);
            else
                _ = Task.Run(() => ExecuteAsync(request, payload, bytes));
        }
    }

    private async ValueTask<bool> ReadPayloadAsync(byte[] payload, int length)
    {
        try
        {
            return await _reader.ReadExactlyAsync(payload.AsMemory(0, length), _stopping).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    private async ValueTask<bool> SkipPayloadAsync(uint length)
    {
        try
        {
            return await _reader.SkipAsync(length, _stopping).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    /// <summary>Run one admitted request and reply; never throws. Returns the payload buffer and releases the request's room.</summary>
    private async Task ExecuteAsync(NbdRequest request, byte[]? payload, long bytes)
    {
        try
        {
            BlockNode node = _export.Node;
            bool fua = (request.Flags & NbdCommandFlags.Fua) != 0;
            switch (request.Command)
            {
                case NbdCommand.Read:
                    await ReadAsync(node, request).ConfigureAwait(false);
                    return;
                case NbdCommand.Write:
                    if (payload is not null)
                        node.Write((long)request.Offset, payload.AsSpan(0, (int)request.Length));
                    if (fua)
                        node.Flush();
                    _export.Statistics.AddWritten(request.Length);
                    break;
                case NbdCommand.WriteZeroes:
                case NbdCommand.Trim:
                    if (request.Length > 0)
                        node.WriteZeroes((long)request.Offset, request.Length);
                    if (fua)
                        node.Flush();
                    break;
                case NbdCommand.Flush:
                    node.Flush();
                    break;
                case NbdCommand.Cache:
                    break;
                case NbdCommand.BlockStatus:
                    await BlockStatusAsync(node, request).ConfigureAwait(false);
                    return;
            }
            await ReplyOkAsync(request.Cookie).ConfigureAwait(false);
        }
        catch (BlockException e)
        {
            await ReplyErrorAsync(request, ExportPolicy.ErrorFor(e), e.Message).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or InvalidOperationException)
        {
            await ReplyErrorAsync(request, NbdError.Io, e.Message).ConfigureAwait(false);
        }
        finally
        {
            if (payload is not null)
                _export.Buffers.Return(payload);
            Complete(bytes);
        }
    }

    private async ValueTask ReadAsync(BlockNode node, NbdRequest request)
    {
        int length = (int)request.Length;
        if (length == 0)
        {
            byte[] empty = new byte[_structuredReplies ? NbdMagic.ChunkHeaderLength : NbdMagic.SimpleReplyLength];
            if (_structuredReplies)
                NbdTransmissionCodec.WriteNoneChunk(empty, request.Cookie);
            else
                NbdTransmissionCodec.WriteSimpleReply(empty, NbdError.None, request.Cookie);
            await SendReplyAsync(empty).ConfigureAwait(false);
            return;
        }
        byte[] buffer = _export.Buffers.Rent(length);
        try
        {
            node.Read((long)request.Offset, buffer.AsSpan(0, length));
            _export.Statistics.AddRead(length);
            if (!_structuredReplies)
            {
                byte[] simple = new byte[NbdMagic.SimpleReplyLength];
                NbdTransmissionCodec.WriteSimpleReply(simple, NbdError.None, request.Cookie);
                await SendReplyAsync(simple, buffer.AsMemory(0, length)).ConfigureAwait(false);
            }
            else if ((request.Flags & NbdCommandFlags.DontFragment) == 0 && !buffer.AsSpan(0, length).ContainsAnyExcept((byte)0))
            {
                byte[] hole = new byte[NbdTransmissionCodec.OffsetHoleLength];
                NbdTransmissionCodec.WriteOffsetHole(hole, done: true, request.Cookie, request.Offset, request.Length);
                await SendReplyAsync(hole).ConfigureAwait(false);
            }
            else
            {
                byte[] prefix = new byte[NbdTransmissionCodec.OffsetDataPrefixLength];
                NbdTransmissionCodec.WriteOffsetDataPrefix(prefix, done: true, request.Cookie, request.Offset, length);
                await SendReplyAsync(prefix, buffer.AsMemory(0, length)).ConfigureAwait(false);
            }
        }
        finally
        {
            _export.Buffers.Return(buffer);
        }
    }

    private async ValueTask BlockStatusAsync(BlockNode node, NbdRequest request)
    {
        bool one = (request.Flags & NbdCommandFlags.ReqOne) != 0;
        int max = one ? 1 : ExportPolicy.MaxExtentsPerChunk;
        long offset = (long)request.Offset;
        var chunks = new List<(uint Id, List<NbdExtent> Extents)>(_contexts.Count);
        int total = 0;
        foreach (MetaContext context in _contexts)
        {
            List<NbdExtent> extents;
            if (context.Kind == MetaContextKind.BaseAllocation)
            {
                long window = Math.Min(request.Length, one ? ExportPolicy.MaxSingleExtentAllocationWindow : ExportPolicy.MaxStatusWindow);
                extents = BlockStatusExtents.FromAllocation(node.EnumerateChainAllocation(offset, window), max);
            }
            else
            {
                DirtyBitmap bitmap = _export.ExportedBitmaps[context.BitmapIndex];
                long window = Math.Min(request.Length, ExportPolicy.MaxStatusWindow);
                extents = BlockStatusExtents.FromBitmap(bitmap.GetExtents(offset, window, max));
            }
            chunks.Add((context.Id, extents));
            total += NbdTransmissionCodec.BlockStatusChunkLength(extents.Count);
        }
        byte[] reply = new byte[total];
        int at = 0;
        for (int i = 0; i < chunks.Count; i++)
            at += NbdTransmissionCodec.WriteBlockStatusChunk(reply.AsSpan(at), done: i == chunks.Count - 1, request.Cookie, chunks[i].Id, chunks[i].Extents.ToArray());
        await SendReplyAsync(reply).ConfigureAwait(false);
    }

    private ValueTask ReplyOkAsync(ulong cookie)
    {
        byte[] reply = new byte[NbdMagic.SimpleReplyLength];
        NbdTransmissionCodec.WriteSimpleReply(reply, NbdError.None, cookie);
        return SendReplyAsync(reply);
    }

    /// <summary>An error: an ERROR chunk once structured replies are on (QEMU sends them for every command), else a simple reply.</summary>
    private ValueTask ReplyErrorAsync(in NbdRequest request, NbdError error, string message)
    {
        if (_structuredReplies)
        {
            byte[] chunk = new byte[NbdTransmissionCodec.ErrorChunkLength(message)];
            NbdTransmissionCodec.WriteErrorChunk(chunk, done: true, request.Cookie, error, message);
            return SendReplyAsync(chunk);
        }
        byte[] reply = new byte[NbdMagic.SimpleReplyLength];
        NbdTransmissionCodec.WriteSimpleReply(reply, error, request.Cookie);
        return SendReplyAsync(reply);
    }
}
