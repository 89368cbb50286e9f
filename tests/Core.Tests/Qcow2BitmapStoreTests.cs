using System.Buffers.Binary;
using System.Text.Json;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Qcow2BitmapStore against the real qemu-img / qemu-io: bitmaps we store are QEMU's bitmaps (listed, edited,
/// recorded into, checked clean), and bitmaps QEMU stores load here with exactly the bits it recorded.
/// Nodes are built the way the engine builds them once BlockEngine.StoreFor returns the store for qcow2 images.
/// </summary>
public sealed class Qcow2BitmapStoreTests
{
    #region Our bitmaps as QEMU sees them

    [Fact]
    public void MarkInUse_ListsNewBitmapsInUse_ThenStoreClearsInUse_QemuAgreesAndCheckIsClean()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("a.qcow2");
        Qcow2Image.Create(img, 16 * MiB);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("daily", 65536, persistent: true);
            Assert.Equal([("daily", 65536L, "auto,in-use")], Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true));
            QemuImg.AssertClean(img, forceShare: true);
            node.AddBitmap("weekly-with-a-longer-name", 4096, persistent: true, disabled: true);
            node.AddBitmap("transient", 4096);
            Assert.Equal(
                [("daily", 65536L, "auto,in-use"), ("weekly-with-a-longer-name", 4096L, "in-use")],
                Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true));
            QemuImg.AssertClean(img, forceShare: true);
            node.Write(100_000, Pattern(200_000, 1));
        }
        Assert.Equal(
            [("daily", 65536L, "auto"), ("weekly-with-a-longer-name", 4096L, "")],
            Qcow2BitmapNodes.QemuBitmaps(img));
        QemuImg.AssertClean(img);

        IReadOnlyList<StoredBitmap> stored = Qcow2BitmapNodes.Load(img);
        Assert.Equal(2, stored.Count);
        Assert.False(stored[0].InUse);
        Assert.True(stored[0].Auto);
        Assert.Equal([(1L, 4L)], stored[0].Bits!.Runs().ToArray()); // 64K clusters 1..4 cover [100000, 300000)
        Assert.False(stored[1].Auto);
        Assert.Equal(0, stored[1].Bits!.Count);
    }

    [Fact]
    public void StoredBits_RoundTripThroughQemuMerge()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("ours.qcow2");
        string other = dir.File("qemu.qcow2");
        Qcow2Image.Create(img, 64 * MiB);
        var writes = new (long Offset, long Length)[] { (0, 1), (65536 * 3 + 5, 70000), (10 * MiB, 4 * MiB), (64 * MiB - 512, 512) };
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("g4k", 4096, persistent: true);
            node.AddBitmap("g64k", 65536, persistent: true);
            node.AddBitmap("g1m", 1 << 20, persistent: true);
            foreach ((long o, long l) in writes)
                node.Write(o, new byte[l]);
        }
        QemuImg.AssertClean(img);

        // QEMU reads our bitmap (merge source) and writes it into its own image; we read QEMU's copy.
        QemuImg.RunOk("create", "-f", "qcow2", other, "64M");
        foreach (long g in new long[] { 4096, 65536, 1 << 20 })
        {
            string name = g switch { 4096 => "g4k", 65536 => "g64k", _ => "g1m" };
            QemuImg.RunOk("bitmap", "--add", "-g", g.ToString(), other, name);
            QemuImg.RunOk("bitmap", "--merge", name, "-b", img, "-F", "qcow2", other, name);
        }
        QemuImg.AssertClean(other);
        IReadOnlyList<StoredBitmap> ours = Qcow2BitmapNodes.Load(img);
        IReadOnlyList<StoredBitmap> theirs = Qcow2BitmapNodes.Load(other);
        foreach (StoredBitmap b in ours)
        {
            StoredBitmap copy = theirs.Single(t => t.Name == b.Name);
            Assert.Equal(Qcow2BitmapNodes.ExpectedRuns(writes, 64 * MiB, b.Granularity), b.Bits!.Runs().ToArray());
            Assert.Equal(b.Bits!.Runs().ToArray(), copy.Bits!.Runs().ToArray());
        }
    }

    #endregion

    #region QEMU's bitmaps as we see them

    public static TheoryData<int, long> QemuGranularities => new()
    {
        { 65536, 65536 }, { 65536, 512 }, { 65536, 4096 }, { 65536, 1 << 20 }, { 4096, 65536 }, { 512, 4096 }, { 2 << 20, 512 },
    };

    [Theory]
    [MemberData(nameof(QemuGranularities))]
    public void BitmapAddedByQemuImg_DirtiedByQemuIo_LoadsExactlyTheWrittenRanges(int clusterSize, long granularity)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("q.qcow2");
        long size = 40 * MiB + 512 * 7;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", img, size.ToString());
        QemuImg.RunOk("bitmap", "--add", "-g", granularity.ToString(), img, "b");
        var writes = new (long Offset, long Length)[] { (512, 512), (1 * MiB - 512, 4096), (5 * MiB, 3 * MiB + 1024), (33 * MiB + 4096, 512), (size - 1024, 1024) };
        QemuImg.IoOk(img, writes.Select(w => $"write {w.Offset} {w.Length}").ToArray());
        QemuImg.AssertClean(img);

        StoredBitmap b = Assert.Single(Qcow2BitmapNodes.Load(img));
        Assert.Equal("b", b.Name);
        Assert.Equal(granularity, b.Granularity);
        Assert.False(b.InUse);
        Assert.True(b.Auto);
        Assert.Equal(Qcow2BitmapNodes.ExpectedRuns(writes, size, granularity), b.Bits!.Runs().ToArray());

        // The engine's view: the node's bitmap has exactly those ranges, and storing it back keeps QEMU happy.
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            DirtyBitmap bitmap = node.GetBitmap("b");
            Assert.False(bitmap.Inconsistent);
            Assert.True(bitmap.Recording);
            Assert.Equal(b.Bits.Count, bitmap.DirtyBits);
            Assert.Equal([("b", granularity, "auto,in-use")], Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true));
        }
        QemuImg.AssertClean(img);
        Assert.Equal(b.Bits.Runs().ToArray(), Assert.Single(Qcow2BitmapNodes.Load(img)).Bits!.Runs().ToArray());
    }

    [Fact]
    public void QemuIo_RecordsIntoOurAutoBitmaps_NotIntoDisabledOnes()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("rec.qcow2");
        Qcow2Image.Create(img, 8 * MiB);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("on", 65536, persistent: true);
            node.AddBitmap("off", 65536, persistent: true, disabled: true);
            node.Write(0, new byte[4096]);
            node.GetBitmap("off").MarkDirty(7 * MiB, 1);
        }
        QemuImg.IoOk(img, "write 2M 100k");
        QemuImg.AssertClean(img);
        IReadOnlyList<StoredBitmap> stored = Qcow2BitmapNodes.Load(img);
        Assert.Equal([(0L, 1L), (32L, 2L)], stored.Single(s => s.Name == "on").Bits!.Runs().ToArray());
        Assert.Equal([(112L, 1L)], stored.Single(s => s.Name == "off").Bits!.Runs().ToArray());
        Assert.All(stored, s => Assert.False(s.InUse));
    }

    [Fact]
    public void QemuImgBitmapCommands_OnOurImage_AreSeenByLoad()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("ops.qcow2");
        Qcow2Image.Create(img, 16 * MiB, 4096);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("a", 65536, persistent: true);
            node.Write(0, new byte[65536]);
            node.AddBitmap("b", 65536, persistent: true);
            node.Write(4 * MiB, new byte[131072]);
        }
        QemuImg.AssertClean(img);
        Assert.Equal([(0L, 1L), (64L, 2L)], Qcow2BitmapNodes.Runs(img, "a"));
        Assert.Equal([(64L, 2L)], Qcow2BitmapNodes.Runs(img, "b"));

        QemuImg.RunOk("bitmap", "--add", "-g", "65536", img, "c");
        QemuImg.RunOk("bitmap", "--merge", "a", img, "c");
        QemuImg.AssertClean(img);
        Assert.Equal([(0L, 1L), (64L, 2L)], Qcow2BitmapNodes.Runs(img, "c"));

        QemuImg.RunOk("bitmap", "--clear", img, "a");
        QemuImg.RunOk("bitmap", "--disable", img, "b");
        QemuImg.AssertClean(img);
        IReadOnlyList<StoredBitmap> stored = Qcow2BitmapNodes.Load(img);
        Assert.Equal(["a", "b", "c"], stored.Select(s => s.Name).ToArray());
        Assert.Equal(0, stored[0].Bits!.Count);
        Assert.False(stored[1].Auto);
        Assert.True(stored[0].Auto);

        QemuImg.RunOk("bitmap", "--remove", img, "a");
        QemuImg.RunOk("bitmap", "--enable", img, "b");
        QemuImg.AssertClean(img);
        stored = Qcow2BitmapNodes.Load(img);
        Assert.Equal(["b", "c"], stored.Select(s => s.Name).ToArray());
        Assert.True(stored[0].Auto);

        // And back through the engine: loaded as QEMU left them, recorded into, stored again.
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            Assert.Equal(["b", "c"], node.Bitmaps.Select(b => b.Name!).ToArray());
            Assert.True(node.GetBitmap("b").Recording);
            node.Write(8 * MiB, new byte[1]);
        }
        QemuImg.AssertClean(img);
        Assert.Equal([(64L, 2L), (128L, 1L)], Qcow2BitmapNodes.Runs(img, "b"));
        Assert.Equal([(0L, 1L), (64L, 2L), (128L, 1L)], Qcow2BitmapNodes.Runs(img, "c"));
    }

    #endregion

    #region Steps, crashes, removal

    [Fact]
    public void EveryStep_LeavesACleanImage_ReStoreWithDifferentBits_ThenRemoveAll()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("steps.qcow2");
        Qcow2Image.Create(img, 32 * MiB, 65536);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("x", 4096, persistent: true);
            QemuImg.AssertClean(img, forceShare: true);
            node.Write(0, Pattern(3 * MiB, 2));
            node.AddBitmap("y", 65536, persistent: true);
            QemuImg.AssertClean(img, forceShare: true);
        }
        QemuImg.AssertClean(img);
        Assert.Equal([(0L, 768L)], Qcow2BitmapNodes.Runs(img, "x"));

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            QemuImg.AssertClean(img, forceShare: true); // marked in use at open: the data of the last store is still referenced
            Assert.All(Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true), b => Assert.Contains("in-use", b.Flags));
            node.GetBitmap("x").Clear();
            node.Write(20 * MiB, new byte[5000]);
        }
        QemuImg.AssertClean(img);
        Assert.Equal([(5120L, 2L)], Qcow2BitmapNodes.Runs(img, "x"));
        Assert.Equal([(320L, 1L)], Qcow2BitmapNodes.Runs(img, "y"));

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.RemoveBitmap(node.GetBitmap("x"));
            QemuImg.AssertClean(img, forceShare: true);
            Assert.Equal(["y"], Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true).Select(b => b.Name).ToArray());
        }
        QemuImg.AssertClean(img);

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.RemoveBitmap(node.GetBitmap("y"));
            QemuImg.AssertClean(img, forceShare: true);
            Assert.Empty(Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true));
        }
        QemuImg.AssertClean(img);
        using (var image = Qcow2Image.Open(img, readOnly: true))
        {
            Assert.Equal(Qcow2AutoclearFeatures.None, image.AutoclearFeatures);
            Assert.Empty(image.Bitmaps);
            Assert.Empty(image.BitmapStore.Load());
        }
        JsonElement info = QemuImg.Info(img);
        Assert.False(info.GetProperty("format-specific").GetProperty("data").TryGetProperty("bitmaps", out _));
    }

    [Fact]
    public void CrashAfterMarkInUse_LoadsInUse_QemuShowsInUse_RemovalCleansUp()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("crash.qcow2");
        Qcow2Image.Create(img, 8 * MiB);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("kept", 65536, persistent: true);
            node.Write(0, new byte[100]);
        }
        BlockNode crashed = Qcow2BitmapNodes.Open(img);
        crashed.AddBitmap("new", 65536, persistent: true);
        crashed.Write(MiB, new byte[100]);
        crashed.Image.Dispose(); // the process dies: no Store

        Assert.Equal([("kept", 65536L, "auto,in-use"), ("new", 65536L, "auto,in-use")], Qcow2BitmapNodes.QemuBitmaps(img));
        QemuImg.AssertClean(img);
        IReadOnlyList<StoredBitmap> stored = Qcow2BitmapNodes.Load(img);
        Assert.All(stored, s =>
        {
            Assert.True(s.InUse);
            Assert.Null(s.Bits);
        });

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            DirtyBitmap kept = node.GetBitmap("kept");
            Assert.True(kept.Inconsistent);
            Assert.False(kept.Recording);
            Assert.Equal(ErrorIds.BitmapInconsistent, Assert.Throws<BlockException>(() => kept.Clear()).ErrorId);
            node.Write(2 * MiB, new byte[1]);
        }
        // Still inconsistent after a clean close, and still QEMU's in-use bitmaps (QEMU can remove them too).
        Assert.Equal([("kept", 65536L, "auto,in-use"), ("new", 65536L, "auto,in-use")], Qcow2BitmapNodes.QemuBitmaps(img));
        QemuImg.AssertClean(img);
        QemuImg.RunOk("bitmap", "--remove", img, "new");
        QemuImg.AssertClean(img);

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
            node.RemoveBitmap(node.GetBitmap("kept"));
        QemuImg.AssertClean(img);
        Assert.Empty(Qcow2BitmapNodes.Load(img));
        Assert.Empty(Qcow2BitmapNodes.QemuBitmaps(img));
    }

    [Fact]
    public void ReadOnlyNode_LoadsWithoutChangingTheFile_AndRefusesNewPersistentBitmaps()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("ro.qcow2");
        Qcow2Image.Create(img, 8 * MiB);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("b", 65536, persistent: true);
            node.Write(0, new byte[1]);
        }
        byte[] before = File.ReadAllBytes(img);
        using (BlockNode node = Qcow2BitmapNodes.Open(img, readOnly: true))
        {
            DirtyBitmap b = node.GetBitmap("b");
            Assert.True(b.ReadOnly);
            Assert.False(b.Inconsistent);
            Assert.Equal(65536, b.Count);
            Assert.Equal(ErrorIds.PersistenceNotSupported, Assert.Throws<BlockException>(() => node.AddBitmap("c", persistent: true)).ErrorId);
            var store = (Qcow2BitmapStore)node.Store!;
            Assert.Equal(ErrorIds.PersistenceNotSupported, Assert.Throws<BlockException>(() => store.CheckCanStore("c", 65536, [])).ErrorId);
        }
        Assert.Equal(before, File.ReadAllBytes(img));
    }

    [Fact]
    public void Resize_StoresTheBitmapAtTheNewSize()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("grow.qcow2");
        Qcow2Image.Create(img, 4 * MiB, 4096);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("b", 512, persistent: true);
            node.Write(0, new byte[512]);
            node.Resize(300 * MiB);
            node.Write(299 * MiB, new byte[512]);
        }
        QemuImg.AssertClean(img);
        StoredBitmap b = Assert.Single(Qcow2BitmapNodes.Load(img));
        Assert.Equal(300L * MiB / 512, b.Bits!.Length);
        Assert.Equal([(0L, 1L), (4L * MiB / 512, 296L * MiB / 512)], b.Bits.Runs().ToArray()); // growth marks the new range
        QemuImg.IoOk(img, "write 1M 512");
        QemuImg.AssertClean(img);
        Assert.Equal([(0L, 1L), (2048L, 1L), (4L * MiB / 512, 296L * MiB / 512)], Qcow2BitmapNodes.Runs(img, "b"));
    }

    #endregion

    #region Layouts

    [Fact]
    public void SmallClusters_MultiClusterTablesAndDirectory_AreValidForQemu()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("small.qcow2");
        long size = 300 * MiB;
        Qcow2Image.Create(img, size, 512);
        var writes = new List<(long, long)>();
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("fine", 512, persistent: true); // 600 Ki bits: 150 data clusters, a 3-cluster table
            for (int i = 0; i < 12; i++)
                node.AddBitmap("a-rather-long-bitmap-name-to-make-the-directory-span-clusters-" + i, 65536, persistent: true, disabled: i % 2 == 0);
            var rng = new Random(3);
            for (int i = 0; i < 40; i++)
            {
                long o = rng.NextInt64(size / 512) * 512;
                long l = Math.Min(size - o, rng.Next(1, 200_000));
                node.Write(o, new byte[l]);
                writes.Add((o, l));
            }
        }
        QemuImg.AssertClean(img);
        Assert.Equal(13, Qcow2BitmapNodes.QemuBitmaps(img).Count);
        StoredBitmap fine = Qcow2BitmapNodes.Load(img)[0];
        Assert.Equal(Qcow2BitmapNodes.ExpectedRuns(writes, size, 512), fine.Bits!.Runs().ToArray());

        QemuImg.IoOk(img, "write 0 512");
        QemuImg.AssertClean(img);
        Assert.True(Qcow2BitmapNodes.Load(img)[0].Bits!.Get(0));
    }

    [Fact]
    public void BackingFileName_IsMovedToMakeRoomForTheExtension()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("base.qcow2");
        string top = dir.File("top.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", baseImg, "4M");
        QemuImg.IoOk(baseImg, "write -P 7 0 4M");
        // Our Create puts the backing file name right after the end record, as QEMU does: no room for a record.
        Qcow2Image.Create(top, 4 * MiB, 65536, "base.qcow2", ImageFormat.Qcow2);
        using (BlockNode node = Qcow2BitmapNodes.Open(top))
        {
            node.AddBitmap("b", 65536, persistent: true);
            node.Write(MiB, Pattern(1000, 4));
        }
        QemuImg.AssertClean(top);
        JsonElement info = QemuImg.Info(top);
        Assert.Equal("base.qcow2", info.GetProperty("backing-filename").GetString());
        Assert.Equal([(16L, 1L)], Qcow2BitmapNodes.Runs(top, "b"));
        QemuImg.IoOk(top, "read -P 7 0 1M", "read -P 7 2M 2M");
        using (var image = Qcow2Image.Open(top, readOnly: true))
        {
            Assert.Equal("base.qcow2", image.BackingFile);
            Assert.Equal(Pattern(1000, 4), ReadAll(image).AsSpan(MiB, 1000).ToArray());
        }

        // Removing the last bitmap removes the record and keeps the backing file.
        using (BlockNode node = Qcow2BitmapNodes.Open(top))
            node.RemoveBitmap(node.GetBitmap("b"));
        QemuImg.AssertClean(top);
        Assert.Equal("base.qcow2", QemuImg.Info(top).GetProperty("backing-filename").GetString());
        Assert.Empty(Qcow2BitmapNodes.QemuBitmaps(top));
    }

    [Fact]
    public void QemuOverlay_WithFeatureTable_GetsTheExtension()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("b.qcow2");
        string top = dir.File("t.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", baseImg, "2M");
        QemuImg.RunOk("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top);
        using (BlockNode node = Qcow2BitmapNodes.Open(top))
        {
            node.AddBitmap("b", 65536, persistent: true);
            node.Write(0, new byte[1]);
        }
        QemuImg.AssertClean(top);
        Assert.Equal("b.qcow2", QemuImg.Info(top).GetProperty("backing-filename").GetString());
        Assert.Equal([("b", 65536L, "auto")], Qcow2BitmapNodes.QemuBitmaps(top));
        QemuImg.RunOk("bitmap", "--add", top, "c");
        QemuImg.AssertClean(top);
        Assert.Equal(["b", "c"], Qcow2BitmapNodes.Load(top).Select(s => s.Name).ToArray());
    }

    [Fact]
    public void UnknownHeaderExtensions_ArePreserved_WhenTheRecordIsRemovedAndAdded()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("unknown.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.RunOk("bitmap", "--add", img, "b");
        byte[] file = File.ReadAllBytes(img);
        (int at, _, _, _) = Qcow2BitmapNodes.Extension(file)!.Value;
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(at + 32))); // QEMU writes the bitmaps record last
        byte[] unknown = [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5, (byte)'h', (byte)'e', (byte)'l', (byte)'l', (byte)'o', 0, 0, 0];
        unknown.CopyTo(file, at + 32);
        new byte[8].CopyTo(file, at + 48);
        File.WriteAllBytes(img, file);
        QemuImg.AssertClean(img);

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
            node.RemoveBitmap(node.GetBitmap("b")); // the record is not the last: the unknown one moves up
        QemuImg.AssertClean(img);
        Assert.Empty(Qcow2BitmapNodes.QemuBitmaps(img));
        file = File.ReadAllBytes(img);
        Assert.Null(Qcow2BitmapNodes.Extension(file));
        Assert.Equal(unknown, file.AsSpan(at, 16).ToArray());
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(at + 16)));

        using (BlockNode node = Qcow2BitmapNodes.Open(img))
            node.AddBitmap("again", 65536, persistent: true);
        QemuImg.AssertClean(img);
        Assert.Equal([("again", 65536L, "auto")], Qcow2BitmapNodes.QemuBitmaps(img));
        file = File.ReadAllBytes(img);
        Assert.Equal(unknown, file.AsSpan(at, 16).ToArray());
        Assert.Equal(at + 16, Qcow2BitmapNodes.Extension(file)!.Value.At);
    }

    #endregion

    #region Refusals

    [Fact]
    public void V2Image_RefusesPersistentBitmaps_AndIsLeftAlone()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("v2.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "compat=0.10", img, "4M");
        byte[] before = File.ReadAllBytes(img);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            BlockException e = Assert.Throws<BlockException>(() => node.AddBitmap("b", persistent: true));
            Assert.Equal(ErrorIds.PersistenceNotSupported, e.ErrorId);
            Assert.Contains("Cannot store dirty bitmaps in qcow2 v2 files", e.Message, StringComparison.OrdinalIgnoreCase);
            Assert.Contains("'b'", e.Message);
            Assert.Contains(img, e.Message);
            Assert.Null(node.FindBitmap("b"));
            node.AddBitmap("transient");
        }
        Assert.Equal(before, File.ReadAllBytes(img));
    }

    [Fact]
    public void CheckCanStore_RefusesWhatQemuRefuses()
    {
        using var dir = new TempDirectory();
        string img = dir.File("big.qcow2");
        Qcow2Image.Create(img, 4L << 40, 65536); // 4 TiB: at 512 bytes per bit the bitmap would take 1 GiB
        using var image = Qcow2Image.Open(img, readOnly: false);
        var store = new Qcow2BitmapStore(image);
        BlockException e = Assert.Throws<BlockException>(() => store.CheckCanStore("fine", 512, []));
        Assert.Equal(ErrorIds.PersistenceNotSupported, e.ErrorId);
        Assert.Contains("too much space", e.Message, StringComparison.OrdinalIgnoreCase);
        Assert.Contains("'fine'", e.Message);
        store.CheckCanStore("fine", 65536, []);
        Assert.Throws<BlockException>(() => store.CheckCanStore("g", 1L << 32, []));
        Assert.Throws<BlockException>(() => store.CheckCanStore(new string('x', 1024), 65536, []));
        store.CheckCanStore(new string('x', 1023), 65536, []);
        Assert.Empty(store.Load());
    }

    [Fact]
    public void NoBitmaps_OpenAndCloseReadWrite_LeavesTheFileUnchanged()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("plain.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        byte[] before = File.ReadAllBytes(img);
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
            node.AddBitmap("transient");
        Assert.Equal(before, File.ReadAllBytes(img));
    }

    #endregion

    #region Through the engine

    [Fact]
    public void ThroughBlockEngine_OnceStoreForReturnsTheQcow2Store()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("engine.qcow2");
        BlockEngine.CreateImage(img, 8 * MiB, ImageFormat.Qcow2);
        using (IBlockImage probe = BlockEngine.OpenImage(img, readOnly: true))
            Assert.SkipWhen(BlockEngine.StoreFor(probe) is not Qcow2BitmapStore, "BlockEngine.StoreFor does not return a Qcow2BitmapStore for qcow2 images yet.");

        var engine = new BlockEngine();
        BlockNode node = engine.Open(img, "e");
        node.AddBitmap("b", 65536, persistent: true);
        node.Write(3 * MiB, new byte[10]);
        Assert.Equal([("b", 65536L, "auto,in-use")], Qcow2BitmapNodes.QemuBitmaps(img, forceShare: true));
        StoredBitmap whileOpen = Assert.Single(engine.ReadStoredBitmaps(img));
        Assert.True(whileOpen.InUse);
        engine.Close(node);
        QemuImg.AssertClean(img);
        StoredBitmap closed = Assert.Single(engine.ReadStoredBitmaps(img));
        Assert.False(closed.InUse);
        Assert.Equal([(48L, 1L)], closed.Bits!.Runs().ToArray());

        QemuImg.IoOk(img, "write 0 1");
        node = engine.Open(img, "e");
        Assert.Equal([(0L, 65536L), (3L * MiB, 65536L)], node.GetBitmap("b").GetDirtyRanges());
        node.RemoveBitmap(node.GetBitmap("b"));
        engine.Close(node);
        QemuImg.AssertClean(img);
        Assert.Empty(engine.ReadStoredBitmaps(img));
    }

    #endregion
}

