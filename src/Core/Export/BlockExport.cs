using System.Buffers;
using System.Net;
using System.Net.Sockets;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Export;

/*
 * An NBD export: one node served on one listener (a unix socket or a TCP address) under one export name, until it
 * is stopped. Its lifetime:
 *
 *   Start   names checked; the exported bitmaps checked and claimed (busy for the export's life, so no backup,
 *           clear, merge or removal changes them under a reader); the listener bound; the export registered as a
 *           user of the node (Close-BlockNode and Resize-BlockNode are refused while it serves); accepting begins.
 *           Any failure undoes what was done, in reverse.
 *   Serve   one NbdConnection per client, at most MaxConnections at once: a client over the limit is not accepted
 *           until one leaves (it waits in the listen queue, as with qemu-nbd -e). The connections share the node
 *           (one image object, one page cache), so FLUSH on any of them covers writes acknowledged on the others:
 *           CAN_MULTI_CONN is advertised when more than one connection is allowed.
 *   Stop    accepting ends and the socket file goes; every connection stops reading requests; the requests in
 *           flight finish and reply (the drain), then the connections close. A connection still busy after the
 *           drain timeout (a client that stopped reading its replies) is closed at once; its node I/O still
 *           completes before Stop returns. Then the bitmaps are released and the node's user removed.
 *
 * The node's image locks are the node's: the export holds them by holding the node open.
 */

/// <summary>A node served over NBD. Started and stopped through <see cref="ExportRegistry"/>.</summary>
public sealed class BlockExport : INodeUser
{
    private readonly ExportListener _listener;
    private readonly SemaphoreSlim _slots;
    private readonly CancellationTokenSource _stop = new();
    private readonly Lock _lock = new();
    private readonly HashSet<NbdConnection> _connections = new(); // guarded by _lock
    private Thread? _acceptThread;
    private int _stopping;
    private Exception? _unexpected;

    private BlockExport(BlockNode node, ExportPolicy policy, DirtyBitmap[] bitmaps, ExportListener listener, ExportOptions options)
    {
        Node = node;
        Policy = policy;
        ExportedBitmaps = bitmaps;
        _listener = listener;
        MaxConnections = options.MaxConnections;
        HandshakeTimeout = options.HandshakeTimeout;
        _slots = new SemaphoreSlim(options.MaxConnections, options.MaxConnections);
        Started = DateTime.Now;
    }

    public string Name => Policy.Name;

    public BlockNode Node { get; }

    public ExportPolicy Policy { get; }

    public string? Description => Policy.Description;

    public bool Writable => Policy.Writable;

    /// <summary>The exported bitmaps, busy while the export lives; context qemu:dirty-bitmap:NAME of bitmap i has id 2 + i.</summary>
    public IReadOnlyList<DirtyBitmap> ExportedBitmaps { get; }

    /// <summary>Full path of the unix socket, or null for TCP.</summary>
    public string? SocketPath => _listener.SocketPath;

    /// <summary>The TCP address and port listened on, or null for a unix socket.</summary>
    public IPEndPoint? TcpEndPoint => _listener.EndPoint;

    /// <summary>The NBD URI clients use: nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME.</summary>
    public string Uri => SocketPath is { } path
        ? $"nbd+unix:///{System.Uri.EscapeDataString(Name)}?socket={path}"
        : $"nbd://{(TcpEndPoint!.AddressFamily == AddressFamily.InterNetworkV6 ? $"[{TcpEndPoint.Address}]" : TcpEndPoint.Address.ToString())}:{TcpEndPoint.Port}/{System.Uri.EscapeDataString(Name)}";

    public int MaxConnections { get; }

    public TimeSpan HandshakeTimeout { get; }

    public DateTime Started { get; }

    public ExportStatistics Statistics { get; } = new();

    /// <summary>Whether Stop has begun (new options get ERR_SHUTDOWN).</summary>
    public bool IsStopping => Volatile.Read(ref _stopping) != 0;

    /// <summary>Buffers of READ data and WRITE payloads, shared by the export's connections.</summary>
    internal ArrayPool<byte> Buffers { get; } = ArrayPool<byte>.Create(ExportPolicy.MaxPayload, 32);

    /// <summary>The first exception a connection did not expect (a defect; tests assert there is none), or null.</summary>
    public Exception? UnexpectedError => Volatile.Read(ref _unexpected);

    internal void RecordUnexpected(Exception e) => Interlocked.CompareExchange(ref _unexpected, e, null);

    string INodeUser.Description => $"NBD export '{Name}'";

    string INodeUser.ReleaseHint => $"stop it first with Stop-BlockExport -Name '{Name}'";

