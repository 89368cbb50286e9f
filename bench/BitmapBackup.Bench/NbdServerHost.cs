using BitmapBackup.Core.Export;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Bench;

/// <summary>
/// The bench's own child process that serves one image with our NBD export, so that its memory and CPU are measured
/// apart from the bench (as qemu-nbd's are): <c>BitmapBackup.Bench nbd-server IMAGE SOCKET [BITMAP]</c>. It opens the
/// image as a writable node, exports it writable as "disk" (with the bitmap, if given, as qemu:dirty-bitmap:BITMAP),
/// prints "ready", and serves until its standard input closes; then it stops the export and closes the node.
/// </summary>
internal static class NbdServerHost
{
    public static int Run(string[] args)
    {
        if (args.Length is < 2 or > 3)
        {
            Console.Error.WriteLine("usage: BitmapBackup.Bench nbd-server IMAGE SOCKET [BITMAP]");
            return 2;
        }
        var engine = new BlockEngine();
        var registry = new ExportRegistry();
        BlockNode node = engine.Open(args[0], "disk");
        registry.Start(node, new ExportOptions
        {
            Name = "disk",
            SocketPath = args[1],
            Writable = true,
            Bitmaps = args.Length == 3 ? [args[2]] : [],
            MaxConnections = 8, // qemu-nbd -e 8
        });
        Console.Out.WriteLine("ready");
        Console.Out.Flush();
        while (Console.In.ReadLine() is not null)
        {
        }
        registry.StopAll();
        engine.CloseAll();
        return 0;
    }
}
