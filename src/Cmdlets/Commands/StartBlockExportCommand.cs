using System.Management.Automation;
using System.Net;
using System.Net.Sockets;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Export;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Start-BlockExport: serves a node over NBD on a unix socket or a TCP port (QEMU's nbd-server-add, qemu-nbd), so
/// that real writers go through the engine (their writes are tracked by the node's bitmaps) and pull-mode backup
/// tools read data and dirty bitmaps over the same connection.
/// </summary>
[Cmdlet(VerbsLifecycle.Start, "BlockExport", SupportsShouldProcess = true, DefaultParameterSetName = SocketParameterSet)]
[OutputType(typeof(BlockExportInfo))]
public sealed class StartBlockExportCommand : BitmapBackupCmdlet
{
    private const string SocketParameterSet = "Socket";
    private const string TcpParameterSet = "Tcp";

    #region Parameters

    /// <summary>The node to export: a name or a node object.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ValueFromPipelineByPropertyName = true)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>The export name clients ask for (default: the node's name).</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? Name { get; set; }

    /// <summary>Path of the unix socket to listen on.</summary>
    [Parameter(Mandatory = true, ParameterSetName = SocketParameterSet)]
    [ValidateNotNullOrEmpty]
    public string Socket { get; set; } = null!;

    /// <summary>TCP port to listen on (0: one the system chooses; the output shows it).</summary>
    [Parameter(Mandatory = true, ParameterSetName = TcpParameterSet)]
    [ValidateRange(0, 65535)]
    public int Port { get; set; }

    /// <summary>IP address to listen on with -Port (default 127.0.0.1, loopback only).</summary>
    [Parameter(ParameterSetName = TcpParameterSet)]
    [ValidateNotNullOrEmpty]
    public string Address { get; set; } = "127.0.0.1";

    /// <summary>Serve writes; without it the export is read-only.</summary>
    [Parameter]
    public SwitchParameter Writable { get; set; }

    /// <summary>Bitmaps of the node to offer as qemu:dirty-bitmap:NAME metadata contexts.</summary>
    [Parameter]
    [ArgumentCompleter(typeof(BitmapNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string[]? Bitmap { get; set; }

    /// <summary>Text clients see in export lists and export information.</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? Description { get; set; }

    /// <summary>Clients served at once; more wait until one leaves.</summary>
    [Parameter]
    [ValidateRange(1, 1024)]
    public int MaxConnections { get; set; } = ExportOptions.DefaultMaxConnections;

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        if (ResolveNode(Node) is not BlockNode node)
            return;
        string name = Name ?? node.Name;
        string where = ParameterSetName == TcpParameterSet ? $"TCP {Address}:{Port}" : $"unix socket '{ResolveFilePath(Socket)}'";
        if (!ShouldProcess($"node '{node.Name}'", $"Export as NBD export '{name}' on {where}{(Writable ? ", writable" : ", read-only")}"))
            return;
        BlockExport? export = null;
        if (TryRun(() => export = ExportRegistry.Default.Start(node, Options())))
            WriteObject(new BlockExportInfo(export!));
    }

    #endregion

    #region Private methods

    private ExportOptions Options() => new()
    {
        Name = Name,
        Description = Description,
        Writable = Writable,
        Bitmaps = Bitmap ?? [],
        SocketPath = ParameterSetName == SocketParameterSet ? ResolveFilePath(Socket) : null,
        TcpEndPoint = ParameterSetName == TcpParameterSet ? new IPEndPoint(ParseAddress(Address), Port) : null,
        MaxConnections = MaxConnections,
    };

    /// <summary>An IP address, or the first address of a host name (localhost).</summary>
    private static IPAddress ParseAddress(string address)
    {
        if (IPAddress.TryParse(address, out IPAddress? ip))
            return ip;
        try
        {
            return Dns.GetHostAddresses(address).OrderBy(a => a.AddressFamily == AddressFamily.InterNetwork ? 0 : 1).First();
        }
        catch (Exception e) when (e is SocketException or ArgumentException or InvalidOperationException)
        {
            throw new BlockException(ErrorIds.ExportListenFailed, BlockErrorCategory.InvalidArgument,
                $"Address '{address}' is neither an IP address nor a host name that resolves: {e.Message}", address, e);
        }
    }

    #endregion
}
