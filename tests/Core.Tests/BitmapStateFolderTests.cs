using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Persistent bitmaps in a bitmap state folder (issue 17), on raw files opened with a state folder: the same store that
/// block devices use, keyed by the file's identity (file system and inode) instead of a device's. Loop devices:
/// tests/Pester/BlockDevices.Tests.ps1. Also raw files whose length is not a multiple of 512.
/// </summary>
public sealed class BitmapStateFolderTests
{
    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    [Fact]
    public void BitmapsSurviveInTheStateFolderAndNoSidecarIsWritten()
    {
        using var dir = new TempDirectory();
        string path = dir.File("d.img"), store = dir.File("state");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "d", bitmapStore: store);
        var folderStore = Assert.IsType<StateFolderBitmapStore>(node.Store);
        Assert.StartsWith(Path.Combine(store, StateFolderBitmapStore.SubFolder), folderStore.Path);
        Assert.StartsWith("file/", folderStore.Identity!.Key);
        node.AddBitmap("b", 4096, persistent: true);
        node.Write(8192, new byte[5000]);
        engine.Close(node);
        Assert.False(File.Exists(path + RawBitmapSidecar.Suffix));
        Assert.True(File.Exists(folderStore.Path));

        node = engine.Open(path, "d", bitmapStore: store);
        DirtyBitmap b = node.GetBitmap("b");
        Assert.False(b.Inconsistent);
        Assert.Equal([(8192L, 8192L)], b.GetDirtyRanges());
        engine.Close(node);

        node = engine.Open(path, "d"); // its folder can take a sidecar: by default the bitmaps would go there
        Assert.IsType<RawBitmapSidecar>(node.Store);
        Assert.Empty(node.Bitmaps);
        engine.Close(node);
    }

    [Fact]
    public void AStoredIdentityWhoseAttributesDifferLoadsEveryBitmapInconsistent()
    {
        using var dir = new TempDirectory();
        string path = dir.File("i.img"), store = dir.File("state");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "i", bitmapStore: store);
        ImageIdentity identity = ((StateFolderBitmapStore)node.Store!).Identity!;
        node.AddBitmap("b", persistent: true);
        node.Write(0, new byte[1]);
        engine.Close(node);

        // The same key with another attribute: an inode number reused by another file (its birth time differs).
        var other = new ImageIdentity(identity.Key, identity.Description, [new("born", "1")]);
        var look = new StateFolderBitmapStore(store, other, path, () => 4 << 20);
        StoredBitmap loaded = Assert.Single(look.Load());
        Assert.True(loaded.InUse);
        Assert.Null(loaded.Bits);

        // Another key: not this image's file at all.
        var stranger = new StateFolderBitmapStore(store, new ImageIdentity("file/0:0:1", "x"), path, () => 4 << 20);
        Assert.Empty(stranger.Load());
    }

    [Fact]
    public void AFileRecreatedAtTheSamePathNeverGetsTheOldBitmapsBack()
    {
        using var dir = new TempDirectory();
        string path = dir.File("r.img"), store = dir.File("state");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "r", bitmapStore: store);
        node.AddBitmap("b", persistent: true);
        engine.Close(node);
        File.Delete(path);
        BlockEngine.CreateImage(path, 4 << 20);

        node = engine.Open(path, "r", bitmapStore: store);
        Assert.All(node.Bitmaps, b => Assert.True(b.Inconsistent)); // an inode number reused: same key, another birth time
        engine.Close(node);
    }

    [Fact]
    public void ADiskThatGrewWhileClosedHasTheGrownRangeDirtyAndOneThatShrankLosesTheBitsPastItsEnd()
    {
        using var dir = new TempDirectory();
        string path = dir.File("g.img"), store = dir.File("state");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "g", bitmapStore: store);
        node.AddBitmap("on", 65536, persistent: true);
        node.AddBitmap("off", 65536, persistent: true, disabled: true);
        node.Write(1 << 20, new byte[1]);
        node.Write(3 << 20, new byte[1]);
        engine.Close(node);
        using (var f = new FileStream(path, FileMode.Open))
            f.SetLength(6 << 20);

        node = engine.Open(path, "g", bitmapStore: store);
        Assert.Equal([(1L << 20, 65536L), (3L << 20, 65536L), (4L << 20, 2L << 20)], node.GetBitmap("on").GetDirtyRanges());
        Assert.Empty(node.GetBitmap("off").GetDirtyRanges()); // it does not record: growth is not its to mark
        engine.Close(node);
        using (var f = new FileStream(path, FileMode.Open))
            f.SetLength(2 << 20);

        node = engine.Open(path, "g", bitmapStore: store);
        Assert.Equal(2L << 20, node.Size);
        Assert.Equal([(1L << 20, 65536L)], node.GetBitmap("on").GetDirtyRanges());
        Assert.False(node.GetBitmap("on").Inconsistent);
        engine.Close(node);
    }

    [Fact]
    public void AStateFolderIsRefusedForQcow2AndForARawFileWithASidecar()
    {
        using var dir = new TempDirectory();
        string qcow2 = dir.File("q.qcow2"), raw = dir.File("s.img"), store = dir.File("state");
        BlockEngine.CreateImage(qcow2, 4 << 20, ImageFormat.Qcow2);
        BlockEngine.CreateImage(raw, 4 << 20);
        var engine = new BlockEngine();
        Assert.Equal(ErrorIds.BitmapStoreConflict, ErrorId(() => engine.Open(qcow2, "q", bitmapStore: store)));
        BlockNode node = engine.Open(raw, "s");
        node.AddBitmap("b", persistent: true);
        engine.Close(node);
        Assert.Equal(ErrorIds.BitmapStoreConflict, ErrorId(() => engine.Open(raw, "s", bitmapStore: store)));
        Assert.Empty(engine.Nodes);
    }

    [Fact]
    public void UseBitmapStoreSwitchesANodeWithoutPersistentBitmapsAndLoadsWhatTheFolderHolds()
    {
        using var dir = new TempDirectory();
        string path = dir.File("u.img"), a = dir.File("a"), b = dir.File("b");
        BlockEngine.CreateImage(path, 4 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "u", bitmapStore: a);
        node.AddBitmap("kept", persistent: true);
        engine.Close(node);

        node = engine.Open(path, "u", bitmapStore: b);
        Assert.Empty(node.Bitmaps);
        node.UseBitmapStore(a);
        Assert.Equal(["kept"], node.Bitmaps.Select(x => x.Name!).ToArray());
        node.UseBitmapStore(a); // the same folder: nothing to do
        Assert.Equal(ErrorIds.BitmapStoreConflict, ErrorId(() => node.UseBitmapStore(b)));
        engine.Close(node);
    }

    [Fact]
    public void ARawFileOfALengthNotAMultipleOf512IsADiskRoundedUpWhoseTailReadsZeros()
    {
        using var dir = new TempDirectory();
        string path = dir.File("odd.img");
        byte[] data = new byte[1000];
        new Random(5).NextBytes(data);
        File.WriteAllBytes(path, data);
        using (IBlockImage image = BlockEngine.OpenImage(path, readOnly: true))
        {
            Assert.IsType<RawImage>(image);
            Assert.Equal(1024, image.Size);
            byte[] read = new byte[1024];
            image.Read(0, read);
            Assert.Equal(data, read[..1000]);
            Assert.All(read[1000..], x => Assert.Equal(0, x));
        }
        Assert.Equal(1000, new FileInfo(path).Length); // opening changes nothing
    }
}
