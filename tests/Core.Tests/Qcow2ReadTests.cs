using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Images made by qemu-img and qemu-io, read back through <see cref="Qcow2Image"/> and compared with what
/// <c>qemu-img convert -O raw</c> makes of them, and our allocation map with <c>qemu-img map</c>.
/// </summary>
public sealed class Qcow2ReadTests
{
    /// <summary>compat, cluster size, refcount bits, virtual size.</summary>
    public static TheoryData<string, int, int, long> Layouts => new()
    {
        { "0.10", 65536, 16, 3 * MiB },
        { "0.10", 512, 16, 1 * MiB + 512 },
        { "0.10", 4096, 16, 3 * MiB + 4096 + 512 },
        { "1.1", 512, 1, 1 * MiB + 512 },
        { "1.1", 1024, 2, 2 * MiB },
        { "1.1", 2048, 4, 2 * MiB + 1536 },
        { "1.1", 4096, 8, 3 * MiB },
        { "1.1", 65536, 16, 3 * MiB + 512 },
        { "1.1", 32768, 32, 3 * MiB },
        { "1.1", 512, 64, 1 * MiB },
        { "1.1", 131072, 64, 4 * MiB },
        { "1.1", 2 * MiB, 16, 7 * MiB + 512 },
        { "1.1", 1 * MiB, 1, 5 * MiB },
    };

