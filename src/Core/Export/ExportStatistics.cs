namespace BitmapBackup.Core.Export;

/// <summary>Counters of one export, updated atomically by its connections and read at any time (Get-BlockExport).</summary>
public sealed class ExportStatistics
{
    private long _requests;
    private long _bytesRead;
    private long _bytesWritten;
    private int _clients;
    private long _connections;

    /// <summary>Requests received in the transmission phase (every command but DISC, failed ones included).</summary>
    public long Requests => Interlocked.Read(ref _requests);

    /// <summary>Bytes sent to clients by successful READs.</summary>
    public long BytesRead => Interlocked.Read(ref _bytesRead);

    /// <summary>Bytes clients wrote with successful WRITEs (zeroed and trimmed ranges are not counted).</summary>
    public long BytesWritten => Interlocked.Read(ref _bytesWritten);

    /// <summary>Connections open now (negotiating or transmitting).</summary>
    public int Clients => Volatile.Read(ref _clients);

    /// <summary>Connections accepted since the export started.</summary>
    public long Connections => Interlocked.Read(ref _connections);

    internal void AddRequest() => Interlocked.Increment(ref _requests);

    internal void AddRead(long bytes) => Interlocked.Add(ref _bytesRead, bytes);

    internal void AddWritten(long bytes) => Interlocked.Add(ref _bytesWritten, bytes);

    internal void Connected()
    {
        Interlocked.Increment(ref _clients);
        Interlocked.Increment(ref _connections);
    }

    internal void Disconnected() => Interlocked.Decrement(ref _clients);
}
