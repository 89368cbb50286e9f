using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

public sealed class BlockNodeTests
{
    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    [Fact]
    public void WrittenDataReadsBackAndSurvivesReopen()
    {
        using var dir = new TempDirectory();
        string path = dir.File("d.img");
        BlockEngine.CreateImage(path, 1 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path);
        byte[] data = new byte[10000];
        new Random(1).NextBytes(data);
        node.Write(12345, data);
        engine.Close(node);

        node = engine.Open(path, "again");
        byte[] back = new byte[data.Length];
        node.Read(12345, back);
        Assert.Equal(data, back);
        Assert.Equal("again", node.Name);
        engine.Close(node);
    }

    [Fact]
    public void RangesPastTheEndAreRefused()
    {
        using var f = new RawNodeFixture(1 << 20);
        Assert.Equal(ErrorIds.OffsetOutOfRange, ErrorId(() => f.Node.Write((1 << 20) - 1, new byte[2])));
        Assert.Equal(ErrorIds.OffsetOutOfRange, ErrorId(() => f.Node.Read(1 << 20 + 1, new byte[1])));
        Assert.Equal(ErrorIds.OffsetOutOfRange, ErrorId(() => f.Node.WriteZeroes(-1, 1)));
        Assert.Equal(ErrorIds.InvalidLength, ErrorId(() => f.Node.WriteZeroes(0, -1)));
        f.Node.Read(1 << 20, Span<byte>.Empty); // an empty read at the end is fine
    }

    [Fact]
    public void WriteZeroesPunchesHolesThatTheAllocationMapShows()
    {
        using var f = new RawNodeFixture(1 << 20);
        byte[] ones = new byte[1 << 20];
        ones.AsSpan().Fill(0xFF);
        f.Node.Write(0, ones);
        f.Node.WriteZeroes(65536, 131072);

        byte[] back = new byte[1 << 20];
        f.Node.Read(0, back);
        Assert.All(back.AsSpan(65536, 131072).ToArray(), b => Assert.Equal(0, b));
        Assert.Equal(0xFF, back[65535]);
        Assert.Equal(0xFF, back[65536 + 131072]);
        IReadOnlyList<AllocationExtent> map = f.Node.GetAllocation();
        Assert.Equal(new AllocationExtent(0, 65536, AllocationState.Data), map[0]);
        Assert.Equal(new AllocationExtent(65536, 131072, AllocationState.Zero), map[1]);
        Assert.Equal(AllocationState.Data, map[2].State);
        Assert.Equal(1 << 20, map.Sum(e => e.Length));
    }

