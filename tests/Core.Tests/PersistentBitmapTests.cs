using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>Persistent bitmaps of raw images (sidecar file); qcow2 images: Qcow2PersistentBitmapTests.</summary>
public sealed class PersistentBitmapTests
{
    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    [Fact]
    public void APersistentBitmapSurvivesCloseAndReopenWithItsStateAndBits()
    {
        using var dir = new TempDirectory();
        string path = dir.File("p.img");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "p");
        DirtyBitmap b = node.AddBitmap("b", 4096, persistent: true);
        DirtyBitmap off = node.AddBitmap("off", persistent: true, disabled: true);
        node.AddBitmap("transient");
        node.Write(12345, new byte[10000]);
        off.MarkDirty(3 << 20, 1);
        var ranges = b.GetDirtyRanges();
        engine.Close(node);

        node = engine.Open(path, "p");
        Assert.Equal(["b", "off"], node.Bitmaps.Select(x => x.Name!).ToArray());
        DirtyBitmap again = node.GetBitmap("b");
        Assert.True(again.Persistent);
        Assert.False(again.Inconsistent);
        Assert.True(again.Recording);
        Assert.Equal(4096, again.Granularity);
        Assert.Equal(ranges, again.GetDirtyRanges());
        Assert.False(node.GetBitmap("off").Recording);
        Assert.Equal([(3L << 20, 65536L)], node.GetBitmap("off").GetDirtyRanges());
        engine.Close(node);
    }

    [Fact]
    public void ABitmapOfAWriterThatCrashedLoadsInconsistentAndCanOnlyBeRemoved()
    {
        using var dir = new TempDirectory();
        string path = dir.File("c.img");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "c");
        node.AddBitmap("b", persistent: true);
        node.Write(0, new byte[1]);
        node.Image.Dispose(); // the process dies: the file lock goes, nothing is stored

        var after = new BlockEngine();
        BlockNode reopened = after.Open(path, "c");
        DirtyBitmap b = reopened.GetBitmap("b");
        Assert.True(b.Inconsistent);
        Assert.False(b.Recording);
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(b.Enable));
        Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(() => b.Clear()));
        after.Close(reopened);

        reopened = after.Open(path, "c"); // still inconsistent after a clean close: never silently clean
        b = reopened.GetBitmap("b");
        Assert.True(b.Inconsistent);
        reopened.RemoveBitmap(b);
        after.Close(reopened);
        Assert.False(File.Exists(path + RawBitmapSidecar.Suffix));
    }

    [Fact]
    public void BitmapsLoadedFromAReadOnlyNodeAreReadOnlyAndNotMarked()
    {
        using var dir = new TempDirectory();
        string path = dir.File("r.img");
        BlockEngine.CreateImage(path, 1 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "r");
        node.AddBitmap("b", persistent: true);
        node.Write(0, new byte[1]);
        engine.Close(node);
        byte[] sidecar = File.ReadAllBytes(path + RawBitmapSidecar.Suffix);

        node = engine.Open(path, "r", readOnly: true);
        DirtyBitmap b = node.GetBitmap("b");
        Assert.True(b.ReadOnly);
        Assert.Equal(65536, b.Count);
        Assert.Equal(ErrorIds.BitmapReadOnly, ErrorId(() => b.Clear()));
        Assert.Equal(ErrorIds.PersistenceNotSupported, ErrorId(() => node.AddBitmap("new", persistent: true)));
        engine.Close(node);
        Assert.Equal(sidecar, File.ReadAllBytes(path + RawBitmapSidecar.Suffix));
    }

    [Fact]
    public void ACorruptSidecarIsRefusedWithAClearError()
    {
        using var dir = new TempDirectory();
        string path = dir.File("x.img");
        BlockEngine.CreateImage(path, 1 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "x");
        node.AddBitmap("b", persistent: true);
        node.Write(0, new byte[1]);
        engine.Close(node);
        string sidecar = path + RawBitmapSidecar.Suffix;
        byte[] bytes = File.ReadAllBytes(sidecar);
        var rng = new Random(5);
        for (int i = 0; i < 200; i++)
        {
            byte[] bad = (byte[])bytes.Clone();
            if (i % 2 == 0)
                bad[rng.Next(bad.Length)] ^= (byte)(1 << rng.Next(8));
            else
                Array.Resize(ref bad, rng.Next(bad.Length));
            File.WriteAllBytes(sidecar, bad);
            try
            {
                engine.Close(engine.Open(path, "x"));
            }
            catch (BlockException e)
            {
                Assert.Equal(ErrorIds.ImageCorrupt, e.ErrorId);
                Assert.Contains(sidecar, e.Message);
            }
            Assert.Null(engine.Find("x"));
        }
    }
}
