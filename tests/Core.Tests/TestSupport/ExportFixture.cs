using BitmapBackup.Core.Export;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>
/// A private engine and export registry with one node exported on a unix socket in a scratch folder. Disposing
/// stops the export, checks that no connection met an unexpected exception, and closes the node.
/// </summary>
public sealed class ExportFixture : IDisposable
{
    private readonly TempDirectory _dir = new();

    public ExportFixture(long size = 8 << 20, ImageFormat format = ImageFormat.Raw, bool writable = true, string[]? bitmaps = null,
        Func<ExportOptions, ExportOptions>? configure = null, bool readOnlyNode = false)
    {
        Engine = new BlockEngine();
        Registry = new ExportRegistry();
        string path = _dir.File(format == ImageFormat.Raw ? "n0.img" : "n0.qcow2");
        BlockEngine.CreateImage(path, size, format);
        if (readOnlyNode)
            Node = Engine.Open(path, "n0", readOnly: true);
        else
        {
            Node = Engine.Open(path, "n0");
            foreach (string b in bitmaps ?? [])
                Node.AddBitmap(b);
        }
        SocketPath = _dir.File("s");
        var options = new ExportOptions { Name = "disk", SocketPath = SocketPath, Writable = writable, Bitmaps = bitmaps ?? [] };
        Export = Registry.Start(Node, configure?.Invoke(options) ?? options);
    }

    public BlockEngine Engine { get; }

    public ExportRegistry Registry { get; }

    public BlockNode Node { get; }

    public BlockExport Export { get; }

    public string SocketPath { get; }

    public string Folder => _dir.Path;

    /// <summary>A client connected and negotiated (structured replies and <paramref name="contexts"/> unless told otherwise).</summary>
    public NbdTestClient Connect(bool structuredReplies = true, params string[] contexts)
        => new NbdTestClient(SocketPath).Negotiate("disk", structuredReplies, contexts);

    public void Dispose()
    {
        Registry.StopAll(TimeSpan.FromSeconds(10));
        Exception? unexpected = Export.UnexpectedError;
        Engine.CloseAll();
        _dir.Dispose();
        if (unexpected is not null)
            throw new InvalidOperationException("A connection of the export met an unexpected exception.", unexpected);
    }
}