    [Fact]
    public void ReadOnlyNodesRefuseWrites()
    {
        using var dir = new TempDirectory();
        string path = dir.File("ro.img");
        BlockEngine.CreateImage(path, 1 << 20);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "ro", readOnly: true);
        Assert.Equal(ErrorIds.NodeReadOnly, ErrorId(() => node.Write(0, new byte[1])));
        Assert.Equal(ErrorIds.NodeReadOnly, ErrorId(() => node.Resize(2 << 20)));
        node.AddBitmap("b"); // allowed, as in QEMU
        engine.CloseAll();
    }

    [Fact]
    public void TheImageIsLockedAgainstASecondWriter()
    {
        using var f = new RawNodeFixture();
        Assert.Equal(ErrorIds.ImageInUse, ErrorId(() => f.Engine.Open(f.Node.Path, "twice")));
        var otherEngine = new BlockEngine(); // another engine in the process still meets the file lock
        Assert.Equal(ErrorIds.ImageInUse, ErrorId(() => otherEngine.Open(f.Node.Path, "other")));
        Assert.Equal(ErrorIds.ImageInUse, ErrorId(() => otherEngine.Open(f.Node.Path, "reader", readOnly: true)));
    }

    [Fact]
    public void ReadersShareAnImage()
    {
        using var dir = new TempDirectory();
        string path = dir.File("shared.img");
        BlockEngine.CreateImage(path, 1 << 20);
        var a = new BlockEngine();
        var b = new BlockEngine();
        a.Open(path, "r1", readOnly: true);
        b.Open(path, "r2", readOnly: true);
        Assert.Equal(ErrorIds.ImageInUse, ErrorId(() => new BlockEngine().Open(path, "w")));
        a.CloseAll();
        b.CloseAll();
    }

    [Theory]
    [InlineData("1abc")]
    [InlineData("has space")]
    [InlineData("")]
    [InlineData("a/b")]
    [InlineData("abcdefghijabcdefghijabcdefghijab")] // 32 characters
    public void NodeNamesFollowQemusRule(string name)
        => Assert.Equal(ErrorIds.NodeNameInvalid, ErrorId(() => BlockEngine.CheckNodeName(name)));

    [Fact]
    public void DefaultNodeNamesComeFromTheFileAndAreUnique()
    {
        using var dir = new TempDirectory();
        var engine = new BlockEngine();
        string p1 = dir.File("disk.img");
        string p2 = dir.File("disk.raw");
        string p3 = dir.File("9 lives.img");
        string p4 = dir.File("other.img");
        foreach (string p in new[] { p1, p2, p3, p4 })
            BlockEngine.CreateImage(p, 512);
        Assert.Equal("disk", engine.Open(p1).Name);
        Assert.Equal("disk-2", engine.Open(p2).Name);
        Assert.Equal("node9_lives", engine.Open(p3).Name);
        Assert.Equal(ErrorIds.NodeNameInUse, ErrorId(() => engine.Open(p4, "disk")));
        engine.CloseAll();
    }

    [Fact]
    public void ShrinkIsRefusedOverDataAndAllowedOverHoles()
    {
        using var f = new RawNodeFixture(2 << 20);
        f.Node.Write((1 << 20) + 4096, new byte[] { 1 });
        Assert.Equal(ErrorIds.ShrinkWouldDiscardData, ErrorId(() => f.Node.Resize(1 << 20)));
        f.Node.WriteZeroes(1 << 20, 1 << 20);
        f.Node.Resize(1 << 20);
        Assert.Equal(1 << 20, f.Node.Size);
        Assert.Equal(ErrorIds.InvalidImageSize, ErrorId(() => f.Node.Resize(1000)));
    }

    [Fact]
    public void CreateRefusesExistingFilesAndBadSizes()
    {
        using var dir = new TempDirectory();
        string path = dir.File("x.img");
        BlockEngine.CreateImage(path, 512);
        Assert.Equal(ErrorIds.ImageAlreadyExists, ErrorId(() => BlockEngine.CreateImage(path, 512)));
        Assert.Equal(ErrorIds.InvalidImageSize, ErrorId(() => BlockEngine.CreateImage(dir.File("y.img"), 0)));
        Assert.Equal(ErrorIds.InvalidImageSize, ErrorId(() => BlockEngine.CreateImage(dir.File("y.img"), 1000)));
        Assert.Equal(ErrorIds.ImageNotFound, ErrorId(() => new BlockEngine().Open(dir.File("missing.img"))));
    }

    [Fact]
    public void ClosedNodesRefuseIOAndAreForgotten()
    {
        using var f = new RawNodeFixture();
        f.Engine.Close(f.Node);
        Assert.Equal(ErrorIds.NodeClosed, ErrorId(() => f.Node.Write(0, new byte[1])));
        Assert.Null(f.Engine.Find("n0"));
        Assert.Equal(ErrorIds.NodeNotFound, ErrorId(() => f.Engine.Get("n0")));
    }

    [Fact]
    public void NodeWithABusyBitmapCannotBeClosed()
    {
        using var f = new RawNodeFixture();
        var b = f.Node.AddBitmap("b");
        b.CreateSuccessor();
        Assert.Equal(ErrorIds.NodeBusy, ErrorId(() => f.Engine.Close(f.Node)));
        b.Reclaim();
    }
}