/// <summary>Nodes over qcow2 images with the bitmap store, and QEMU's view of an image's bitmaps.</summary>
internal static class Qcow2BitmapNodes
{
    /// <summary>Open a node exactly as BlockEngine.Open does with StoreFor returning <see cref="Qcow2BitmapStore"/>.</summary>
    public static BlockNode Open(string path, bool readOnly = false)
    {
        var image = Qcow2Image.Open(path, readOnly);
        var node = new BlockNode("n" + Guid.NewGuid().ToString("N")[..8], image, new Qcow2BitmapStore(image));
        try
        {
            node.LoadPersistentBitmaps();
        }
        catch
        {
            image.Dispose();
            throw;
        }
        return node;
    }

    /// <summary>Our Load of the image, opened read-only for it.</summary>
    public static IReadOnlyList<StoredBitmap> Load(string path)
    {
        using var image = Qcow2Image.Open(path, readOnly: true);
        return new Qcow2BitmapStore(image).Load();
    }

    public static (long Start, long Count)[] Runs(string path, string name)
        => Load(path).Single(b => b.Name == name).Bits!.Runs().ToArray();

    /// <summary>qemu-img info's bitmaps: name, granularity, flags sorted and joined by commas.</summary>
    public static List<(string Name, long Granularity, string Flags)> QemuBitmaps(string path, bool forceShare = false)
    {
        JsonElement info = QemuImg.Info(path, forceShare);
        var list = new List<(string, long, string)>();
        if (!info.GetProperty("format-specific").GetProperty("data").TryGetProperty("bitmaps", out JsonElement bitmaps))
            return list;
        foreach (JsonElement b in bitmaps.EnumerateArray())
        {
            string flags = string.Join(",", b.GetProperty("flags").EnumerateArray().Select(f => f.GetString()!).Order(StringComparer.Ordinal));
            list.Add((b.GetProperty("name").GetString()!, b.GetProperty("granularity").GetInt64(), flags));
        }
        return list;
    }

