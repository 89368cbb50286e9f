using System.Net.Sockets;

namespace BitmapBackup.Core.Export;

/*
 * One client of an export, from accept to close:
 *
 *   handshake   greeting, client flags, options one at a time (NbdConnection.Handshake.cs), all within the export's
 *               handshake timeout (10 s: a client that connects and never negotiates is dropped, CVE-2024-7409);
 *   transmission  one reader loop reads requests in stream order; each is checked (ExportPolicy.Validate), its WRITE
 *               payload read, and it runs on the thread pool, so several are in flight and their replies may go
 *               out of order (NbdConnection.Transmission.cs);
 *   close       on DISC, end of stream, a broken stream, or the export stopping: no new request is read, the requests
 *               in flight finish and reply, then the socket closes.
 *
 * Bounds that keep a hostile or slow client from hurting anyone else: option data above 64 KiB and requests above
 * 32 MiB are refused before anything is allocated; at most MaxRequestsInFlight requests and MaxBytesInFlight bytes
 * of buffers (or one request alone, up to 32 MiB) are in flight per connection, buffers come from the export's pool;
 * a client that stops reading its replies blocks only its own connection (sends are asynchronous, each connection has
 * its own send lock), and Stop ends it by closing its socket after the drain timeout.
 *
 * Nothing acknowledged is lost when a client goes away: a write is replied to only after BlockNode.Write returned
 * (and, with FUA, after BlockNode.Flush), and a connection always waits for the node I/O it started before it ends.
 */

/// <summary>One NBD client connection of a <see cref="BlockExport"/>.</summary>
internal sealed partial class NbdConnection
{
    /// <summary>Requests of one connection executing at once.</summary>
    public const int MaxRequestsInFlight = 16;

    /// <summary>Buffer bytes of one connection in flight (a single larger request, up to 32 MiB, runs alone).</summary>
    public const long MaxBytesInFlight = 8L << 20;

    private readonly BlockExport _export;
    private readonly Socket _socket;
    private readonly SocketReader _reader;
    private readonly CancellationToken _stopping;
    private readonly SemaphoreSlim _sendLock = new(1, 1);

    // Guarded by _flightLock.
    private readonly Lock _flightLock = new();
    private int _inFlight;
    private long _inFlightBytes;
    private TaskCompletionSource? _flightChanged;

    private volatile bool _broken; // a send failed: the peer is gone or the socket was closed

    public NbdConnection(BlockExport export, Socket socket, CancellationToken stopping)
    {
        _export = export;
        _socket = socket;
        _stopping = stopping;
        _reader = new SocketReader(socket);
    }

    private ExportPolicy Policy => _export.Policy;

    /// <summary>Serve the client until it leaves or the export stops. Never throws.</summary>
    public async Task RunAsync()
    {
        try
        {
            bool transmission;
            using (var handshake = CancellationTokenSource.CreateLinkedTokenSource(_stopping))
            {
                handshake.CancelAfter(_export.HandshakeTimeout);
                transmission = await HandshakeAsync(handshake.Token).ConfigureAwait(false);
            }
            if (transmission)
                await TransmissionAsync().ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException or OperationCanceledException)
        {
            // the client left, broke the stream, timed out in the handshake, or the export is stopping
        }
        catch (Exception e)
        {
            _export.RecordUnexpected(e); // a defect: the connection ends, the export and the process go on
        }
        finally
        {
            await DrainAsync().ConfigureAwait(false); // node I/O started for this client ends before the connection does
            Close();
        }
    }

    /// <summary>End the connection at once (Stop after its drain timeout): pending sends and receives fail.</summary>
    public void Abort()
    {
        _broken = true;
        Close();
    }

    private void Close()
    {
        try
        {
            if (_socket.Connected)
                _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
        _socket.Dispose();
    }

    #region Sending

    /// <summary>Send bytes during the handshake (one option's replies at a time).</summary>
    private async ValueTask SendHandshakeAsync(ReadOnlyMemory<byte> data, CancellationToken cancellation)
    {
        while (!data.IsEmpty)
        {
            int n = await _socket.SendAsync(data, SocketFlags.None, cancellation).ConfigureAwait(false);
            data = data[n..];
        }
    }

    /// <summary>
    /// Send one reply whole (header, then optional data) under the send lock, so replies of requests in flight
    /// never interleave. A failure marks the connection broken and is not thrown: the requester has gone.
    /// </summary>
    private async ValueTask SendReplyAsync(ReadOnlyMemory<byte> header, ReadOnlyMemory<byte> data = default)
    {
        if (_broken)
            return;
        await _sendLock.WaitAsync().ConfigureAwait(false);
        try
        {
            if (_broken)
                return;
            await SendAllAsync(header).ConfigureAwait(false);
            if (!data.IsEmpty)
                await SendAllAsync(data).ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or IOException)
        {
            _broken = true;
        }
        finally
        {
            _sendLock.Release();
        }
    }

    private async ValueTask SendAllAsync(ReadOnlyMemory<byte> data)
    {
        while (!data.IsEmpty)
        {
            int n = await _socket.SendAsync(data, SocketFlags.None).ConfigureAwait(false);
            data = data[n..];
        }
    }

    #endregion

    #region Requests in flight

    /// <summary>Wait until a request of <paramref name="bytes"/> may start (see the limits above), and count it.</summary>
    private async ValueTask AdmitAsync(long bytes, CancellationToken cancellation)
    {
        while (true)
        {
            Task changed;
            lock (_flightLock)
            {
                if (_inFlight == 0 || (_inFlight < MaxRequestsInFlight && _inFlightBytes + bytes <= MaxBytesInFlight))
                {
                    _inFlight++;
                    _inFlightBytes += bytes;
                    return;
                }
                _flightChanged ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                changed = _flightChanged.Task;
            }
            await changed.WaitAsync(cancellation).ConfigureAwait(false);
        }
    }

    /// <summary>A request admitted with <see cref="AdmitAsync"/> has replied (or failed to).</summary>
    private void Complete(long bytes)
    {
        TaskCompletionSource? changed;
        lock (_flightLock)
        {
            _inFlight--;
            _inFlightBytes -= bytes;
            changed = _flightChanged;
            _flightChanged = null;
        }
        changed?.TrySetResult();
    }

    /// <summary>Wait until no request is in flight.</summary>
    private async Task DrainAsync()
    {
        while (true)
        {
            Task changed;
            lock (_flightLock)
            {
                if (_inFlight == 0)
                    return;
                _flightChanged ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                changed = _flightChanged.Task;
            }
            await changed.ConfigureAwait(false);
        }
    }

    #endregion
}
