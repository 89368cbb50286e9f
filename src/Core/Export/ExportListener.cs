using System.Net;
using System.Net.Sockets;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;

namespace BitmapBackup.Core.Export;

/// <summary>
/// The listening socket of an export: a unix socket at a path, or TCP (loopback unless an address is given).
/// A unix socket path that exists already is taken over only when it is a socket nobody listens on any more (left
/// by a process that died); a live socket or any other file is refused, never deleted. The socket file is removed
/// when the listener is disposed.
/// </summary>
internal sealed class ExportListener : IDisposable
{
    /// <summary>Pending connections the kernel queues before they are accepted.</summary>
    private const int Backlog = 64;

    private ExportListener(Socket socket, string? socketPath, IPEndPoint? endPoint)
    {
        Socket = socket;
        SocketPath = socketPath;
        EndPoint = endPoint;
    }

    public Socket Socket { get; }

    /// <summary>Full path of the unix socket, or null for TCP.</summary>
    public string? SocketPath { get; }

    /// <summary>The bound TCP address and port (the port the system chose for port 0), or null for a unix socket.</summary>
    public IPEndPoint? EndPoint { get; }

    /// <exception cref="BlockException">ExportAddressInUse, ExportListenFailed.</exception>
    public static ExportListener BindUnix(string path)
    {
        string fullPath = Path.GetFullPath(path);
        if (File.Exists(fullPath) || Directory.Exists(fullPath))
            TakeOverStale(fullPath);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(fullPath));
            socket.Listen(Backlog);
            return new ExportListener(socket, fullPath, null);
        }
        catch (Exception e) when (e is SocketException or ArgumentException or IOException or UnauthorizedAccessException)
        {
            socket.Dispose();
            if (e is SocketException { SocketErrorCode: SocketError.AddressAlreadyInUse })
                Throw.Block(ErrorIds.ExportAddressInUse, BlockErrorCategory.ResourceBusy, $"Unix socket '{fullPath}' is in use.", fullPath, e);
            Throw.Block(ErrorIds.ExportListenFailed, BlockErrorCategory.InvalidArgument, $"Cannot listen on unix socket '{fullPath}': {e.Message}", fullPath, e);
            return null!;
        }
    }

    /// <exception cref="BlockException">ExportAddressInUse, ExportListenFailed.</exception>
    public static ExportListener BindTcp(IPEndPoint endPoint)
    {
        var socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            socket.Bind(endPoint);
            socket.Listen(Backlog);
            return new ExportListener(socket, null, (IPEndPoint)socket.LocalEndPoint!);
        }
        catch (SocketException e)
        {
            socket.Dispose();
            if (e.SocketErrorCode == SocketError.AddressAlreadyInUse)
                Throw.Block(ErrorIds.ExportAddressInUse, BlockErrorCategory.ResourceBusy, $"TCP address {endPoint} is in use.", endPoint.ToString(), e);
            Throw.Block(ErrorIds.ExportListenFailed, BlockErrorCategory.InvalidArgument, $"Cannot listen on TCP address {endPoint}: {e.Message}", endPoint.ToString(), e);
            return null!;
        }
    }

    /// <summary>Remove a socket file nobody listens on; refuse anything else that is there.</summary>
    private static void TakeOverStale(string path)
    {
        int errno = LinuxFile.GetKind(path, out FileKind kind);
        if (errno == 0 && kind != FileKind.Socket && kind != FileKind.Unknown)
            Throw.Block(ErrorIds.ExportAddressInUse, BlockErrorCategory.ResourceExists,
                $"'{path}' exists and is not a socket: choose another -Socket path (it is never deleted).", path);
        using (var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            try
            {
                probe.Connect(new UnixDomainSocketEndPoint(path));
                Throw.Block(ErrorIds.ExportAddressInUse, BlockErrorCategory.ResourceBusy,
                    $"Unix socket '{path}' is in use: a server is listening on it.", path);
            }
            catch (SocketException)
            {
                // nobody listens: a socket left behind by a process that ended
            }
        }
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Throw.Block(ErrorIds.ExportListenFailed, BlockErrorCategory.PermissionDenied, $"Cannot replace the stale unix socket '{path}': {e.Message}", path, e);
        }
    }

    public void Dispose()
    {
        Socket.Dispose();
        if (SocketPath is null)
            return;
        try
        {
            if (LinuxFile.GetKind(SocketPath, out FileKind kind) == 0 && kind == FileKind.Socket)
                File.Delete(SocketPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // left behind: the next export on this path takes it over (nobody listens on it)
        }
    }
}