    /// <summary>Runs of bits a bitmap of this granularity has after these writes.</summary>
    public static (long Start, long Count)[] ExpectedRuns(IEnumerable<(long Offset, long Length)> writes, long size, long granularity)
    {
        var bits = new HierarchicalBitmap((size + granularity - 1) / granularity);
        foreach ((long o, long l) in writes)
            bits.Set(o / granularity, ((o + l - 1) / granularity) - (o / granularity) + 1);
        return bits.Runs().ToArray();
    }

    /// <summary>The bitmaps extension (count, directory size, directory offset) and its place in the file, or null.</summary>
    public static (int At, uint Count, ulong DirectorySize, ulong DirectoryOffset)? Extension(byte[] file)
    {
        uint headerLength = BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(100));
        int pos = (int)headerLength;
        while (pos + 8 <= file.Length && pos < 65536)
        {
            uint type = BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(pos));
            uint length = BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(pos + 4));
            if (type == 0)
                return null;
            if (type == 0x23852875)
            {
                return (pos, BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(pos + 8)),
                    BinaryPrimitives.ReadUInt64BigEndian(file.AsSpan(pos + 16)), BinaryPrimitives.ReadUInt64BigEndian(file.AsSpan(pos + 24)));
            }
            pos += 8 + (int)((length + 7) & ~7u);
        }
        return null;
    }
}