    [Theory]
    [MemberData(nameof(Layouts))]
    public void QemuWrittenImage_ReadsLikeQemuConvert(string compat, int clusterSize, int refcountBits, long size)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("q.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"compat={compat},cluster_size={clusterSize},refcount_bits={refcountBits}", img, size.ToString());
        var commands = new List<string>
        {
            "write -P 0x11 0 4096",
            $"write -P 0x22 {clusterSize - 512} 1024", // across a cluster boundary
            $"write -P 0x33 {size / 2} 70000",
            $"write -P 0x44 {size - 512} 512", // the last sector
        };
        if (compat == "1.1")
        {
            bool roomy = size >= clusterSize * 9L;
            commands.Add($"write -z {clusterSize * (roomy ? 4L : 1L)} {clusterSize * (roomy ? 2L : 1L)}");
            long reused = clusterSize * (roomy ? 8L : 2L);
            commands.Add($"write -P 0x55 {reused} {clusterSize}");
            commands.Add($"write -z {reused} {clusterSize}"); // a zero cluster that had data
        }
        QemuImg.IoOk(img, [.. commands]);
        byte[] expected = QemuImg.ReadAllAsRaw(img, dir.File("q.raw"));

        using (var image = Qcow2Image.Open(img, readOnly: true))
        {
            Assert.Equal(size, image.Size);
            Assert.Equal(clusterSize, image.ClusterSize);
            Assert.Equal(compat == "0.10" ? 2 : 3, image.Version);
            Assert.Equal(refcountBits, image.RefcountBits);
            AssertBytesEqual(expected, ReadAll(image), "whole image");
            AssertBytesEqual(expected, ReadAll(image, chunk: 3 * 1000), "image read in odd pieces");
        }
        AssertMapMatchesQemu(img);
    }

    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * MiB)]
    public void CompressedImage_ReadsLikeQemuConvert(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string raw = dir.File("src.raw");
        var data = new byte[3 * MiB + 4096];
        var rng = new Random(clusterSize);
        for (int i = 0; i < data.Length; i += 4096)
        {
            if (rng.Next(3) == 0)
                continue; // leave holes
            byte b = (byte)rng.Next(1, 4);
            data.AsSpan(i, 4096).Fill(b); // compressible
            if (rng.Next(4) == 0)
                rng.NextBytes(data.AsSpan(i, 700)); // and some incompressible bytes
        }
        File.WriteAllBytes(raw, data);
        string img = dir.File("c.qcow2");
        QemuImg.RunOk("convert", "-c", "-O", "qcow2", "-o", $"cluster_size={clusterSize}", "-f", "raw", raw, img);

        using var image = Qcow2Image.Open(img, readOnly: true);
        AssertBytesEqual(data, ReadAll(image), "compressed image");
        AssertBytesEqual(data, ReadAll(image, chunk: 5000), "compressed image in odd pieces");
        Assert.Contains(image.GetAllocation(0, image.Size), e => e.State == AllocationState.Data);
    }

    [Theory]
    [InlineData(512, 300L * MiB)] // the L1 table must grow (qemu-img moves it)
    [InlineData(65536, 2L * 1024 * MiB)]
    public void QemuResizedImage_ReadsBack(int clusterSize, long grownSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("r.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", img, "1M");
        QemuImg.IoOk(img, "write -P 0x61 1000 3000", $"write -P 0x62 {MiB - 4096} 4096");
        QemuImg.RunOk("resize", img, grownSize.ToString());
        QemuImg.IoOk(img, $"write -P 0x63 {grownSize - 8192} 8192");

        using (var image = Qcow2Image.Open(img, readOnly: true))
        {
            Assert.Equal(grownSize, image.Size);
            var head = new byte[MiB];
            image.Read(0, head);
            var tail = new byte[16384];
            image.Read(grownSize - tail.Length, tail);
            var expectedHead = new byte[MiB];
            expectedHead.AsSpan(1000, 3000).Fill(0x61);
            expectedHead.AsSpan(MiB - 4096).Fill(0x62);
            var expectedTail = new byte[16384];
            expectedTail.AsSpan(8192).Fill(0x63);
            AssertBytesEqual(expectedHead, head, "head");
            AssertBytesEqual(expectedTail, tail, "tail");
        }
        AssertMapMatchesQemu(img);

        QemuImg.RunOk("resize", "--shrink", img, "512K");
        using (var image = Qcow2Image.Open(img, readOnly: true))
        {
            Assert.Equal(512 * KiB, image.Size);
            var head = new byte[512 * KiB];
            image.Read(0, head);
            var expected = new byte[512 * KiB];
            expected.AsSpan(1000, 3000).Fill(0x61);
            AssertBytesEqual(expected, head, "after shrink");
        }
    }

    [Fact]
    public void QemuMadeChain_ReadsThroughEveryLayer()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string raw = dir.File("base.raw");
        File.WriteAllBytes(raw, Pattern(2 * MiB, 1)); // raw base, smaller than the overlays
        string mid = dir.File("mid.qcow2");
        string top = dir.File("top.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "3M");
        QemuImg.IoOk(mid, "write -P 0x71 65536 100000", "write -z 300000 200000");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", mid, "-F", "qcow2", top, "4M");
        QemuImg.IoOk(top, "write -P 0x72 90000 5000", "write -z 1000000 70000", "write -P 0x73 3500000 100");
        byte[] expected = QemuImg.ReadAllAsRaw(top, dir.File("top.raw"));

        using (var image = Qcow2Image.Open(top, readOnly: true))
        {
            AssertBytesEqual(expected, ReadAll(image), "chain");
            Assert.Equal(mid, image.BackingFile);
            Assert.Equal(ImageFormat.Qcow2, image.BackingFormat);
            Assert.Equal(
                [new BackingChainEntry(mid, ImageFormat.Qcow2, 3 * MiB), new BackingChainEntry(raw, ImageFormat.Raw, 2 * MiB)],
                image.BackingChain);
            Assert.IsType<Qcow2Image>(image.BackingImage);
        }
        AssertMapMatchesQemu(top);
        AssertMapMatchesQemu(mid);
    }

    [Fact]
    public void Info_MatchesQemuImgInfo()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("b.qcow2");
        string img = dir.File("i.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", baseImg, "1M");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=16384,refcount_bits=8,lazy_refcounts=on", "-b", "b.qcow2", "-F", "qcow2", img, "2M");
        System.Text.Json.JsonElement info = QemuImg.Info(img);
        using var image = Qcow2Image.Open(img, readOnly: true);
        Assert.Equal(info.GetProperty("virtual-size").GetInt64(), image.VirtualSize);
        Assert.Equal(info.GetProperty("cluster-size").GetInt32(), image.ClusterSize);
        Assert.Equal(info.GetProperty("backing-filename").GetString(), image.BackingFile);
        Assert.Equal(info.GetProperty("backing-filename-format").GetString(), image.BackingFormatName);
        Assert.Equal(info.GetProperty("dirty-flag").GetBoolean(), image.IsDirty);
        System.Text.Json.JsonElement specific = info.GetProperty("format-specific").GetProperty("data");
        Assert.Equal(specific.GetProperty("refcount-bits").GetInt32(), image.RefcountBits);
        Assert.Equal(specific.GetProperty("lazy-refcounts").GetBoolean(), image.LazyRefcounts);
        Assert.Equal(specific.GetProperty("corrupt").GetBoolean(), image.IsCorrupt);
        Assert.Equal("1.1", specific.GetProperty("compat").GetString());
        Assert.Equal(Qcow2CompressionType.Deflate, image.CompressionType);
        Assert.Equal(ImageFormat.Qcow2, ImageProbe.Detect(img));
        Assert.Empty(image.Bitmaps);
    }

    [Fact]
    public void BitmapDirectory_ListsQemuBitmaps()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("bm.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "8M");
        QemuImg.RunOk("bitmap", "--add", "-g", "128K", img, "daily");
        QemuImg.RunOk("bitmap", "--add", "-g", "64K", "--disable", img, "weekly-with-a-longer-name");
        using var image = Qcow2Image.Open(img, readOnly: true);
        Assert.Equal(Qcow2AutoclearFeatures.Bitmaps, image.AutoclearFeatures);
        Assert.Collection(image.Bitmaps,
            b =>
            {
                Assert.Equal("daily", b.Name);
                Assert.Equal(128 * KiB, b.Granularity);
                Assert.True(b.Auto);
                Assert.False(b.InUse);
            },
            b =>
            {
                Assert.Equal("weekly-with-a-longer-name", b.Name);
                Assert.Equal(64 * KiB, b.Granularity);
                Assert.False(b.Auto);
            });
    }

    [Fact]
    public void InternalSnapshots_ReadOnlyReadsTheActiveState_WritingIsRefused()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("s.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "1M");
        QemuImg.IoOk(img, "write -P 0x01 0 65536");
        QemuImg.RunOk("snapshot", "-c", "snap1", img);
        QemuImg.IoOk(img, "write -P 0x02 0 4096");
        using (var image = Qcow2Image.Open(img, readOnly: true))
        {
            Assert.Equal(1, image.SnapshotCount);
            var head = new byte[8192];
            image.Read(0, head);
            Assert.All(head.AsSpan(0, 4096).ToArray(), b => Assert.Equal(2, b));
            Assert.All(head.AsSpan(4096).ToArray(), b => Assert.Equal(1, b));
        }
        var e = Assert.Throws<BlockException>(() => Qcow2Image.Open(img, readOnly: false));
        Assert.Equal(ErrorIds.UnsupportedImageFeature, e.ErrorId);
        Assert.Contains("internal snapshots", e.Message);
    }

    [Fact]
    public void ImageProbe_TellsRawFromQcow2()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string q = dir.File("p.qcow2");
        string r = dir.File("p.raw");
        QemuImg.RunOk("create", "-f", "qcow2", q, "1M");
        File.WriteAllBytes(r, new byte[4096]);
        Assert.Equal(ImageFormat.Qcow2, ImageProbe.Detect(q));
        Assert.Equal(ImageFormat.Raw, ImageProbe.Detect(r));
        using (var writer = Qcow2Image.Open(q, readOnly: false))
        {
            Assert.Equal(ImageFormat.Qcow2, ImageProbe.Detect(q)); // probing takes no lock: it never conflicts
            Assert.Equal(ErrorIds.ImageInUse, Assert.Throws<BlockException>(() => ImageProbe.Open(q, readOnly: true)).ErrorId); // the writer's locks
        }
        using IBlockImage qi = ImageProbe.Open(q, readOnly: true);
        using IBlockImage ri = ImageProbe.Open(r, readOnly: true);
        Assert.IsType<Qcow2Image>(qi);
        Assert.Equal(ImageFormat.Raw, ri.Format);
        Assert.False(Qcow2Image.IsQcow2(new byte[] { 0x51, 0x46, 0x49 }));
        Assert.True(Qcow2Image.IsQcow2(new byte[] { 0x51, 0x46, 0x49, 0xFB, 0 }));
    }
}
