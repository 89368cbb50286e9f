using System.Buffers.Binary;
using System.Text.Json;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// <see cref="Qcow2Checker"/> against <c>qemu-img check --output=json</c> as the oracle: images made by qemu-img and
/// qemu-io (versions 2 and 3, every refcount width, cluster sizes 512 B to 2 MiB, compressed, bitmaps, internal
/// snapshots, extended L2) and by our own <see cref="Qcow2Image"/> must get the same numbers; images damaged on purpose
/// (bumped or zeroed refcounts, L2 entries past the end of the file, misaligned or pointing at metadata) must get the
/// same counts of leaks and corruptions; mutated images must never make the checker throw anything but
/// <see cref="BlockException"/>, hang, or allocate beyond a bound set by the file size.
/// </summary>
public sealed class Qcow2CheckerTests
{
    #region qemu-made images

    public static TheoryData<string> QemuKinds => new()
    {
        "empty", "v2-64k", "v2-512", "v3-512-rc1", "v3-1k-rc2", "v3-2k-rc4", "v3-4k-rc8", "v3-64k-rc16", "v3-32k-rc32",
        "v3-512-rc64", "v3-2m-rc16", "v3-1m-rc1", "rc64-512-table-grows", "compressed-64k", "compressed-512", "compressed-2m",
        "compressed-v2-4k", "compressed-then-rewritten", "bitmaps", "bitmaps-512", "snapshots", "snapshots-deleted",
        "snapshots-v2", "snapshots-rc2", "extended-l2", "prealloc-metadata", "overlay", "discarded", "lazy-refcounts", "zero-alloc",
    };

