using System.Net.Sockets;

namespace BitmapBackup.Core.Export;

/*
 * One client of an export, from accept to close, on two threads of its own and the thread pool:
 *
 *   reader thread  the handshake (NbdConnection.Handshake.cs: greeting, client flags, options one at a time, all
 *                  within the handshake timeout, 10 s: a client that connects and never negotiates is dropped,
 *                  CVE-2024-7409), then the requests in stream order (NbdConnection.Transmission.cs): each is checked
 *                  (ExportPolicy.Validate) and its WRITE payload read; BLOCK_STATUS, CACHE and refusals are answered
 *                  right there (a metadata round trip costs one wake-up, as in qemu-nbd's coroutines);
 *   thread pool    READ, WRITE, WRITE_ZEROES, TRIM and FLUSH run the node's I/O there, several at once, and queue
 *                  their replies, which may go out of order;
 *   writer thread  sends the queued replies. Sockets are used blocking, on these two threads only: a pool thread
 *                  never waits for a client, and the kernel wakes the reader and the writer directly.
 *   close          on DISC, end of stream, a broken stream, or the export stopping (StopReading shuts the socket's
 *                  receiving side): no new request is read, the requests in flight finish and their replies are sent
 *                  (the drain), then the socket closes.
 *
 * Bounds that keep a hostile or slow client from hurting anyone else: option data above 64 KiB and requests above
 * 32 MiB are refused before anything is allocated; at most MaxRequestsInFlight requests and MaxBytesInFlight bytes of
 * buffers (or one request alone, up to 32 MiB) are in flight per connection, counted until their reply is sent, and
 * buffers come from the export's pool; a client that stops reading its replies blocks only its own writer thread, and
 * Stop ends it by closing its socket after the drain timeout (Abort).
 *
 * Nothing acknowledged is lost when a client goes away: a write is replied to only after BlockNode.Write returned (and,
 * with FUA, after BlockNode.Flush), and a connection always waits for the node I/O it started before it ends.
 *
 * Sockets stay in blocking mode (no async operation is ever issued on them: .NET would switch the descriptor to
 * non-blocking for good and route every later blocking call through its event loop, one more wake-up per call).
 */

/// <summary>One NBD client connection of a <see cref="BlockExport"/>.</summary>
internal sealed partial class NbdConnection
{
    /// <summary>Requests of one connection in flight (received, not yet answered).</summary>
    public const int MaxRequestsInFlight = 16;

    /// <summary>Buffer bytes of one connection in flight (a single larger request, up to 32 MiB, runs alone).</summary>
    public const long MaxBytesInFlight = 8L << 20;

