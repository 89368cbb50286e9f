using System.Net;

namespace BitmapBackup.Core.Export;

/// <summary>How to export a node (Start-BlockExport's parameters). Exactly one of <see cref="SocketPath"/> and <see cref="TcpEndPoint"/>.</summary>
public sealed record ExportOptions
{
    /// <summary>Default for <see cref="MaxConnections"/>: enough for nbdfuse and nbdcopy, which open up to 4 connections each.</summary>
    public const int DefaultMaxConnections = 16;

    /// <summary>How long a client may take from connecting to the end of its negotiation (QEMU's CVE-2024-7409 limit).</summary>
    public static readonly TimeSpan DefaultHandshakeTimeout = TimeSpan.FromSeconds(10);

    /// <summary>The export name clients ask for; null: the node's name.</summary>
    public string? Name { get; init; }

    /// <summary>Text sent with NBD_INFO_DESCRIPTION and in export lists, or null.</summary>
    public string? Description { get; init; }

    /// <summary>Serve writes (a read-only node cannot be exported writable).</summary>
    public bool Writable { get; init; }

    /// <summary>Names of the node's bitmaps to offer as qemu:dirty-bitmap:NAME contexts.</summary>
    public IReadOnlyList<string> Bitmaps { get; init; } = [];

    /// <summary>Path of the unix socket to listen on.</summary>
    public string? SocketPath { get; init; }

    /// <summary>TCP address and port to listen on (port 0: one the system chooses).</summary>
    public IPEndPoint? TcpEndPoint { get; init; }

    /// <summary>Connections served at once; a client over the limit waits until one ends (qemu-nbd's -e).</summary>
    public int MaxConnections { get; init; } = DefaultMaxConnections;

    /// <summary>See <see cref="DefaultHandshakeTimeout"/>.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = DefaultHandshakeTimeout;
}
