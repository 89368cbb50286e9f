using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Images written by <see cref="Qcow2Image"/>, judged by qemu-img: <c>check</c> finds no errors and no leaks,
/// <c>compare</c> finds the same bytes as a raw image given the same writes, and <c>map</c> agrees with our map.
/// </summary>
public sealed class Qcow2WriteTests
{
    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    /// <summary>One write or write-zeroes, applied to the qcow2 image and to its raw mirror alike.</summary>
    private readonly record struct Op(long Offset, int Length, bool Zero, int Seed)
    {
        public void Apply(IBlockImage image)
        {
            if (Zero)
                image.WriteZeroes(Offset, Length);
            else
                image.Write(Offset, Pattern(Length, Seed));
        }
    }

    private static List<Op> OpsFor(long size, int clusterSize)
    {
        long cs = clusterSize;
        var ops = new List<Op>
        {
            new(0, 100, false, 1), // start of the first cluster
            new(cs - 10, 20, false, 2), // across a boundary
            new(3 * cs, clusterSize, false, 3), // a whole cluster
            new(3 * cs + 7, 11, false, 4), // in place, inside it
            new((5 * cs) + 512, (int)Math.Min(3 * cs, 300_000), false, 5),
            new(size - 700, 700, false, 6), // the end
            new(3 * cs, clusterSize, true, 0), // whole-cluster zero over data: zero flag, cluster freed
            new((5 * cs) + 1000, 100, true, 0), // partial zero inside data
            new(8 * cs, 2 * clusterSize, true, 0), // zeroes over nothing
            new(8 * cs + 5, 10, false, 7), // write into a zero cluster
            new(size / 2, 65536 + 3, false, 8),
            new(size / 2 + 100, 1000, true, 0),
        };
        return ops.Where(o => o.Offset >= 0 && o.Offset + o.Length <= size).ToList();
    }