    [Theory]
    [MemberData(nameof(QemuKinds))]
    public void QemuMadeImage_IsCleanAndAgreesWithQemuCheck(string kind)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = MakeQemuImage(kind, dir);
        QemuCheckResult qemu = QemuCheck(path);
        Assert.True(qemu.ExitCode == 0, $"qemu-img check does not find {kind} clean: {qemu.Output}");
        Qcow2CheckReport ours = AssertAgrees(path);
        Assert.True(ours.IsClean, ours.ToString());
        Assert.Empty(ours.Corruptions);
        Assert.Empty(ours.LeakedOffsets);
        if (kind.StartsWith("compressed", StringComparison.Ordinal))
            Assert.True(ours.CompressedClusters > 0);
    }

    private static string MakeQemuImage(string kind, TempDirectory dir)
    {
        string img = dir.File(kind + ".qcow2");
        switch (kind)
        {
            case "empty":
                QemuImg.RunOk("create", "-f", "qcow2", img, "10M");
                break;
            case "v2-64k":
                Layout(img, "0.10", 65536, 16, 4 * MiB);
                break;
            case "v2-512":
                Layout(img, "0.10", 512, 16, MiB + 512);
                break;
            case "v3-512-rc1":
                Layout(img, "1.1", 512, 1, MiB + 512);
                break;
            case "v3-1k-rc2":
                Layout(img, "1.1", 1024, 2, 2 * MiB);
                break;
            case "v3-2k-rc4":
                Layout(img, "1.1", 2048, 4, 2 * MiB + 1536);
                break;
            case "v3-4k-rc8":
                Layout(img, "1.1", 4096, 8, 3 * MiB);
                break;
            case "v3-64k-rc16":
                Layout(img, "1.1", 65536, 16, 3 * MiB + 512);
                break;
            case "v3-32k-rc32":
                Layout(img, "1.1", 32768, 32, 3 * MiB);
                break;
            case "v3-512-rc64":
                Layout(img, "1.1", 512, 64, MiB);
                break;
            case "v3-2m-rc16":
                Layout(img, "1.1", 2 * MiB, 16, 7 * MiB + 512);
                break;
            case "v3-1m-rc1":
                Layout(img, "1.1", MiB, 1, 5 * MiB);
                break;
            case "rc64-512-table-grows":
                // 64-bit refcounts and 512-byte clusters: one refcount block covers 32 KiB, one table cluster 2 MiB,
                // so 3 MiB of data makes qemu grow the refcount table.
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "8M");
                QemuImg.IoOk(img, "write -P 0x61 0 1M", "write -P 0x62 3M 1M", "write -P 0x63 6M 1M");
                break;
            case "compressed-64k":
                Compressed(dir, img, "1.1", 65536, 2 * MiB);
                break;
            case "compressed-512":
                Compressed(dir, img, "1.1", 512, 256 * KiB);
                break;
            case "compressed-2m":
                Compressed(dir, img, "1.1", 2 * MiB, 8 * MiB);
                break;
            case "compressed-v2-4k":
                Compressed(dir, img, "0.10", 4096, MiB);
                break;
            case "compressed-then-rewritten":
                Compressed(dir, img, "1.1", 4096, MiB);
                QemuImg.IoOk(img, "write -P 0x71 0 8192", "write -P 0x72 100000 5000", "write -z 500000 4096", "discard 700000 8192");
                break;
            case "bitmaps":
                QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
                QemuImg.RunOk("bitmap", "--add", img, "b0");
                QemuImg.IoOk(img, "write -P 0x11 0 100000", "write -P 0x12 2M 70000");
                QemuImg.RunOk("bitmap", "--add", "-g", "4096", img, "b1");
                QemuImg.IoOk(img, "write -P 0x13 3M 4096");
                QemuImg.RunOk("bitmap", "--add", "--disable", img, "b2");
                break;
            case "bitmaps-512":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=512", img, "8M");
                QemuImg.RunOk("bitmap", "--add", "-g", "512", img, "fine");
                QemuImg.IoOk(img, "write -P 0x21 0 3000", "write -P 0x22 5M 100000");
                QemuImg.RunOk("bitmap", "--add", "-g", "65536", img, "coarse");
                break;
            case "snapshots":
            case "snapshots-deleted":
                QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
                QemuImg.IoOk(img, "write -P 0x31 0 300000");
                QemuImg.RunOk("snapshot", "-c", "s1", img);
                QemuImg.IoOk(img, "write -P 0x32 65536 4096", "write -P 0x33 2M 100000");
                QemuImg.RunOk("snapshot", "-c", "s2", img);
                QemuImg.IoOk(img, "write -P 0x34 0 4096", "write -z 131072 65536");
                if (kind == "snapshots-deleted")
                    QemuImg.RunOk("snapshot", "-d", "s1", img);
                break;
            case "snapshots-v2":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", img, "1M");
                QemuImg.IoOk(img, "write -P 0x41 0 40000");
                QemuImg.RunOk("snapshot", "-c", "s1", img);
                QemuImg.IoOk(img, "write -P 0x42 8192 4096");
                break;
            case "snapshots-rc2":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=1024,refcount_bits=2", img, "1M");
                QemuImg.IoOk(img, "write -P 0x51 0 20000");
                QemuImg.RunOk("snapshot", "-c", "s1", img);
                QemuImg.RunOk("snapshot", "-c", "s2", img);
                QemuImg.IoOk(img, "write -P 0x52 4096 1024");
                break;
            case "extended-l2":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", img, "4M");
                QemuImg.IoOk(img, "write -P 0x61 0 2048", "write -P 0x62 70000 10000", "write -z 1M 131072", "write -P 0x63 3M 65536");
                break;
            case "prealloc-metadata":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=16384", img, "4M");
                QemuImg.IoOk(img, "write -P 0x71 0 50000");
                break;
            case "overlay":
                string backing = dir.File("backing.qcow2");
                QemuImg.RunOk("create", "-f", "qcow2", backing, "2M");
                QemuImg.IoOk(backing, "write -P 0x01 0 2M");
                QemuImg.RunOk("create", "-f", "qcow2", "-b", "backing.qcow2", "-F", "qcow2", "-o", "cluster_size=4096", img, "2M");
                QemuImg.IoOk(img, "write -P 0x02 1000 9000", "write -z 65536 8192");
                break;
            case "discarded":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "2M");
                QemuImg.IoOk(img, "write -P 0x03 0 1M", "discard 128K 512K", "write -P 0x04 1536K 8192");
                break;
            case "lazy-refcounts":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=8192", img, "2M");
                QemuImg.IoOk(img, "write -P 0x05 0 100000", "write -P 0x06 1M 8192");
                break;
            case "zero-alloc":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "1M");
                QemuImg.IoOk(img, "write -P 0x07 0 65536", "write -z 8192 16384", "write -z -u 40960 8192");
                break;
            default:
                throw new ArgumentException(kind);
        }
        return img;
    }

    private static void Layout(string img, string compat, int clusterSize, int refcountBits, long size)
    {
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"compat={compat},cluster_size={clusterSize},refcount_bits={refcountBits}", img, size.ToString());
        var commands = new List<string>
        {
            "write -P 0x11 0 4096",
            $"write -P 0x22 {clusterSize - 512} 1024",
            $"write -P 0x33 {size / 2} 70000",
            $"write -P 0x44 {size - 512} 512",
        };
        if (compat == "1.1")
        {
            bool roomy = size >= clusterSize * 9L;
            commands.Add($"write -z {clusterSize * (roomy ? 4L : 1L)} {clusterSize * (roomy ? 2L : 1L)}");
            long reused = clusterSize * (roomy ? 8L : 2L);
            commands.Add($"write -P 0x55 {reused} {clusterSize}");
            commands.Add($"write -z {reused} {clusterSize}");
        }
        QemuImg.IoOk(img, [.. commands]);
    }

    private static void Compressed(TempDirectory dir, string img, string compat, int clusterSize, int size)
    {
        string raw = dir.File("src.raw");
        var data = new byte[size];
        var random = new Random(clusterSize);
        for (int i = 0; i < size; i += 4096)
        {
            switch ((i / 4096) % 4)
            {
                case 0:
                    data.AsSpan(i, 4096).Fill((byte)(i >> 12));
                    break;
                case 1:
                    random.NextBytes(data.AsSpan(i, 4096)); // incompressible: qemu stores such clusters uncompressed
                    break;
                case 2:
                    for (int j = 0; j < 4096; j++)
                        data[i + j] = (byte)(j % 7 == 0 ? random.Next(256) : j);
                    break;
            }
        }
        File.WriteAllBytes(raw, data);
        QemuImg.RunOk("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", $"compat={compat},cluster_size={clusterSize}", raw, img);
    }

    #endregion

    #region Our own images

    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * MiB)]
    public void ImageWrittenByQcow2Image_IsClean(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("ours.qcow2");
        long size = Math.Max(4L * MiB, 4L * clusterSize);
        Qcow2Image.Create(img, size, clusterSize);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            var random = new Random(clusterSize);
            for (int i = 0; i < 40; i++)
            {
                long offset = random.NextInt64(size - 70000);
                image.Write(offset, Pattern(random.Next(1, 70000), i));
                if (i % 5 == 0)
                    image.WriteZeroes(random.NextInt64(size / clusterSize) * clusterSize, clusterSize);
                if (i % 13 == 0)
                    image.Flush();
            }
            image.Resize(size * 3);
            image.Write(size * 2, Pattern(100000, 99));
        }
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.True(ours.IsClean, ours.ToString());
        Assert.True(ours.AllocatedClusters > 0);
    }

    [Fact]
    public void ImageOpenReadOnlyByTheEngine_CanBeChecked_ImageOpenForWriting_IsReportedLocked()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("locked.qcow2");
        Qcow2Image.Create(img, MiB, 4096);
        using (var reader = Qcow2Image.Open(img, readOnly: true))
            Assert.True(Qcow2Checker.Check(img).IsClean);

        using (var writer = Qcow2Image.Open(img, readOnly: false))
        {
            writer.Write(0, Pattern(5000, 1));
            Qcow2CheckReport locked = Qcow2Checker.Check(img);
            Assert.False(locked.IsClean);
            Assert.False(locked.IsComplete);
            Assert.Equal(1, locked.CheckErrorCount);
            Assert.Contains("locked by a writer", locked.CheckErrors[0]);
            Assert.Equal(0, locked.CorruptionCount);
        }
        Qcow2CheckReport after = Qcow2Checker.Check(img);
        Assert.True(after.IsClean, after.ToString());
        Assert.Equal(2, after.AllocatedClusters);
    }

    [Fact]
    public void UnreadableFiles_ThrowBlockException()
    {
        using var dir = new TempDirectory();
        Assert.Equal(ErrorIds.ImageNotFound, Assert.Throws<BlockException>(() => Qcow2Checker.Check(dir.File("missing.qcow2"))).ErrorId);
        Assert.Equal(ErrorIds.ImageIsFolder, Assert.Throws<BlockException>(() => Qcow2Checker.Check(dir.Path)).ErrorId);
        string raw = dir.File("disk.raw");
        File.WriteAllBytes(raw, new byte[4096]);
        Assert.Equal(ErrorIds.UnsupportedFormat, Assert.Throws<BlockException>(() => Qcow2Checker.Check(raw)).ErrorId);
        string shortFile = dir.File("short.qcow2");
        File.WriteAllBytes(shortFile, [0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 3]);
        Assert.Equal(ErrorIds.ImageCorrupt, Assert.Throws<BlockException>(() => Qcow2Checker.Check(shortFile)).ErrorId);
        string badClusters = dir.File("bad.qcow2");
        Qcow2Image.Create(badClusters, MiB, 4096);
        Patch(badClusters, 20, 4, 30); // cluster_bits 30
        Assert.Equal(ErrorIds.UnsupportedImageFeature, Assert.Throws<BlockException>(() => Qcow2Checker.Check(badClusters)).ErrorId);
    }

    #endregion

    #region Damaged on purpose

    [Fact]
    public void UnusedClusterWithARefcount_IsOneLeak()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("leak.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.IoOk(img, "write -P 1 0 200000");
        long leaked, leakedOffset;
        using (var raw = new RawQcow2(img))
        {
            leaked = raw.Length >> raw.ClusterBits;
            leakedOffset = leaked << raw.ClusterBits;
            raw.Extend(raw.Length + raw.ClusterSize);
            raw.SetRefcount(leaked, 1);
        }
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.Equal(1, ours.Leaks);
        Assert.Equal(0, ours.CorruptionCount);
        Assert.Equal([leakedOffset], ours.LeakedOffsets);
        Assert.False(ours.IsClean);
    }

    [Fact]
    public void BumpedRefcountOfADataCluster_IsALeakAndACopiedFlagError()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("bumped.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=4", img, "1M");
        QemuImg.IoOk(img, "write -P 1 0 20000");
        using (var raw = new RawQcow2(img))
        {
            long data = raw.DataOffset(0, 2) >> raw.ClusterBits;
            raw.SetRefcount(data, raw.Refcount(data) + 1);
        }
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.Equal(1, ours.Leaks);
        Assert.Equal(1, ours.CorruptionCount);
        Assert.Contains("OFLAG_COPIED data cluster", ours.Corruptions[0]);
    }

    [Fact]
    public void ZeroRefcountOfAnL2Table_IsReportedTwice()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("l2.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.IoOk(img, "write -P 1 0 200000");
        using (var raw = new RawQcow2(img))
            raw.SetRefcount(raw.L2Offset(0) >> raw.ClusterBits, 0);
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.Equal(2, ours.CorruptionCount); // refcount 0 < 1 reference, and the L1 entry's COPIED flag
        Assert.Contains(ours.Corruptions, m => m.Contains("has refcount 0 but 1 references (all by an active L2 table)", StringComparison.Ordinal));
        Assert.Contains(ours.Corruptions, m => m.Contains("OFLAG_COPIED L2 cluster", StringComparison.Ordinal));
    }

    [Fact]
    public void L2EntryPastTheEndOfTheFile_IsACorruption()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("eof.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.IoOk(img, "write -P 1 0 200000");
        using (var raw = new RawQcow2(img))
            raw.SetU64(raw.L2Offset(0) + (1 * 8), Qcow2L2Entry.CopiedFlag | (1UL << 30));
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.Equal(2, ours.CorruptionCount); // past the end, and COPIED with refcount 0
        Assert.Equal(1, ours.Leaks); // the cluster the entry used to point at
        Assert.Contains(ours.Corruptions, m => m.Contains("past the end of the file", StringComparison.Ordinal));
    }

    [Fact]
    public void MisalignedL2Entry_IsACorruption()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("misaligned.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.IoOk(img, "write -P 1 0 200000");
        using (var raw = new RawQcow2(img))
        {
            long entry = raw.L2Offset(0) + 8;
            raw.SetU64(entry, raw.U64(entry) + 512);
        }
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.Equal(2, ours.CorruptionCount); // misaligned, and the cluster-sized reference spills into the next cluster
        Assert.Contains("not cluster aligned", ours.Corruptions[0]);
        Assert.Contains("has refcount 1 but 2 references", ours.Corruptions[1]);
    }

    [Fact]
    public void DataClusterOnTopOfTheL1Table_IsOverlappingMetadata()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("overlap.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M");
        QemuImg.IoOk(img, "write -P 1 0 20000");
        using (var raw = new RawQcow2(img))
            raw.SetU64(raw.L2Offset(0) + 8, Qcow2L2Entry.CopiedFlag | (ulong)raw.L1Offset);
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.Equal(1, ours.CorruptionCount);
        Assert.Equal(1, ours.Leaks);
        Assert.Contains("by the active L1 table and a data cluster); metadata overlaps", ours.Corruptions[0]);
    }

    [Fact]
    public void MissingRefcountBlock_MakesEveryClusterACorruption()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("noblock.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=1024,refcount_bits=64", img, "1M");
        QemuImg.IoOk(img, "write -P 1 0 300000");
        using (var raw = new RawQcow2(img))
            raw.SetU64(raw.RefTableOffset + 8, 0); // the block for clusters 128-255
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.True(ours.CorruptionCount > 100, ours.ToString());
    }

    [Fact]
    public void OneL2TableInEveryL1Entry_CountsEveryReferenceLikeQemu()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("shared.qcow2");
        // 8-bit refcounts overflow: 2048 L1 entries reference one L2 table and, through it, the same data clusters.
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "refcount_bits=8", img, "1T");
        QemuImg.IoOk(img, "write -P 1 0 200000");
        using (var raw = new RawQcow2(img))
        {
            ulong entry = raw.U64(raw.L1Offset);
            for (int i = 1; i < raw.L1Size; i++)
                raw.SetU64(raw.L1Offset + (i * 8L), entry);
        }
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.True(ours.CorruptionCount > 2048 * 4, ours.ToString());
        Assert.Equal(2048 * 4, ours.AllocatedClusters);
    }


    [Fact]
    public void LuksEncryptedImage_CountsTheLuksHeader()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("luks.qcow2");
        const string secret = "secret,id=sec0,data=123456";
        QemuImg.RunOk("create", "--object", secret, "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096", img, "1M");
        QemuImg.Io("--object", secret, "--image-opts", $"driver=qcow2,file.filename={img},encrypt.key-secret=sec0", "-c", "write -P 1 0 10000").EnsureSuccess();
        Qcow2CheckReport ours = AssertAgrees(img,
            ["check", "--object", secret, "--output=json", "--image-opts", $"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"]);
        Assert.True(ours.IsClean, ours.ToString());
        Assert.True(ours.ImageEndOffset > MiB); // the LUKS header (key slots) is about 2 MiB
        Assert.Contains(ours.Warnings, w => w.Contains("encrypted", StringComparison.Ordinal));

        // Drop the LUKS header's refcounts: every one of its clusters is then referenced but not counted.
        using (var raw = new RawQcow2(img))
        {
            for (long c = 1; c < 8; c++)
                raw.SetRefcount(c, 0);
        }
        Qcow2CheckReport damaged = AssertAgrees(img,
            ["check", "--object", secret, "--output=json", "--image-opts", $"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"]);
        Assert.True(damaged.CorruptionCount > 0);
    }

    [Fact]
    public void ExternalDataFile_DataClustersAreNotCountedInTheImage()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("meta.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"data_file={dir.File("data.raw")},cluster_size=4096", img, "1M");
        QemuImg.IoOk(img, "write -P 1 0 10000", "write -z 100000 8192", "write -P 2 500000 4096");
        Qcow2CheckReport ours = AssertAgrees(img);
        Assert.True(ours.IsClean, ours.ToString());
        Assert.Equal(5, ours.AllocatedClusters);
    }

    [Fact]
    public void BrokenBitmapTableEntry_IsACorruptionAndALeak_WhereQemuCannotOpenTheImage()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("bitmap.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", img, "4M");
        QemuImg.RunOk("bitmap", "--add", img, "b0");
        QemuImg.IoOk(img, "write -P 1 0 100000");
        Assert.True(Qcow2Checker.Check(img).IsClean);
        using (var raw = new RawQcow2(img))
        {
            long table = raw.FirstBitmapTableOffset();
            raw.SetU64(table, raw.U64(table) | 2); // a reserved bit
        }
        Assert.Equal(1, QemuImg.Run("check", img).ExitCode); // "Could not read bitmap_table table from image"
        Qcow2CheckReport ours = Qcow2Checker.Check(img);
        Assert.Equal(1, ours.CorruptionCount);
        Assert.Contains("bitmap 'b0': table entry 0", ours.Corruptions[0]);
        Assert.Equal(1, ours.Leaks); // the bitmap data cluster the bad entry points to
    }

    [Fact]
    public void SnapshotsSharingOneHugeL1Table_StopAtTheReadBudgetInsteadOfHanging()
    {
        using var dir = new TempDirectory();
        string img = dir.File("hang.qcow2");
        Qcow2Image.Create(img, 4 * MiB, 512);
        const int snapshots = 65536;
        const int entrySize = 56; // 40-byte header, 16 bytes of extra data, empty id and name
        long tableOffset = (new FileInfo(img).Length + 511) & ~511L;
        var table = new byte[snapshots * entrySize];
        for (int i = 0; i < snapshots; i++)
        {
            Span<byte> e = table.AsSpan(i * entrySize, entrySize);
            BinaryPrimitives.WriteUInt64BigEndian(e, 0); // every snapshot's L1 table is the whole file from offset 0
            BinaryPrimitives.WriteUInt32BigEndian(e[8..], 4 << 20); // 4 Mi entries: the largest QEMU allows
            BinaryPrimitives.WriteUInt32BigEndian(e[36..], 16);
        }
        using (var fs = new FileStream(img, FileMode.Open, FileAccess.ReadWrite))
        {
            fs.Position = tableOffset;
            fs.Write(table);
        }
        Patch(img, 60, 4, snapshots);
        Patch(img, 64, 8, (ulong)tableOffset);
        var watch = System.Diagnostics.Stopwatch.StartNew();
        Qcow2CheckReport report = Qcow2Checker.Check(img);
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(20), $"took {watch.Elapsed}");
        Assert.False(report.IsComplete);
        Assert.Contains(report.CheckErrors, m => m.Contains("the check stopped after reading", StringComparison.Ordinal));
        Assert.False(report.IsClean);
    }

    #endregion

    #region Hostile images

    [Theory]
    [InlineData("qemu-64k-bitmaps-snapshot")]
    [InlineData("compressed-512")]
    [InlineData("ours-512")]
    [InlineData("rc1-2k")]
    [InlineData("extended-l2")]
    public void MutatedImages_ReportOrThrowBlockException_AndAgreeWithQemu(string baseName)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        byte[] original = MakeHostileBase(baseName, dir);
        string path = dir.File("mutant.qcow2");
        var failures = new List<string>();
        int cases = 0, thrown = 0, compared = 0, agreed = 0;
        var disagreements = new List<string>();
        var random = new Random(baseName.Length * 7919);
        foreach ((string name, byte[] bytes) in Mutations(original, random))
        {
            cases++;
            File.WriteAllBytes(path, bytes);
            string? failure = RunCheck(path, out Qcow2CheckReport? report, out long allocated, out bool threw);
            thrown += threw ? 1 : 0;
            long bound = (32L << 20) + (16L * bytes.Length);
            if (failure is null && allocated > bound)
                failure = $"allocated {allocated >> 20} MiB for a {bytes.Length}-byte file";
            if (failure is not null)
            {
                failures.Add($"{name}: {failure}");
                continue;
            }
            if (report is null)
                continue;
            // qemu as the oracle where it can check the mutant at all.
            QemuResult q = QemuImg.Run("check", "--output=json", path);
            if (q.ExitCode is not (0 or 2 or 3) || !q.Stdout.TrimStart().StartsWith('{'))
                continue;
            QemuCheckResult qemu = ParseQemuCheck(q);
            if (qemu.CheckErrors != 0 || report.CheckErrorCount != 0)
                continue;
            compared++;
            if (qemu.Corruptions == report.CorruptionCount && qemu.Leaks == report.Leaks && qemu.ImageEnd == report.ImageEndOffset
                && qemu.Allocated == report.AllocatedClusters && qemu.Fragmented == report.FragmentedClusters && qemu.Compressed == report.CompressedClusters
                && qemu.Total == report.TotalClusters)
            {
                agreed++;
            }
            else if (disagreements.Count < 10)
            {
                disagreements.Add($"{name}: qemu {qemu.Corruptions}/{qemu.Leaks}/{qemu.ImageEnd}/{qemu.Allocated}/{qemu.Fragmented}, "
                    + $"ours {report.CorruptionCount}/{report.Leaks}/{report.ImageEndOffset}/{report.AllocatedClusters}/{report.FragmentedClusters}\n{report}\n{qemu.Output}");
            }
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {cases} mutants of {baseName} failed:\n" + string.Join("\n", failures.Take(20)));
        Assert.True(cases > 150, $"only {cases} mutants");
        TestContext.Current.SendDiagnosticMessage($"{baseName}: {cases} mutants, {thrown} header errors, qemu compared on {compared}, agreed on {agreed}");
        Assert.True(compared > 20, $"qemu could check only {compared} mutants of {baseName}");
        Assert.True(agreed == compared, $"{compared - agreed} of {compared} mutants of {baseName} disagree with qemu-img check:\n" + string.Join("\n\n", disagreements));
    }

    private static string? RunCheck(string path, out Qcow2CheckReport? report, out long allocated, out bool threw)
    {
        string? failure = null;
        Qcow2CheckReport? result = null;
        long bytes = 0;
        bool blockException = false;
        var thread = new Thread(() =>
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                result = Qcow2Checker.Check(path);
                _ = result.ToString();
            }
            catch (BlockException)
            {
                blockException = true;
            }
            catch (Exception e)
            {
                failure = $"{e.GetType().Name}: {e.Message} at {e.StackTrace?.Split('\n').FirstOrDefault()?.Trim()}";
            }
            bytes = GC.GetAllocatedBytesForCurrentThread() - before;
        }) { IsBackground = true };
        thread.Start();
        if (!thread.Join(TimeSpan.FromSeconds(20)))
            failure = "did not finish within 20 s";
        report = failure is null ? result : null;
        allocated = bytes;
        threw = blockException;
        return failure;
    }

    private static byte[] MakeHostileBase(string name, TempDirectory dir)
    {
        string path = dir.File("base-" + name + ".qcow2");
        switch (name)
        {
            case "qemu-64k-bitmaps-snapshot":
                QemuImg.RunOk("create", "-f", "qcow2", path, "2M");
                QemuImg.IoOk(path, "write -P 1 0 100000", "write -z 196608 65536");
                QemuImg.RunOk("bitmap", "--add", path, "b0");
                QemuImg.RunOk("snapshot", "-c", "s1", path);
                QemuImg.IoOk(path, "write -P 2 1M 70000");
                break;
            case "compressed-512":
                Compressed(dir, path, "1.1", 512, 64 * KiB);
                break;
            case "ours-512":
                Qcow2Image.Create(path, MiB, 512);
                using (var image = Qcow2Image.Open(path, readOnly: false))
                {
                    image.Write(1000, Pattern(20000, 1));
                    image.Write(600000, Pattern(5000, 2));
                    image.WriteZeroes(4096, 4096);
                }
                break;
            case "rc1-2k":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=2048,refcount_bits=1", path, "1M");
                QemuImg.IoOk(path, "write -P 7 3000 40000");
                break;
            case "extended-l2":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16384", path, "1M");
                QemuImg.IoOk(path, "write -P 8 0 3000", "write -z 32768 16384", "write -P 9 100000 20000");
                break;
            default:
                throw new ArgumentException(name);
        }
        return File.ReadAllBytes(path);
    }

    /// <summary>Seeded mutants: 8-byte words set to edge values, bit flips, header fields, truncation.</summary>
    private static IEnumerable<(string Name, byte[] Bytes)> Mutations(byte[] original, Random random)
    {
        int clusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(original.AsSpan(20));
        long cs = 1L << clusterBits;
        int words = original.Length / 8;
        // Words worth mutating: the non-zero ones (table entries, header fields), most of all in small images.
        var candidates = new List<int>();
        for (int w = 0; w < words; w++)
        {
            if (BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(w * 8)) != 0)
                candidates.Add(w);
        }
        ulong[] edge =
        [
            0, ulong.MaxValue, 1, 0x200, (ulong)cs, (ulong)original.Length, (ulong)original.Length + (ulong)cs, 1UL << 40,
            1UL << 62, 1UL << 63, 0x8000_0000_0000_0000UL | (ulong)cs, 0x4000_0000_0000_0000UL | 0x3FF_FFFF,
        ];
        for (int i = 0; i < 260; i++)
        {
            byte[] bytes = (byte[])original.Clone();
            int w = candidates[random.Next(candidates.Count)];
            ulong old = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(w * 8));
            string name;
            switch (i % 6)
            {
                case 0:
                    ulong value = edge[random.Next(edge.Length)];
                    BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(w * 8), value);
                    name = $"word {w} = 0x{value:x}";
                    break;
                case 1:
                    int bit = random.Next(64);
                    BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(w * 8), old ^ (1UL << bit));
                    name = $"word {w} bit {bit}";
                    break;
                case 2:
                    // Point at another cluster of the file (keeping the flag bits).
                    ulong target = (ulong)random.NextInt64(Math.Max(1, original.Length / cs)) * (ulong)cs;
                    ulong moved = (old & ~0x00FF_FFFF_FFFF_FE00UL) | target;
                    BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(w * 8), moved);
                    name = $"word {w} -> cluster 0x{target:x}";
                    break;
                case 3:
                    ulong other = BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(candidates[random.Next(candidates.Count)] * 8));
                    BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(w * 8), other);
                    name = $"word {w} = copy 0x{other:x}";
                    break;
                case 4:
                    int field = random.Next(8, 104) & ~3;
                    uint fieldValue = random.Next(3) switch { 0 => 0u, 1 => uint.MaxValue, _ => (uint)random.Next(1 << 20) };
                    BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(field), fieldValue);
                    name = $"header u32 at {field} = {fieldValue}";
                    break;
                default:
                    long cut = random.NextInt64(1, original.Length);
                    if (random.Next(2) == 0)
                        cut = cut / cs * cs;
                    bytes = bytes.AsSpan(0, (int)Math.Max(cut, 72)).ToArray();
                    name = $"truncated at {bytes.Length}";
                    break;
            }
            yield return (name, bytes);
        }
    }

    #endregion

    #region Helpers

    private sealed record QemuCheckResult(int ExitCode, long CheckErrors, long Corruptions, long Leaks, long Allocated, long Total,
        long Compressed, long Fragmented, long ImageEnd, string Output);

    private static QemuCheckResult QemuCheck(string path, string[]? checkArgs = null)
    {
        QemuResult r = QemuImg.Run(checkArgs ?? ["check", "--output=json", path]);
        Assert.True(r.ExitCode is 0 or 2 or 3, $"qemu-img check failed to run ({r.ExitCode}): {r.Stdout}{r.Stderr}");
        return ParseQemuCheck(r);
    }

    private static QemuCheckResult ParseQemuCheck(QemuResult r)
    {
        using JsonDocument doc = JsonDocument.Parse(r.Stdout);
        JsonElement root = doc.RootElement;
        long Get(string name) => root.TryGetProperty(name, out JsonElement v) ? v.GetInt64() : 0;
        return new QemuCheckResult(r.ExitCode, Get("check-errors"), Get("corruptions"), Get("leaks"), Get("allocated-clusters"),
            Get("total-clusters"), Get("compressed-clusters"), Get("fragmented-clusters"), Get("image-end-offset"), r.Stdout + r.Stderr);
    }

    /// <summary>Check with both and assert every number qemu-img reports is the same; returns our report.</summary>
    private static Qcow2CheckReport AssertAgrees(string path, string[]? qemuCheckArgs = null)
    {
        QemuCheckResult qemu = QemuCheck(path, qemuCheckArgs);
        Qcow2CheckReport ours = Qcow2Checker.Check(path);
        string both = $"qemu-img check:\n{qemu.Output}\nours:\n{ours}";
        Assert.True(qemu.CheckErrors == ours.CheckErrorCount, $"check-errors differ\n{both}");
        Assert.True(qemu.Corruptions == ours.CorruptionCount, $"corruptions differ\n{both}");
        Assert.True(qemu.Leaks == ours.Leaks, $"leaks differ\n{both}");
        Assert.True(qemu.Allocated == ours.AllocatedClusters, $"allocated-clusters differ\n{both}");
        Assert.True(qemu.Total == ours.TotalClusters, $"total-clusters differ\n{both}");
        Assert.True(qemu.Compressed == ours.CompressedClusters, $"compressed-clusters differ\n{both}");
        Assert.True(qemu.Fragmented == ours.FragmentedClusters, $"fragmented-clusters differ\n{both}");
        Assert.True(qemu.ImageEnd == ours.ImageEndOffset, $"image-end-offset differs\n{both}");
        Assert.Equal(ours.CorruptionCount == 0 && ours.Leaks == 0 && ours.CheckErrorCount == 0, ours.IsClean);
        return ours;
    }

    private static void Patch(string path, long offset, int size, ulong value)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        var b = new byte[size];
        if (size == 4)
            BinaryPrimitives.WriteUInt32BigEndian(b, (uint)value);
        else
            BinaryPrimitives.WriteUInt64BigEndian(b, value);
        fs.Position = offset;
        fs.Write(b);
    }

    /// <summary>Direct edits of a qcow2 file's structures, for damage on purpose.</summary>
    private sealed class RawQcow2 : IDisposable
    {
        private readonly FileStream _fs;

        public RawQcow2(string path)
        {
            _fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.None);
            ClusterBits = (int)U32(20);
            L1Size = (int)U32(36);
            L1Offset = (long)U64(40);
            RefTableOffset = (long)U64(48);
            RefcountOrder = U32(4) >= 3 ? (int)U32(96) : 4;
        }

        public int ClusterBits { get; }

        public long ClusterSize => 1L << ClusterBits;

        public int L1Size { get; }

        public long L1Offset { get; }

        public long RefTableOffset { get; }

        public int RefcountOrder { get; }

        public long Length => _fs.Length;

        private long EntriesPerBlock => (ClusterSize * 8) >> RefcountOrder;

        public uint U32(long offset)
        {
            var b = new byte[4];
            _fs.Position = offset;
            _fs.ReadExactly(b);
            return BinaryPrimitives.ReadUInt32BigEndian(b);
        }

        public ulong U64(long offset)
        {
            var b = new byte[8];
            _fs.Position = offset;
            _fs.ReadExactly(b);
            return BinaryPrimitives.ReadUInt64BigEndian(b);
        }

        public void SetU64(long offset, ulong value)
        {
            var b = new byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(b, value);
            _fs.Position = offset;
            _fs.Write(b);
        }

        public void Extend(long length) => _fs.SetLength(length);

        public long L2Offset(int l1Index) => (long)(U64(L1Offset + (l1Index * 8L)) & Qcow2L2Entry.OffsetMask);

        /// <summary>Offset of the bitmap table of the first bitmap in the bitmap directory.</summary>
        public long FirstBitmapTableOffset()
        {
            long pos = U32(4) >= 3 ? U32(100) : 72;
            while (true)
            {
                uint type = U32(pos);
                uint length = U32(pos + 4);
                Assert.True(type != 0, "no bitmaps extension");
                if (type == 0x23852875)
                {
                    long directory = (long)U64(pos + 24);
                    return (long)U64(directory);
                }
                pos += 8 + ((length + 7) & ~7L);
            }
        }

        public long DataOffset(int l1Index, int l2Index) => (long)(U64(L2Offset(l1Index) + (l2Index * 8L)) & Qcow2L2Entry.OffsetMask);

        public ulong Refcount(long cluster)
        {
            byte[] block = ReadBlock(cluster, out _);
            return Qcow2RefcountBlock.Get(block, RefcountOrder, cluster % EntriesPerBlock);
        }

        public void SetRefcount(long cluster, ulong value)
        {
            byte[] block = ReadBlock(cluster, out long offset);
            Qcow2RefcountBlock.Set(block, RefcountOrder, cluster % EntriesPerBlock, value);
            _fs.Position = offset;
            _fs.Write(block);
        }

        private byte[] ReadBlock(long cluster, out long offset)
        {
            offset = (long)(U64(RefTableOffset + (cluster / EntriesPerBlock * 8)) & ~0x1FFUL);
            Assert.True(offset != 0, $"no refcount block covers cluster {cluster}");
            var block = new byte[ClusterSize];
            _fs.Position = offset;
            _fs.ReadExactly(block);
            return block;
        }

        public void Dispose() => _fs.Dispose();
    }

    #endregion
}
