using BitmapBackup.Core.Export;

namespace BitmapBackup;

/// <summary>What Start-BlockExport and Get-BlockExport write: a snapshot of an NBD export and its counters.</summary>
public sealed class BlockExportInfo
{
    internal BlockExportInfo(BlockExport export)
    {
        Name = export.Name;
        Node = export.Node.Name;
        Uri = export.Uri;
        Socket = export.SocketPath;
        Address = export.TcpEndPoint?.ToString();
        Writable = export.Writable;
        Bitmaps = export.ExportedBitmaps.Select(b => b.Name!).ToArray();
        Description = export.Description;
        MaxConnections = export.MaxConnections;
        Clients = export.Statistics.Clients;
        Connections = export.Statistics.Connections;
        Requests = export.Statistics.Requests;
        BytesRead = export.Statistics.BytesRead;
        BytesWritten = export.Statistics.BytesWritten;
        Started = export.Started;
    }

    /// <summary>The export name clients ask for.</summary>
    public string Name { get; }

    /// <summary>The node served.</summary>
    public string Node { get; }

    /// <summary>The NBD URI of the export (nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME).</summary>
    public string Uri { get; }

    /// <summary>Full path of the unix socket, or empty for TCP.</summary>
    public string? Socket { get; }

    /// <summary>TCP address and port listened on, or empty for a unix socket.</summary>
    public string? Address { get; }

    /// <summary>Whether clients may write.</summary>
    public bool Writable { get; }

    /// <summary>Bitmaps offered as qemu:dirty-bitmap:NAME contexts (busy while exported).</summary>
    public string[] Bitmaps { get; }

    public string? Description { get; }

    /// <summary>Connections served at once.</summary>
    public int MaxConnections { get; }

    /// <summary>Clients connected when the snapshot was taken.</summary>
    public int Clients { get; }

    /// <summary>Connections accepted since the export started.</summary>
    public long Connections { get; }

    /// <summary>Requests received (every command but disconnect, failed ones included).</summary>
    public long Requests { get; }

    /// <summary>Bytes read by clients.</summary>
    public long BytesRead { get; }

    /// <summary>Bytes written by clients with WRITE (zeroed and trimmed ranges not counted).</summary>
    public long BytesWritten { get; }

    /// <summary>When the export started (local time).</summary>
    public DateTime Started { get; }

    /// <summary>The export name, so the object converts to an export reference anywhere a name is accepted.</summary>
    public override string ToString() => Name;
}