    private readonly BlockExport _export;
    private readonly Socket _socket;
    private readonly SocketReader _reader;
    private readonly Lock _sendLock = new();
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);

    // Guarded by _flightLock (Monitor: the reader waits on it for room, and for the drain).
    private readonly object _flightLock = new();
    private readonly Queue<Reply> _replies = new();
    private int _inFlight;
    private long _inFlightBytes;
    private bool _noMoreReplies;

    private volatile bool _stopping; // Stop: read no more requests
    private volatile bool _broken;   // a send failed, or Abort: the peer is gone or the socket is closed

    public NbdConnection(BlockExport export, Socket socket)
    {
        _export = export;
        _socket = socket;
        _reader = new SocketReader(socket);
    }

    /// <summary>Completes when the connection has ended, its node I/O included.</summary>
    public Task Completion => _completion.Task;

    private ExportPolicy Policy => _export.Policy;

    /// <summary>Serve the client on a thread of its own until it leaves or the export stops.</summary>
    public void Start()
    {
        var thread = new Thread(Run) { IsBackground = true, Name = $"NBD export '{_export.Name}' reader" };
        thread.Start();
    }

    private void Run()
    {
        Thread? writer = null;
        try
        {
            if (Handshake())
            {
                writer = new Thread(WriteReplies) { IsBackground = true, Name = $"NBD export '{_export.Name}' writer" };
                writer.Start();
                Transmission();
            }
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
        {
            // the client left, broke the stream, timed out in the handshake, or the export is stopping
        }
        catch (Exception e)
        {
            _export.RecordUnexpected(e); // a defect: the connection ends, the export and the process go on
        }
        finally
        {
            Drain(); // node I/O started for this client ends, and its replies are sent, before the connection does
            lock (_flightLock)
            {
                _noMoreReplies = true;
                Monitor.PulseAll(_flightLock);
            }
            writer?.Join();
            Close();
            _export.Ended(this); // counted out before anyone waiting for the completion goes on
            _completion.TrySetResult();
        }
    }

    /// <summary>Stop reading requests (Stop): the requests in flight still finish and reply.</summary>
    public void StopReading()
    {
        _stopping = true;
        try
        {
            _socket.Shutdown(SocketShutdown.Receive); // wakes a reader blocked in a receive
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
        lock (_flightLock)
            Monitor.PulseAll(_flightLock);
    }

    /// <summary>End the connection at once (Stop, after its drain timeout): sends in progress fail, replies not sent are dropped.</summary>
    public void Abort()
    {
        _broken = true;
        _stopping = true;
        Close();
        lock (_flightLock)
            Monitor.PulseAll(_flightLock);
    }

    private void Close()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
        _socket.Dispose();
    }

    #region Sending

    /// <summary>A reply waiting for the writer: header, optional data (a pooled buffer returned once sent) and the room it frees.</summary>
    private readonly record struct Reply(byte[] Header, byte[]? Data, int DataLength, long Bytes);

    /// <summary>Send bytes during the handshake (the reader thread; the socket's send timeout bounds it).</summary>
    private void SendHandshake(ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
            data = data[_socket.Send(data, SocketFlags.None)..];
    }

    /// <summary>
    /// Send one reply whole (header, then data) under the send lock, so replies never interleave. A failure marks the
    /// connection broken and is not thrown: the requester has gone.
    /// </summary>
    private void SendReply(ReadOnlySpan<byte> header, ReadOnlySpan<byte> data = default)
    {
        if (_broken)
            return;
        lock (_sendLock)
        {
            try
            {
                while (!header.IsEmpty)
                    header = header[_socket.Send(header, SocketFlags.None)..];
                while (!data.IsEmpty)
                    data = data[_socket.Send(data, SocketFlags.None)..];
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                _broken = true;
            }
        }
    }

    /// <summary>Hand a reply to the writer thread (thread-pool workers); the request's room is freed once it is sent.</summary>
    private void QueueReply(Reply reply)
    {
        lock (_flightLock)
        {
            _replies.Enqueue(reply);
            Monitor.PulseAll(_flightLock);
        }
    }

    /// <summary>The writer thread: send queued replies until the connection ends.</summary>
    private void WriteReplies()
    {
        while (true)
        {
            Reply reply;
            lock (_flightLock)
            {
                while (_replies.Count == 0 && !_noMoreReplies)
                    Monitor.Wait(_flightLock);
                if (_replies.Count == 0)
                    return;
                reply = _replies.Dequeue();
            }
            SendReply(reply.Header, reply.Data.AsSpan(0, reply.DataLength));
            if (reply.Data is not null)
                _export.Buffers.Return(reply.Data);
            Complete(reply.Bytes);
        }
    }

    #endregion

    #region Requests in flight

    /// <summary>
    /// Wait until a request of <paramref name="bytes"/> may start (see the limits above), and count it. False when the
    /// connection is stopping or broken meanwhile.
    /// </summary>
    private bool Admit(long bytes)
    {
        lock (_flightLock)
        {
            while (!(_inFlight == 0 || (_inFlight < MaxRequestsInFlight && _inFlightBytes + bytes <= MaxBytesInFlight)))
            {
                if (_stopping || _broken)
                    return false;
                Monitor.Wait(_flightLock);
            }
            if (_stopping || _broken)
                return false;
            _inFlight++;
            _inFlightBytes += bytes;
            return true;
        }
    }

    /// <summary>A request admitted with <see cref="Admit"/> has been answered (or could not be).</summary>
    private void Complete(long bytes)
    {
        lock (_flightLock)
        {
            _inFlight--;
            _inFlightBytes -= bytes;
            Monitor.PulseAll(_flightLock);
        }
    }

    /// <summary>Wait until no request is in flight.</summary>
    private void Drain()
    {
        lock (_flightLock)
        {
            while (_inFlight > 0)
                Monitor.Wait(_flightLock);
        }
    }

    #endregion
}