    /// <summary>Check, claim, bind and start serving (see the file's header). Called by <see cref="ExportRegistry.Start"/>.</summary>
    /// <exception cref="BlockException">
    /// NodeClosed, NodeReadOnly (-Writable on a read-only node), ExportNameInvalid, ExportDescriptionTooLong, BitmapNotFound,
    /// BitmapBusy, BitmapInconsistent, BitmapEnabledForReadOnlyExport, ExportAddressInUse, ExportListenFailed.
    /// </exception>
    internal static BlockExport Start(BlockNode node, string name, ExportOptions options)
    {
        ExportPolicy.CheckNames(name, options.Description);
        if (node.IsClosed)
            Throw.Block(ErrorIds.NodeClosed, BlockErrorCategory.InvalidOperation, $"Node '{node.Name}' is closed.", node.Name);
        if (options.Writable && node.ReadOnly)
            Throw.Block(ErrorIds.NodeReadOnly, BlockErrorCategory.PermissionDenied,
                $"Node '{node.Name}' is open read-only and cannot be exported writable: open it without -ReadOnly, or export it without -Writable.", node.Name);
        if (options.MaxConnections < 1)
            throw new ArgumentOutOfRangeException(nameof(options), "MaxConnections must be at least 1.");
        if ((options.SocketPath is null) == (options.TcpEndPoint is null))
            throw new ArgumentException("Give exactly one of SocketPath and TcpEndPoint.", nameof(options));

        string[] bitmapNames = options.Bitmaps.Distinct(StringComparer.Ordinal).ToArray();
        var claimed = new List<DirtyBitmap>();
        ExportListener? listener = null;
        try
        {
            lock (node.Sync)
            {
                DirtyBitmap[] bitmaps = bitmapNames.Select(node.GetBitmap).ToArray();
                foreach (DirtyBitmap bitmap in bitmaps)
                    ExportPolicy.CheckBitmap(bitmap, options.Writable);
                foreach (DirtyBitmap bitmap in bitmaps)
                {
                    bitmap.Claim($"NBD export '{name}'");
                    claimed.Add(bitmap);
                }
            }
            listener = options.SocketPath is { } path ? ExportListener.BindUnix(path) : ExportListener.BindTcp(options.TcpEndPoint!);
            var policy = new ExportPolicy(name, options.Description, node.Size, options.Writable, options.MaxConnections > 1, bitmapNames);
            var export = new BlockExport(node, policy, [.. claimed], listener, options);
            node.AddUser(export);
            export._acceptThread = new Thread(export.AcceptLoop) { IsBackground = true, Name = $"NBD export '{name}' listener" };
            export._acceptThread.Start();
            return export;
        }
        catch
        {
            listener?.Dispose();
            foreach (DirtyBitmap bitmap in claimed)
                bitmap.Release();
            throw;
        }
    }

    /// <summary>The accept thread: take clients while there is room, until the listener is closed by Stop.</summary>
    private void AcceptLoop()
    {
        CancellationToken stopping = _stop.Token;
        while (!stopping.IsCancellationRequested)
        {
            try
            {
                _slots.Wait(stopping);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            Socket client;
            try
            {
                client = _listener.Socket.Accept();
            }
            catch (Exception e) when (e is ObjectDisposedException or SocketException or InvalidOperationException)
            {
                _slots.Release();
                if (stopping.IsCancellationRequested || e is not SocketException)
                    return;
                continue; // a connection that failed while it was accepted
            }
            if (client.AddressFamily is AddressFamily.InterNetwork or AddressFamily.InterNetworkV6)
                client.NoDelay = true; // block-status round trips are small messages
            Serve(new NbdConnection(this, client));
        }
    }

    private void Serve(NbdConnection connection)
    {
        Statistics.Connected();
        lock (_lock)
            _connections.Add(connection);
        connection.Start();
    }

    /// <summary>A connection has ended (its reader thread, last): it no longer counts, and its slot is free.</summary>
    internal void Ended(NbdConnection connection)
    {
        lock (_lock)
            _connections.Remove(connection);
        Statistics.Disconnected();
        _slots.Release();
    }

    /// <summary>
    /// Stop serving (see the file's header): no new client, the requests in flight finish and reply within
    /// <paramref name="drainTimeout"/>, then every connection closes, the bitmaps are released and the node is free.
    /// Returns the number of clients connected when it began. Safe to call more than once.
    /// </summary>
    internal int Stop(TimeSpan drainTimeout)
    {
        if (Interlocked.Exchange(ref _stopping, 1) != 0)
            return 0;
        int clients;
        lock (_lock)
            clients = _connections.Count;
        _stop.Cancel();
        _listener.Dispose(); // a blocked Accept fails: no new client
        _acceptThread?.Join();
        NbdConnection[] connections;
        lock (_lock)
            connections = [.. _connections];
        foreach (NbdConnection connection in connections)
            connection.StopReading();
        Task all = Task.WhenAll(connections.Select(c => c.Completion));
        if (!all.Wait(drainTimeout))
        {
            foreach (NbdConnection connection in connections)
                connection.Abort();
            all.Wait(); // node I/O in flight completes; sends fail at once on the closed sockets
        }
        foreach (DirtyBitmap bitmap in ExportedBitmaps)
            bitmap.Release();
        Node.RemoveUser(this);
        return clients;
    }

    public override string ToString() => Name;
}
