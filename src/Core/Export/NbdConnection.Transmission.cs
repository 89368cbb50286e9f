using System.Runtime.InteropServices;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Export;

/*
 * The request path, as nbdkit's protocol.c splits it: read → validate (ExportPolicy.Validate, every check in one
 * place) → execute (a switch that calls the node and nothing else) → encode the reply (NbdTransmissionCodec) under
 * the send lock.
 *
 * Reader thread (one per connection, in stream order):
 *   header     28 bytes; wrong magic: close without a reply (the stream cannot be trusted any more)
 *   DISC       stop reading; the requests in flight finish and reply; close
 *   check      a WRITE above 32 MiB: EINVAL, then close; any other refusal: its error, after a refused WRITE's
 *              payload has been read and dropped through the 64 KiB buffer (nothing allocated for it)
 *   admit      wait for room among the requests in flight (MaxRequestsInFlight, MaxBytesInFlight)
 *   payload    a WRITE's payload into a pooled buffer; a client that leaves mid-payload had nothing written
 *   run        BLOCK_STATUS and CACHE right here, answered at once (metadata only, no data I/O); READ, WRITE,
 *              WRITE_ZEROES, TRIM, FLUSH on the thread pool, their replies queued for the writer thread, so replies
 *              may go out of order
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
    private void Transmission()
    {
        byte[] header = new byte[NbdMagic.RequestLength];
        while (!_broken && !_stopping)
        {
            if (!_reader.ReadExactly(header) || _stopping)
                return;
            if (!NbdTransmissionCodec.TryReadRequest(header, out NbdRequest request))
                return;
            if (request.Command == NbdCommand.Disconnect)
                return;
            _export.Statistics.AddRequest();
            RequestVerdict verdict = Policy.Validate(request, _structuredReplies, _contexts.Count > 0);
            if (verdict.Disconnect)
            {
                ReplyError(request, verdict.Error, verdict.Message!);
                return;
            }
            long bytes = verdict.IsAccepted && request.Command is NbdCommand.Read or NbdCommand.Write ? request.Length : 0;
            if (!Admit(bytes))
                return;
            if (!verdict.IsAccepted)
            {
                bool inSync = request.Command != NbdCommand.Write || _reader.Skip(request.Length);
                if (inSync)
                    ReplyError(request, verdict.Error, verdict.Message!);
                Complete(bytes);
                if (!inSync)
                    return;
                continue;
            }
            byte[]? payload = null;
            if (request.Command == NbdCommand.Write && request.Length > 0)
            {
                payload = _export.Buffers.Rent((int)request.Length);
                bool whole;
                try
                {
                    whole = _reader.ReadExactly(payload.AsSpan(0, (int)request.Length));
                }
                catch
                {
                    _export.Buffers.Return(payload);
                    Complete(bytes);
                    throw;
                }
                if (!whole)
                {
                    _export.Buffers.Return(payload);
                    Complete(bytes);
                    return; // the client left mid-payload: nothing was written
                }
            }
            if (request.Command is NbdCommand.BlockStatus or NbdCommand.Cache)
                Execute(new Work(this, request, payload, bytes));
            else
                ThreadPool.UnsafeQueueUserWorkItem(new Work(this, request, payload, bytes), preferLocal: false);
        }
    }

    /// <summary>One admitted request, run on the thread pool (or inline by the reader for metadata requests).</summary>
    private sealed class Work(NbdConnection connection, NbdRequest request, byte[]? payload, long bytes) : IThreadPoolWorkItem
    {
        public NbdConnection Connection { get; } = connection;
        public NbdRequest Request { get; } = request;
        public byte[]? Payload { get; } = payload;
        public long Bytes { get; } = bytes;

        public void Execute() => Connection.Execute(this);
    }

    /// <summary>
    /// Run one admitted request and answer it; never throws. The answer is queued for the writer thread (which frees
    /// the request's room once it is sent), or, on the reader thread, sent at once.
    /// </summary>
    private void Execute(Work work)
    {
        NbdRequest request = work.Request;
        bool inline = request.Command is NbdCommand.BlockStatus or NbdCommand.Cache;
        byte[]? data = null;
        int dataLength = 0;
        byte[] header;
        try
        {
            BlockNode node = _export.Node;
            bool fua = (request.Flags & NbdCommandFlags.Fua) != 0;
            switch (request.Command)
            {
                case NbdCommand.Read:
                    header = Read(node, request, out data, out dataLength);
                    break;
                case NbdCommand.Write:
                    if (work.Payload is not null)
                        node.Write((long)request.Offset, work.Payload.AsSpan(0, (int)request.Length));
                    if (fua)
                        node.Flush();
                    _export.Statistics.AddWritten(request.Length);
                    header = SimpleReply(request.Cookie);
                    break;
                case NbdCommand.WriteZeroes:
                case NbdCommand.Trim:
                    if (request.Length > 0)
                        node.WriteZeroes((long)request.Offset, request.Length);
                    if (fua)
                        node.Flush();
                    header = SimpleReply(request.Cookie);
                    break;
                case NbdCommand.Flush:
                    node.Flush();
                    header = SimpleReply(request.Cookie);
                    break;
                case NbdCommand.BlockStatus:
                    header = BlockStatus(node, request);
                    break;
                default: // CACHE: a hint
                    header = SimpleReply(request.Cookie);
                    break;
            }
        }
        catch (Exception e)
        {
            if (e is not (BlockException or IOException or ObjectDisposedException))
                _export.RecordUnexpected(e); // a defect: answered as EIO, the connection goes on
            if (data is not null)
                _export.Buffers.Return(data);
            data = null;
            dataLength = 0;
            header = ErrorReply(request, e is BlockException be ? ExportPolicy.ErrorFor(be) : NbdError.Io, e.Message);
        }
        finally
        {
            if (work.Payload is not null)
                _export.Buffers.Return(work.Payload);
        }
        if (inline)
        {
            SendReply(header);
            Complete(work.Bytes);
        }
        else
        {
            QueueReply(new Reply(header, data, dataLength, work.Bytes));
        }
    }

    /// <summary>
    /// Read the range; the reply's header, and its data in a pooled buffer (null for a hole or an empty read). Structured:
    /// one OFFSET_HOLE chunk when the data is all zeros and DF is not set, else one OFFSET_DATA chunk; simple: the reply
    /// header, then the data; length 0: NONE (structured) or no data.
    /// </summary>
    private byte[] Read(BlockNode node, NbdRequest request, out byte[]? data, out int dataLength)
    {
        data = null;
        dataLength = 0;
        int length = (int)request.Length;
        if (length == 0)
        {
            if (!_structuredReplies)
                return SimpleReply(request.Cookie);
            byte[] none = new byte[NbdMagic.ChunkHeaderLength];
            NbdTransmissionCodec.WriteNoneChunk(none, request.Cookie);
            return none;
        }
        byte[] buffer = _export.Buffers.Rent(length);
        try
        {
            node.Read((long)request.Offset, buffer.AsSpan(0, length));
        }
        catch
        {
            _export.Buffers.Return(buffer);
            throw;
        }
        _export.Statistics.AddRead(length);
        if (!_structuredReplies)
        {
            (data, dataLength) = (buffer, length);
            return SimpleReply(request.Cookie);
        }
        if ((request.Flags & NbdCommandFlags.DontFragment) == 0 && !buffer.AsSpan(0, length).ContainsAnyExcept((byte)0))
        {
            _export.Buffers.Return(buffer);
            byte[] hole = new byte[NbdTransmissionCodec.OffsetHoleLength];
            NbdTransmissionCodec.WriteOffsetHole(hole, done: true, request.Cookie, request.Offset, request.Length);
            return hole;
        }
        (data, dataLength) = (buffer, length);
        byte[] prefix = new byte[NbdTransmissionCodec.OffsetDataPrefixLength];
        NbdTransmissionCodec.WriteOffsetDataPrefix(prefix, done: true, request.Cookie, request.Offset, length);
        return prefix;
    }

    /// <summary>One BLOCK_STATUS chunk per selected context, DONE on the last.</summary>
    private byte[] BlockStatus(BlockNode node, NbdRequest request)
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
            at += NbdTransmissionCodec.WriteBlockStatusChunk(reply.AsSpan(at), done: i == chunks.Count - 1, request.Cookie, chunks[i].Id, CollectionsMarshal.AsSpan(chunks[i].Extents));
        return reply;
    }

    private static byte[] SimpleReply(ulong cookie)
    {
        byte[] reply = new byte[NbdMagic.SimpleReplyLength];
        NbdTransmissionCodec.WriteSimpleReply(reply, NbdError.None, cookie);
        return reply;
    }

    /// <summary>An error: an ERROR chunk once structured replies are on (QEMU sends them for every command), else a simple reply.</summary>
    private byte[] ErrorReply(in NbdRequest request, NbdError error, string message)
    {
        if (_structuredReplies)
        {
            byte[] chunk = new byte[NbdTransmissionCodec.ErrorChunkLength(message)];
            NbdTransmissionCodec.WriteErrorChunk(chunk, done: true, request.Cookie, error, message);
            return chunk;
        }
        byte[] reply = new byte[NbdMagic.SimpleReplyLength];
        NbdTransmissionCodec.WriteSimpleReply(reply, error, request.Cookie);
        return reply;
    }

    /// <summary>Answer a refused request at once, on the reader thread.</summary>
    private void ReplyError(in NbdRequest request, NbdError error, string message) => SendReply(ErrorReply(request, error, message));
}