    [Theory]
    [InlineData(512, 1 * MiB)]
    [InlineData(4096, 3 * MiB + 512)]
    [InlineData(65536, 4 * MiB)]
    [InlineData(65536, 64L * 1024 * MiB)] // a large virtual size, a few clusters used
    [InlineData(2 * MiB, 9 * MiB)]
    public void Create_FreshImage_IsCleanAndReadsZeros(int clusterSize, long size)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("new.qcow2");
        Qcow2Image.Create(img, size, clusterSize);
        QemuImg.AssertClean(img);
        System.Text.Json.JsonElement info = QemuImg.Info(img);
        Assert.Equal(size, info.GetProperty("virtual-size").GetInt64());
        Assert.Equal(clusterSize, info.GetProperty("cluster-size").GetInt32());
        System.Text.Json.JsonElement specific = info.GetProperty("format-specific").GetProperty("data");
        Assert.Equal("1.1", specific.GetProperty("compat").GetString());
        Assert.Equal(16, specific.GetProperty("refcount-bits").GetInt32());
        Assert.False(specific.GetProperty("extended-l2").GetBoolean());
        using var image = Qcow2Image.Open(img, readOnly: true);
        Assert.Equal([new AllocationExtent(0, size, AllocationState.Unallocated)], AllocationOf(image));
        var buffer = new byte[Math.Min(size, 2 * MiB)];
        image.Read(size - buffer.Length, buffer);
        Assert.DoesNotContain(buffer, b => b != 0);
    }

    [Fact]
    public void Create_RefusesBadArguments()
    {
        using var dir = new TempDirectory();
        Assert.Equal(ErrorIds.InvalidImageSize, ErrorId(() => Qcow2Image.Create(dir.File("a"), 0)));
        Assert.Equal(ErrorIds.InvalidImageSize, ErrorId(() => Qcow2Image.Create(dir.File("a"), 1000)));
        Assert.Equal(ErrorIds.InvalidImageSize, ErrorId(() => Qcow2Image.Create(dir.File("a"), 1L << 50, 512)));
        Assert.Equal(ErrorIds.InvalidClusterSize, ErrorId(() => Qcow2Image.Create(dir.File("a"), MiB, 256)));
        Assert.Equal(ErrorIds.InvalidClusterSize, ErrorId(() => Qcow2Image.Create(dir.File("a"), MiB, 4 * MiB)));
        Assert.Equal(ErrorIds.InvalidClusterSize, ErrorId(() => Qcow2Image.Create(dir.File("a"), MiB, 3000)));
        Assert.Equal(ErrorIds.BackingFileNameTooLong, ErrorId(() => Qcow2Image.Create(dir.File("a"), MiB, 512, new string('x', 400), ImageFormat.Raw)));
        Assert.Equal(ErrorIds.BackingFileNameTooLong, ErrorId(() => Qcow2Image.Create(dir.File("a"), MiB, 65536, new string('x', 1024))));
        Assert.False(File.Exists(dir.File("a")));
        Qcow2Image.Create(dir.File("b"), MiB);
        Assert.Equal(ErrorIds.ImageAlreadyExists, ErrorId(() => Qcow2Image.Create(dir.File("b"), MiB)));
        Assert.Equal(ErrorIds.ImageNotFound, ErrorId(() => Qcow2Image.Create(dir.File("no/such/folder/c"), MiB)));
    }

    [Theory]
    [InlineData(512, 2 * MiB)]
    [InlineData(4096, 3 * MiB + 512)]
    [InlineData(65536, 4 * MiB)]
    [InlineData(2 * MiB, 7 * MiB + 512)]
    public void Writes_MatchARawMirror_AndPassQemuCheck(int clusterSize, long size)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("w.qcow2");
        string raw = dir.File("w.raw");
        Qcow2Image.Create(img, size, clusterSize);
        RawImage.Create(raw, size);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            foreach (Op op in OpsFor(size, clusterSize))
            {
                op.Apply(image);
                op.Apply(mirror);
            }
            AssertBytesEqual(ReadAll(mirror), ReadAll(image), "before reopening");
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, raw);
        AssertMapMatchesQemu(img);
        using (var image = Qcow2Image.Open(img, readOnly: true))
        {
            AssertBytesEqual(File.ReadAllBytes(raw), ReadAll(image), "after reopening");
            IReadOnlyList<AllocationExtent> map = AllocationOf(image);
            if (4L * clusterSize <= size)
                Assert.Contains(map, e => e.State == AllocationState.Zero && e.Offset <= 3L * clusterSize && e.End >= 4L * clusterSize);
        }
    }

    [Theory]
    [InlineData("qcow2", 65536, 4096)]
    [InlineData("qcow2", 4096, 65536)]
    [InlineData("raw", 0, 512)]
    [InlineData("raw", 0, 65536)]
    public void Overlay_CopiesOnWriteFromTheBacking_AndPassesQemuCheck(string baseFormat, int baseCluster, int overlayCluster)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("base." + baseFormat);
        long baseSize = 3 * MiB;
        long size = 4 * MiB; // larger than the backing: the tail reads zeros
        if (baseFormat == "qcow2")
        {
            QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={baseCluster}", baseImg, baseSize.ToString());
            QemuImg.IoOk(baseImg, "write -P 0xb1 0 1M", "write -P 0xb2 1500000 800000", "write -z 65536 65536");
        }
        else
        {
            File.WriteAllBytes(baseImg, Pattern((int)baseSize, 42));
        }
        string raw = dir.File("mirror.raw");
        QemuImg.RunOk("convert", "-O", "raw", baseImg, raw);
        using (var fs = File.OpenWrite(raw))
            fs.SetLength(size);

        string img = dir.File("top.qcow2");
        Qcow2Image.Create(img, size, overlayCluster, "base." + baseFormat, baseFormat == "raw" ? ImageFormat.Raw : ImageFormat.Qcow2);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            Assert.Equal("base." + baseFormat, image.BackingFile);
            Assert.NotNull(image.BackingImage);
            AssertBytesEqual(ReadAll(mirror), ReadAll(image), "fresh overlay");
            foreach (Op op in OpsFor(size, overlayCluster).Append(new Op(baseSize - 100, 300, false, 9)).Append(new Op(baseSize - 5000, 4000, true, 0)))
            {
                op.Apply(image);
                op.Apply(mirror);
            }
            AssertBytesEqual(ReadAll(mirror), ReadAll(image), "after writes");
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, raw);
        AssertMapMatchesQemu(img);
        System.Text.Json.JsonElement info = QemuImg.Info(img);
        Assert.Equal("base." + baseFormat, info.GetProperty("backing-filename").GetString());
        Assert.Equal(baseFormat, info.GetProperty("backing-filename-format").GetString());
    }

    /// <summary>compat, cluster size, refcount bits: writes into images qemu-img made, with every refcount width.</summary>
    public static TheoryData<string, int, int> QemuLayouts => new()
    {
        { "0.10", 65536, 16 },
        { "0.10", 512, 16 },
        { "1.1", 512, 1 },
        { "1.1", 1024, 2 },
        { "1.1", 4096, 4 },
        { "1.1", 512, 8 },
        { "1.1", 65536, 16 },
        { "1.1", 2048, 32 },
        { "1.1", 512, 64 }, // 64 clusters per refcount block: the refcount table must grow
        { "1.1", 2 * MiB, 64 },
    };

    [Theory]
    [MemberData(nameof(QemuLayouts))]
    public void WritesIntoQemuImages_KeepRefcountsExact(string compat, int clusterSize, int refcountBits)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("q.qcow2");
        long size = clusterSize >= MiB ? 9 * MiB : 3 * MiB;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"compat={compat},cluster_size={clusterSize},refcount_bits={refcountBits}", img, size.ToString());
        QemuImg.IoOk(img, "write -P 0x11 0 100000", $"write -P 0x12 {size - 300000} 200000");
        string raw = dir.File("q.raw");
        QemuImg.RunOk("convert", "-O", "raw", img, raw);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            Assert.Equal(refcountBits, image.RefcountBits);
            foreach (Op op in OpsFor(size, clusterSize).Append(new Op(MiB, 2 * MiB, false, 11)).Append(new Op(0, 50000, true, 0)))
            {
                op.Apply(image);
                op.Apply(mirror);
            }
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, raw);
        AssertMapMatchesQemu(img);
    }

    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    public void WritesIntoCompressedClusters_CopyThemOut(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string src = dir.File("src.raw");
        var data = new byte[2 * MiB];
        for (int i = 0; i < data.Length; i += 512)
            data.AsSpan(i, 512).Fill((byte)(i / 4096));
        File.WriteAllBytes(src, data);
        string img = dir.File("c.qcow2");
        QemuImg.RunOk("convert", "-c", "-O", "qcow2", "-o", $"cluster_size={clusterSize}", "-f", "raw", src, img);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(src, readOnly: false))
        {
            foreach (Op op in OpsFor(data.Length, clusterSize))
            {
                op.Apply(image);
                op.Apply(mirror);
            }
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, src);
        AssertMapMatchesQemu(img);
    }

    [Theory]
    [InlineData(512)]
    [InlineData(65536)]
    public void Resize_GrowsTheL1Table_AndShrinks(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("r.qcow2");
        string raw = dir.File("r.raw");
        Qcow2Image.Create(img, MiB, clusterSize);
        RawImage.Create(raw, MiB);
        long big = clusterSize == 512 ? 100L * MiB : 3L * 1024 * MiB; // 512-byte clusters: one L1 entry per 32 KiB
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            var head = new Op(1000, 5000, false, 1);
            head.Apply(image);
            head.Apply(mirror);
            image.Resize(big);
            mirror.Resize(big);
            var tail = new Op(big - 10000, 9000, false, 2);
            tail.Apply(image);
            tail.Apply(mirror);
            AssertBytesEqual(Pattern(5000, 1), ReadAllRange(image, 1000, 5000), "head after grow");
            AssertBytesEqual(Pattern(9000, 2), ReadAllRange(image, big - 10000, 9000), "tail after grow");
        }
        QemuImg.AssertClean(img);
        Assert.Equal(big, QemuImg.Info(img).GetProperty("virtual-size").GetInt64());
        QemuImg.AssertSameContents(img, raw);
        AssertMapMatchesQemu(img);

        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            image.WriteZeroes(big - 10000, 9000);
            image.Resize(2 * MiB + 512);
            Assert.Equal(2 * MiB + 512, image.Size);
            image.Resize(5 * MiB); // grows again: what was cut off reads zeros
            var back = new byte[5 * MiB];
            image.Read(0, back);
            var expected = new byte[5 * MiB];
            Pattern(5000, 1).CopyTo(expected, 1000);
            AssertBytesEqual(expected, back, "after shrink and grow");
        }
        QemuImg.AssertClean(img);
        Assert.Equal(5 * MiB, QemuImg.Info(img).GetProperty("virtual-size").GetInt64());
    }

    [Fact]
    public void GrowingAnOverlay_HidesTheLargerBacking()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("b.raw");
        File.WriteAllBytes(baseImg, Pattern(3 * MiB, 5));
        string img = dir.File("o.qcow2");
        Qcow2Image.Create(img, MiB + 512, 65536, "b.raw", ImageFormat.Raw);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            image.Resize(4 * MiB);
            byte[] all = ReadAll(image);
            AssertBytesEqual(Pattern(3 * MiB, 5).AsSpan(0, MiB + 512), all.AsSpan(0, MiB + 512), "kept part");
            Assert.DoesNotContain(all.AsSpan(MiB + 512).ToArray(), b => b != 0);
        }
        QemuImg.AssertClean(img);
        string expected = dir.File("e.raw");
        var bytes = new byte[4 * MiB];
        Pattern(3 * MiB, 5).AsSpan(0, MiB + 512).CopyTo(bytes);
        File.WriteAllBytes(expected, bytes);
        QemuImg.AssertSameContents(img, expected);
    }

    [Fact]
    public void ManySmallClusters_GrowTheRefcountTable()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("g.qcow2");
        string raw = dir.File("g.raw");
        long size = 12 * MiB; // 24576 clusters of 512 bytes; one refcount table cluster covers 16384
        Qcow2Image.Create(img, size, 512);
        RawImage.Create(raw, size);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            byte[] chunk = Pattern(MiB, 3);
            for (long pos = 0; pos < size; pos += MiB)
            {
                image.Write(pos, chunk);
                mirror.Write(pos, chunk);
            }
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, raw);
    }

    [Theory]
    [InlineData(512, 1, 1)]
    [InlineData(512, 1, 64)]
    [InlineData(4096, 2, 1)]
    [InlineData(4096, 1, 16)]
    public void TinyCaches_EvictInOrder_AndUnflushedCopiesAreNeverCorrupt(int clusterSize, int l2Tables, int refcountBlocks)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("t.qcow2");
        string raw = dir.File("t.raw");
        long size = 4 * MiB;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize},refcount_bits=64", img, size.ToString());
        RawImage.Create(raw, size);
        var rng = new Random(clusterSize + l2Tables + refcountBlocks);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            image.LimitCaches(l2Tables, refcountBlocks);
            // Give every L2 table an on-disk L1 entry first, so later evictions rewrite tables the file already uses.
            for (long pos = 0; pos < size; pos += clusterSize * (long)(clusterSize / 8))
            {
                var seed = new Op(pos, 1, false, (int)(pos >> 9));
                seed.Apply(image);
                seed.Apply(mirror);
            }
            image.Flush();
            for (int i = 0; i < 300; i++)
            {
                var op = new Op(rng.NextInt64(size - 20000), rng.Next(1, 20000), rng.Next(4) == 0, i);
                op.Apply(image);
                op.Apply(mirror);
                if (i % 60 == 59)
                {
                    // A copy taken now is what a crash would leave: never corrupt, at worst leaked clusters.
                    string copy = dir.File($"crash{i}.qcow2");
                    CopyIgnoringLocks(img, copy);
                    QemuCheck check = QemuImg.Check(copy);
                    Assert.True(check.CheckErrors == 0 && check.Corruptions == 0, $"copy {i}: {check.Output}");
                    File.Delete(copy);
                }
            }
            AssertBytesEqual(ReadAll(mirror), ReadAll(image), "with tiny caches");
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, raw);
        AssertMapMatchesQemu(img);
    }

    [Fact]
    public void Version2Image_WriteZeroesDeallocatesOrWritesZeros()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("b.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "compat=0.10", baseImg, "2M");
        QemuImg.IoOk(baseImg, "write -P 0x21 0 2M");
        string top = dir.File("t.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "compat=0.10", "-b", "b.qcow2", "-F", "qcow2", top, "2M");
        using (var image = Qcow2Image.Open(baseImg, readOnly: false))
        {
            image.WriteZeroes(65536, 65536); // no backing: deallocated
            Assert.Equal(AllocationState.Unallocated, image.GetAllocation(65536, 65536).Single().State);
        }
        QemuImg.AssertClean(baseImg);
        using (var image = Qcow2Image.Open(top, readOnly: false))
        {
            image.WriteZeroes(0, 65536); // the backing shows through: zeros are written
            Assert.Equal(AllocationState.Data, image.GetAllocation(0, 65536).Single().State);
            var back = new byte[3 * 65536];
            image.Read(0, back);
            Assert.DoesNotContain(back.AsSpan(0, 2 * 65536).ToArray(), b => b != 0);
            Assert.DoesNotContain(back.AsSpan(2 * 65536).ToArray(), b => b != 0x21);
        }
        QemuImg.AssertClean(top);
        AssertMapMatchesQemu(top);
    }

    [Fact]
    public void FirstWrite_MarksPersistentBitmapsInUse()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("bm.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.RunOk("bitmap", "--add", img, "b0");
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            Assert.False(image.Bitmaps.Single().InUse);
            image.Write(0, new byte[512]);
            Assert.True(image.Bitmaps.Single().InUse);
        }
        QemuImg.AssertClean(img);
        string info = QemuImg.RunOk("info", img);
        Assert.Contains("in-use", info);
    }

    [Fact]
    public void ConcurrentWriters_OnDisjointRanges_LeaveAConsistentImage()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("c.qcow2");
        string raw = dir.File("c.raw");
        long size = 8 * MiB;
        Qcow2Image.Create(img, size, 4096);
        RawImage.Create(raw, size);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        using (var mirror = RawImage.Open(raw, readOnly: false))
        {
            image.LimitCaches(2, 2);
            Parallel.For(0, 8, new ParallelOptions { MaxDegreeOfParallelism = 4 }, t =>
            {
                var rng = new Random(t);
                long regionStart = t * (size / 8);
                for (int i = 0; i < 60; i++)
                {
                    var op = new Op(regionStart + rng.NextInt64((size / 8) - 20000), rng.Next(1, 20000), rng.Next(5) == 0, (t * 1000) + i);
                    op.Apply(image);
                    op.Apply(mirror);
                    if (i % 20 == 0)
                        image.Flush();
                    var back = new byte[op.Length];
                    image.Read(op.Offset, back);
                }
            });
            AssertBytesEqual(ReadAll(mirror), ReadAll(image), "after concurrent writes");
        }
        QemuImg.AssertClean(img);
        QemuImg.AssertSameContents(img, raw);
    }

    [Fact]
    public void ReadOnlyImage_RefusesWrites()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("ro.qcow2");
        Qcow2Image.Create(img, MiB);
        using var image = Qcow2Image.Open(img, readOnly: true);
        Assert.True(image.ReadOnly);
        Assert.Equal(ErrorIds.NodeReadOnly, ErrorId(() => image.Write(0, new byte[1])));
        Assert.Equal(ErrorIds.NodeReadOnly, ErrorId(() => image.WriteZeroes(0, 1)));
        Assert.Equal(ErrorIds.NodeReadOnly, ErrorId(() => image.Resize(2 * MiB)));
    }

    /// <summary>Copy a file held open (and flock-ed) by the driver, as a crash would leave it.</summary>
    private static void CopyIgnoringLocks(string source, string destination)
    {
        using var p = System.Diagnostics.Process.Start("cp", [source, destination])!;
        p.WaitForExit();
        Assert.Equal(0, p.ExitCode);
    }

    private static byte[] ReadAllRange(IBlockImage image, long offset, int length)
    {
        var buffer = new byte[length];
        image.Read(offset, buffer);
        return buffer;
    }
}
