using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Tests.TestSupport;

/// <summary>A private engine with one raw node in a scratch folder.</summary>
public sealed class RawNodeFixture : IDisposable
{
    private readonly TempDirectory _dir = new();

    public RawNodeFixture(long size = 4 << 20, string name = "n0")
    {
        Engine = new BlockEngine();
        string path = _dir.File(name + ".img");
        BlockEngine.CreateImage(path, size);
        Node = Engine.Open(path, name);
    }

    public BlockEngine Engine { get; }

    public BlockNode Node { get; }

    public string Folder => _dir.Path;

    public BlockNode OpenAnother(string name, long size)
    {
        string path = _dir.File(name + ".img");
        BlockEngine.CreateImage(path, size);
        return Engine.Open(path, name);
    }

    public void Dispose()
    {
        Engine.CloseAll();
        _dir.Dispose();
    }
}
