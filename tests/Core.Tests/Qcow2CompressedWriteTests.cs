using System.IO.Compression;
using System.Text;
using System.Text.Json;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Compressed cluster writes (<see cref="ICompressedWriter"/> on <see cref="Qcow2Image"/>), judged by qemu-img:
/// <c>check</c> is clean (no errors, no leaks) and counts compressed clusters, <c>compare</c> finds the same bytes as a
/// raw image given the same writes (so QEMU inflates every cluster we deflated), <c>map</c> agrees with our map
/// (compressed clusters are data), and our own reads give the data back.
/// </summary>
public sealed class Qcow2CompressedWriteTests
{
    #region Data

    private enum Kind
    {
        Text,
        Random,
        HalfRandom,
        Zeros,
    }

    /// <summary>Words from a small vocabulary: deflates well, with repeats far more than 4 KiB apart.</summary>
    private static byte[] Text(int length, int seed)
    {
        var random = new Random(seed);
        string[] words = Enumerable.Range(0, 400)
            .Select(_ => new string(Enumerable.Range(0, random.Next(2, 10)).Select(_ => (char)('a' + random.Next(20))).ToArray()))
            .ToArray();
        var text = new StringBuilder(length + 16);
        while (text.Length < length)
            text.Append(words[random.Next(words.Length)]).Append(random.Next(9) == 0 ? '\n' : ' ');
        return Encoding.ASCII.GetBytes(text.ToString(0, length));
    }

    private static byte[] Data(Kind kind, int length, int seed)
    {
        switch (kind)
        {
            case Kind.Text:
                return Text(length, seed);
            case Kind.Random:
                return Pattern(length, seed);
            case Kind.HalfRandom:
                byte[] data = new byte[length];
                new Random(seed).NextBytes(data.AsSpan(0, length * 5 / 8)); // deflates to ~5/8: packs badly, runs on
                return data;
            default:
                return new byte[length];
        }
    }

    /// <summary>Contents of a whole image: cluster by cluster, the kinds in turn.</summary>
    private static byte[] Mixed(long size, int clusterSize, int seed, params Kind[] kinds)
    {
        var all = new byte[size];
        for (long pos = 0, i = 0; pos < size; pos += clusterSize, i++)
        {
            int n = (int)Math.Min(clusterSize, size - pos);
            Data(kinds[i % kinds.Length], n, seed + (int)i).CopyTo(all.AsSpan((int)pos));
        }
        return all;
    }

    private static readonly Kind[] AllKinds = [Kind.Text, Kind.Random, Kind.HalfRandom, Kind.Text, Kind.Zeros, Kind.Text, Kind.Text];

    #endregion

    #region Oracles

    private static JsonElement CheckJson(string image)
    {
        QemuResult r = QemuImg.Run("check", "--output=json", image);
        Assert.True(r.ExitCode == 0, $"qemu-img check of '{image}' is not clean ({r.ExitCode}): {r.Stdout}{r.Stderr}");
        return JsonDocument.Parse(r.Stdout).RootElement.Clone();
    }

    private static long Field(JsonElement check, string name)
        => check.TryGetProperty(name, out JsonElement v) ? v.GetInt64() : 0;

    /// <summary>Clean, no leaks, the same bytes as <paramref name="expected"/> for QEMU and for us, the same map.</summary>
    private static JsonElement AssertImage(TempDirectory dir, string image, byte[] expected)
    {
        JsonElement check = CheckJson(image);
        Assert.Equal(0, Field(check, "leaks"));
        Assert.Equal(0, Field(check, "corruptions"));
        string raw = dir.File(Path.GetFileNameWithoutExtension(image) + "-expected.raw");
        File.WriteAllBytes(raw, expected);
        QemuImg.AssertSameContents(image, raw);
        File.Delete(raw);
        using (var reopened = Qcow2Image.Open(image, readOnly: true))
            AssertBytesEqual(expected, ReadAll(reopened), "our read back");
        AssertMapMatchesQemu(image);
        return check;
    }

    /// <summary>Write <paramref name="data"/> at 0 with compressed writes of <paramref name="chunk"/> bytes.</summary>
    private static void WriteAllCompressed(Qcow2Image image, byte[] data, int chunk)
    {
        for (long pos = 0; pos < data.Length; pos += chunk)
            image.WriteCompressed(pos, data.AsSpan((int)pos, (int)Math.Min(chunk, data.Length - pos)));
    }

    #endregion

    #region Fresh images

    [Theory]
    [InlineData(4096, 64 * 4096 + 1536)] // the last cluster partial
    [InlineData(65536, 40 * 65536)]
    [InlineData(65536, 23 * 65536 + 512)]
    [InlineData(2 * MiB, 7 * 2 * MiB + 4096)]
    [InlineData(512, 300 * 512)]
    public void FreshImage_MixedData_QemuReadsItBack(int clusterSize, int size)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("c.qcow2");
        Qcow2Image.Create(img, size, clusterSize);
        byte[] data = Mixed(size, clusterSize, 1, AllKinds);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            WriteAllCompressed(image, data, Math.Max(clusterSize, MiB));
            AssertBytesEqual(data, ReadAll(image), "read back before closing");
        }
        JsonElement check = AssertImage(dir, img, data);
        long clusters = (size + clusterSize - 1) / clusterSize;
        Assert.True(Field(check, "compressed-clusters") > 0, check.ToString());
        Assert.True(Field(check, "compressed-clusters") < clusters, "random clusters must be stored uncompressed");
        Assert.True(Field(check, "allocated-clusters") == clusters, check.ToString());
    }

    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * MiB)]
    public void Compressible_IsPackedAndSmallerThanUncompressed(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        int size = clusterSize == 2 * MiB ? 8 * MiB : 64 * clusterSize;
        string img = dir.File("c.qcow2");
        Qcow2Image.Create(img, size, clusterSize);
        byte[] data = Text(size, 5);
        using (var image = Qcow2Image.Open(img, readOnly: false))
            WriteAllCompressed(image, data, clusterSize);
        JsonElement check = AssertImage(dir, img, data);
        long clusters = size / clusterSize;
        Assert.Equal(clusters, Field(check, "compressed-clusters"));
        // Text deflates to well under half: several compressed clusters share a host cluster. Before the data:
        // header, refcount table, refcount block, L1 and L2 tables.
        long dataEnd = Field(check, "image-end-offset");
        Assert.True(dataEnd - (5L * clusterSize) < size * 6L / 10, $"image end {dataEnd} for {size} bytes of text");

        // QEMU's own compressed image of the same data, for scale: we should not be far off.
        string raw = dir.File("text.raw");
        File.WriteAllBytes(raw, data);
        string theirs = dir.File("qemu.qcow2");
        QemuImg.RunOk("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", $"cluster_size={clusterSize}", raw, theirs);
        long qemuEnd = Field(CheckJson(theirs), "image-end-offset");
        TestContext.Current.TestOutputHelper?.WriteLine($"{clusterSize}-byte clusters, {size} bytes of text: our image ends at {dataEnd}, QEMU's at {qemuEnd}");
        Assert.True(dataEnd < qemuEnd * 13 / 10 + (4L * clusterSize), $"our image ends at {dataEnd}, QEMU's at {qemuEnd}");
    }

    [Fact]
    public void Incompressible_IsStoredAsNormalClusters()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("r.qcow2");
        int size = 16 * 65536;
        Qcow2Image.Create(img, size);
        byte[] data = Pattern(size, 9);
        using (var image = Qcow2Image.Open(img, readOnly: false))
            WriteAllCompressed(image, data, size);
        JsonElement check = AssertImage(dir, img, data);
        Assert.Equal(0, Field(check, "compressed-clusters"));
        Assert.Equal(16, Field(check, "allocated-clusters"));
    }

    [Fact]
    public void PartialClusters_AreWrittenNormally()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("p.qcow2");
        int size = 8 * 65536;
        Qcow2Image.Create(img, size);
        byte[] expected = new byte[size];
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            void Write(long offset, byte[] data)
            {
                image.WriteCompressed(offset, data);
                data.CopyTo(expected.AsSpan((int)offset));
            }
            Write(100, Text(1000, 1)); // inside cluster 0
            Write(65536 + 32768, Text(65536, 2)); // half of cluster 1, half of cluster 2
            Write(4 * 65536, Text(65536 + 4096, 3)); // cluster 4 whole, then the start of cluster 5
        }
        JsonElement check = AssertImage(dir, img, expected);
        Assert.Equal(1, Field(check, "compressed-clusters"));
        Assert.Equal(5, Field(check, "allocated-clusters"));
    }

    [Fact]
    public void Version2Image_CompressesToo()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("v2.qcow2");
        int size = 32 * 65536 + 512;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "compat=0.10", img, size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        byte[] data = Mixed(size, 65536, 3, AllKinds);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            Assert.Equal(2, image.Version);
            WriteAllCompressed(image, data, MiB);
        }
        Assert.True(Field(AssertImage(dir, img, data), "compressed-clusters") > 0);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(64)]
    public void NarrowAndWideRefcounts_PackWithinTheirMaximum(int refcountBits)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("rc.qcow2");
        int size = 48 * 4096;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size=4096,refcount_bits={refcountBits}", img, size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        // Zeros deflate to a few bytes: with wide refcounts dozens share one host cluster.
        byte[] data = Mixed(size, 4096, 4, Kind.Zeros, Kind.Text, Kind.Zeros, Kind.Zeros);
        using (var image = Qcow2Image.Open(img, readOnly: false))
            WriteAllCompressed(image, data, 4096);
        JsonElement check = AssertImage(dir, img, data);
        Assert.Equal(48, Field(check, "compressed-clusters"));
    }

    [Fact]
    public void SmallClustersAndCaches_RefcountStructuresGrowWhilePacking()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("g.qcow2");
        int size = 4 * MiB;
        Qcow2Image.Create(img, size, 512); // 512-byte clusters: refcount blocks and table grow while packing
        byte[] data = Mixed(size, 512, 6, Kind.Text, Kind.Random, Kind.Zeros);
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            image.LimitCaches(4, 4);
            WriteAllCompressed(image, data, 8192);
        }
        Assert.True(Field(AssertImage(dir, img, data), "compressed-clusters") > 0);
    }

    #endregion

    #region Over existing data

    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * MiB)]
    public void OverExistingClusters_OldSpaceIsFreed(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("o.qcow2");
        int clusters = 12;
        int size = clusters * clusterSize;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", img, size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        // Normal data, a zero cluster with and without a host cluster, and QEMU's own compressed clusters.
        QemuImg.IoOk(img,
            $"write -P 0x11 0 {3 * clusterSize}",
            $"write -z {3 * clusterSize} {clusterSize}",
            $"write -P 0x22 {4 * clusterSize} {clusterSize}",
            $"write -z {4 * clusterSize} {clusterSize}", // keeps its host cluster
            $"write -c -P 0x33 {5 * clusterSize} {clusterSize}",
            $"write -c -P 0x44 {6 * clusterSize} {clusterSize}");
        byte[] expected = QemuImg.ReadAllAsRaw(img, dir.File("before.raw"));

        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            // Everything once, compressed (over normal, zero, preallocated zero, compressed and unallocated).
            byte[] first = Mixed(size, clusterSize, 10, Kind.Text, Kind.Text, Kind.Random, Kind.Text);
            WriteAllCompressed(image, first, size);
            first.CopyTo(expected, 0);
            // Then again, over our own compressed clusters, with flushes between: freed space gets reused.
            for (int round = 0; round < 3; round++)
            {
                for (int c = round; c < clusters; c += 2)
                {
                    byte[] again = Text(clusterSize, 100 + (round * 50) + c);
                    image.WriteCompressed((long)c * clusterSize, again);
                    again.CopyTo(expected, c * clusterSize);
                }
                image.Flush();
                AssertBytesEqual(expected, ReadAll(image), $"round {round}");
            }
            // Normal writes over compressed clusters, partial and whole.
            byte[] normal = Pattern(clusterSize + 100, 77);
            image.Write(clusterSize - 50, normal);
            normal.CopyTo(expected, clusterSize - 50);
        }
        JsonElement check = AssertImage(dir, img, expected);
        Assert.True(Field(check, "compressed-clusters") > 0);
        // No host space is lost: refcounts are exact, and rewriting did not leave the file much longer.
        Assert.True(Field(check, "image-end-offset") < 3L * size + (8L * clusterSize), check.ToString());
    }

    [Fact]
    public void FreedPackingCluster_IsNotPackedIntoAfterReuse()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("f.qcow2");
        const int cs = 65536;
        int size = 8 * cs;
        Qcow2Image.Create(img, size);
        byte[] expected = new byte[size];
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            void Compressed(int cluster, byte[] data)
            {
                image.WriteCompressed((long)cluster * cs, data);
                data.CopyTo(expected, cluster * cs);
            }
            void Normal(int cluster, byte[] data)
            {
                image.Write((long)cluster * cs, data);
                data.CopyTo(expected, cluster * cs);
            }
            Compressed(0, Text(cs, 1)); // packed at the start of host cluster H; the rest of H is free space
            Normal(0, Pattern(cs, 2)); // H is dropped...
            image.Flush(); // ...and free now
            Normal(1, Pattern(cs, 3)); // H is reused for normal data
            Compressed(2, Text(cs, 4)); // must not go into what is left of H
            Compressed(3, Text(cs, 5));
            AssertBytesEqual(expected, ReadAll(image), "before closing");
        }
        AssertImage(dir, img, expected);
    }

    [Fact]
    public void Reopened_PacksInNewSpaceAndStaysClean()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("r.qcow2");
        const int cs = 65536;
        int size = 16 * cs;
        Qcow2Image.Create(img, size);
        byte[] expected = Mixed(size, cs, 20, Kind.Text, Kind.HalfRandom);
        for (int part = 0; part < 4; part++)
        {
            using var image = Qcow2Image.Open(img, readOnly: false);
            image.WriteCompressed((long)part * 4 * cs, expected.AsSpan(part * 4 * cs, 4 * cs));
        }
        Assert.Equal(16, Field(AssertImage(dir, img, expected), "compressed-clusters"));
    }

    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    public void LessThanHalfCompressible_RunsOnIntoTheNextContiguousCluster(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("run.qcow2");
        const int clusters = 24;
        int size = clusters * clusterSize;
        Qcow2Image.Create(img, size, clusterSize);
        byte[] data = Mixed(size, clusterSize, 40, Kind.HalfRandom); // each deflates to a little over 5/8 of a cluster
        using (var image = Qcow2Image.Open(img, readOnly: false))
            WriteAllCompressed(image, data, MiB);
        JsonElement check = AssertImage(dir, img, data);
        Assert.Equal(clusters, Field(check, "compressed-clusters"));
        // One host cluster each if compressed data stopped at cluster boundaries; packed tight as QEMU packs:
        // about 5/8 each. Before the data: header, refcount table, refcount block, L1 and L2 tables.
        long dataClusters = (Field(check, "image-end-offset") / clusterSize) - 5;
        Assert.True(dataClusters <= clusters * 7 / 10, $"{dataClusters} host clusters for {clusters} compressed clusters");
    }

    /// <summary>
    /// Crash consistency: every write and fsync of a session of compressed writes (fresh clusters, over normal and
    /// compressed ones, packing, freed space) is recorded; every prefix of the writes, and every single write of an
    /// fsync epoch on top of the epochs before it, must pass qemu-img check without corruption (leaks allowed) and
    /// read, cluster by cluster, as contents that cluster really had: never a descriptor pointing at data not written.
    /// </summary>
    [Fact]
    public void EveryCrashPoint_LeavesOldOrNewClusters_NeverGarbage()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("session.qcow2");
        const int cs = 4096;
        const int clusters = 14;
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={cs}", img, (clusters * cs).ToString(System.Globalization.CultureInfo.InvariantCulture));
        QemuImg.IoOk(img, $"write -P 0x11 0 {4 * cs}", $"write -c -P 0x22 {4 * cs} {2 * cs}");
        byte[] before = File.ReadAllBytes(img);
        byte[] start = QemuImg.ReadAllAsRaw(img, dir.File("start.raw"));
        var history = new List<byte[]>[clusters];
        for (int c = 0; c < clusters; c++)
            history[c] = [start.AsSpan(c * cs, cs).ToArray()];

        var log = new List<(long Offset, byte[]? Data)>();
        using (var image = Qcow2Image.Open(img, readOnly: false))
        {
            image.ObserveFile((offset, data) => log.Add((offset, data)));
            void Compressed(int first, byte[] data)
            {
                image.WriteCompressed((long)first * cs, data);
                for (int i = 0; i < data.Length / cs; i++)
                    history[first + i].Add(data.AsSpan(i * cs, cs).ToArray());
            }
            Compressed(0, Mixed(8 * cs, cs, 1, Kind.Text, Kind.HalfRandom, Kind.Random, Kind.Zeros));
            image.Flush();
            Compressed(0, Mixed(4 * cs, cs, 2, Kind.Text));
            image.Write(5L * cs, Pattern(cs, 3));
            history[5].Add(Pattern(cs, 3));
            Compressed(8, Mixed(6 * cs, cs, 4, Kind.HalfRandom, Kind.Text));
        }
        Assert.Contains(log, w => w.Data is null);

        var states = new List<(string Name, List<(long Offset, byte[] Data)> Writes)>();
        var writes = log.Where(w => w.Data is not null).Select(w => (w.Offset, w.Data!)).ToList();
        for (int k = 0; k <= writes.Count; k++)
            states.Add(($"prefix {k}/{writes.Count}", writes.Take(k).ToList()));
        var done = new List<(long, byte[])>();
        var epoch = new List<(long, byte[])>();
        int epochs = 0;
        foreach ((long offset, byte[]? data) in log.Append((-1, null)))
        {
            if (data is not null)
            {
                epoch.Add((offset, data));
                continue;
            }
            if (epoch.Count > 1)
            {
                for (int i = 0; i < epoch.Count; i++)
                    states.Add(($"epoch {epochs} write {i} alone", [.. done, epoch[i]]));
            }
            done.AddRange(epoch);
            epoch.Clear();
            epochs++;
        }

        string crashed = dir.File("crashed.qcow2");
        var failures = new List<string>();
        foreach ((string name, List<(long Offset, byte[] Data)> applied) in states)
        {
            long length = Math.Max(before.Length, applied.Count == 0 ? 0 : applied.Max(w => w.Offset + w.Data.Length));
            var file = new byte[length];
            before.CopyTo(file, 0);
            foreach ((long offset, byte[] data) in applied)
                data.CopyTo(file, offset);
            File.WriteAllBytes(crashed, file);
            QemuResult check = QemuImg.Run("check", "--output=json", crashed);
            if (check.ExitCode is not (0 or 3)) // 3: leaks only
            {
                failures.Add($"{name}: qemu-img check exited {check.ExitCode}: {check.Stdout}{check.Stderr}");
            }
            else
            {
                QemuResult convert = QemuImg.Run("convert", "-f", "qcow2", "-O", "raw", crashed, dir.File("crashed.raw"));
                if (convert.ExitCode != 0)
                {
                    failures.Add($"{name}: qemu-img convert failed: {convert.Stderr}");
                }
                else
                {
                    byte[] contents = File.ReadAllBytes(dir.File("crashed.raw"));
                    for (int c = 0; c < clusters; c++)
                    {
                        byte[] cluster = contents.AsSpan(c * cs, cs).ToArray();
                        if (!history[c].Any(h => h.AsSpan().SequenceEqual(cluster)))
                            failures.Add($"{name}: cluster {c} holds contents it never had");
                    }
                }
            }
            if (failures.Count > 10)
                break;
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {states.Count} crash states are bad:\n" + string.Join("\n", failures));
        Assert.True(writes.Count > 20, $"only {writes.Count} writes recorded");
    }

    #endregion

    #region Overlays

    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * MiB)]
    public void Overlay_CompressedClustersHideTheBackingImage(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string baseImg = dir.File("base.qcow2");
        string top = dir.File("top.qcow2");
        int clusters = 10;
        int size = (clusters * clusterSize) - 1024; // the last cluster partial
        QemuImg.RunOk("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", baseImg, size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        QemuImg.IoOk(baseImg, $"write -P 0x5a 0 {size}");
        byte[] expected = QemuImg.ReadAllAsRaw(baseImg, dir.File("base.raw"));
        Qcow2Image.Create(top, size, clusterSize, "base.qcow2", ImageFormat.Qcow2);
        using (var image = Qcow2Image.Open(top, readOnly: false))
        {
            void Write(long offset, byte[] data)
            {
                image.WriteCompressed(offset, data);
                data.CopyTo(expected.AsSpan((int)offset));
            }
            Write(0, Text(clusterSize, 1)); // whole: compressed
            Write(2L * clusterSize, Mixed(2 * clusterSize, clusterSize, 2, Kind.Text, Kind.Random)); // compressed, then normal
            Write((5L * clusterSize) + 512, Text(clusterSize - 512, 3)); // partial: normal, backing data below it copied
            long last = (long)(clusters - 1) * clusterSize;
            Write(last, Text(size - (int)last, 4)); // the partial last cluster, to the end of the disk: compressed
        }
        JsonElement check = AssertImage(dir, top, expected);
        Assert.Equal(3, Field(check, "compressed-clusters"));
        Assert.Equal(5, Field(check, "allocated-clusters"));
    }

    #endregion

    #region Refusals and the backup path

    [Fact]
    public void Zstd_QemuReadsOurs_AndWeReadQemus()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string raw = dir.File("src.raw");
        byte[] data = Text(4 * 65536 + 1000, 7);
        File.WriteAllBytes(raw, data.Concat(new byte[(1 << 20) - data.Length]).ToArray());
        // ours, read by QEMU
        string ours = dir.File("ours.qcow2");
        Qcow2Image.Create(ours, 1 << 20, 65536, compression: Qcow2CompressionType.Zstd);
        using (var image = Qcow2Image.Open(ours, readOnly: false))
        {
            image.WriteCompressed(0, data.AsSpan(0, 4 * 65536));
            image.Write(4 * 65536, data.AsSpan(4 * 65536));
            image.Flush();
        }
        Assert.Contains("zstd", QemuImg.RunOk("info", ours), StringComparison.Ordinal);
        QemuImg.AssertClean(ours);
        Assert.Equal(0, QemuImg.Compare(ours, raw, "qcow2", "raw").ExitCode);
        Assert.Contains("\"compressed-clusters\": 4", QemuImg.Check(ours).Output, StringComparison.Ordinal);
        // QEMU's, read (and written) by us
        string theirs = dir.File("theirs.qcow2");
        QemuResult made = QemuImg.Run("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "-f", "raw", raw, theirs);
        Assert.SkipUnless(made.ExitCode == 0, $"this qemu-img cannot write zstd images: {made.Stderr}");
        using (var image = Qcow2Image.Open(theirs, readOnly: false))
        {
            Assert.Equal(Qcow2CompressionType.Zstd, image.CompressionType);
            var back = new byte[data.Length];
            image.Read(0, back);
            Assert.Equal(data, back);
            image.Write(100, new byte[] { 1, 2, 3 }); // copy-on-write out of a zstd cluster
            image.Flush();
        }
        QemuImg.AssertClean(theirs);
        QemuImg.IoOk(theirs, "read -P 1 100 1", "read -P 2 101 1", "read -P 3 102 1");
    }

    [Fact]
    public void ReadOnlyImage_RefusesCompressedWrites()
    {
        using var dir = new TempDirectory();
        string img = dir.File("ro.qcow2");
        Qcow2Image.Create(img, MiB);
        using var image = Qcow2Image.Open(img, readOnly: true);
        Assert.Equal(ErrorIds.NodeReadOnly, Assert.Throws<BlockException>(() => image.WriteCompressed(0, new byte[65536])).ErrorId);
    }

    [Fact]
    public void OutOfRange_IsRefused()
    {
        using var dir = new TempDirectory();
        string img = dir.File("range.qcow2");
        Qcow2Image.Create(img, MiB);
        using var image = Qcow2Image.Open(img, readOnly: false);
        Assert.Equal(ErrorIds.OffsetOutOfRange, Assert.Throws<BlockException>(() => image.WriteCompressed(MiB - 65536, new byte[2 * 65536])).ErrorId);
        Assert.Equal(ErrorIds.OffsetOutOfRange, Assert.Throws<BlockException>(() => image.WriteCompressed(-65536, new byte[65536])).ErrorId);
    }

    /// <summary>Every compressed cluster must inflate with QEMU's 4 KiB window (zlib inflateInit2(-12)).</summary>
    [Theory]
    [InlineData(65536)]
    [InlineData(2 * MiB)]
    public void Compress_NeverReachesBackFurtherThan4KiB(int clusterSize)
    {
        // Text repeats its words everywhere: a deflater with a 32 KiB window points back further than 4 KiB.
        byte[] cluster = Text(clusterSize, 1);
        byte[] output = new byte[clusterSize];
        int length = Qcow2CompressedCluster.Compress(cluster, output, clusterSize - 1);
        Assert.True(length > 0 && length < clusterSize / 2, $"compressed to {length}");
        int distance = MaxDistance(output.AsSpan(0, length), cluster.Length);
        Assert.InRange(distance, 1, Qcow2CompressedCluster.QemuWindowBytes);

        // The data is a real test: deflating it in one go reaches further back.
        var plain = new MemoryStream();
        using (var deflater = new DeflateStream(plain, CompressionLevel.Optimal, leaveOpen: true))
            deflater.Write(cluster);
        Assert.True(MaxDistance(plain.ToArray(), cluster.Length) > Qcow2CompressedCluster.QemuWindowBytes);

        using var inflater = new DeflateStream(new MemoryStream(output, 0, length), CompressionMode.Decompress);
        byte[] back = new byte[clusterSize];
        inflater.ReadExactly(back);
        AssertBytesEqual(cluster, back, "inflated");
    }

    [Fact]
    public void Backup_WithCompress_WritesCompressedClusters()
    {
        QemuImg.Require();
        const int size = 8 * MiB;
        using var f = new RawNodeFixture(size);
        byte[] data = Mixed(size, 65536, 30, Kind.Text, Kind.Text, Kind.Random, Kind.HalfRandom);
        f.Node.Write(0, data);
        string target = Path.Combine(f.Folder, "backup.qcow2");
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = f.Node, Target = target, Sync = BackupSyncMode.Full, TargetFormat = ImageFormat.Qcow2, Compress = true,
        });
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(60)), "the job did not end");
        Assert.True(job.Succeeded, job.Error?.Message);
        f.Engine.CloseAll();
        using var dir = new TempDirectory();
        JsonElement check = AssertImage(dir, target, data);
        Assert.True(Field(check, "compressed-clusters") >= 64, check.ToString());
    }

    #endregion

    #region A deflate reader that reports back-reference distances

    /// <summary>The largest back-reference distance in a raw deflate stream (0 when none).</summary>
    private static int MaxDistance(ReadOnlySpan<byte> stream, int expectedOutput)
    {
        var bits = new BitReader(stream.ToArray());
        int max = 0;
        long produced = 0;
        bool final;
        do
        {
            final = bits.Read(1) == 1;
            int type = bits.Read(2);
            if (type == 0)
            {
                bits.AlignToByte();
                int len = bits.Read(16);
                bits.Read(16);
                for (int i = 0; i < len; i++)
                    bits.Read(8);
                produced += len;
                continue;
            }
            Huffman litLen, dist;
            if (type == 1)
            {
                int[] lengths = new int[288];
                for (int i = 0; i < 288; i++)
                    lengths[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
                litLen = new Huffman(lengths);
                dist = new Huffman(Enumerable.Repeat(5, 30).ToArray());
            }
            else
            {
                Assert.Equal(2, type);
                int hlit = bits.Read(5) + 257, hdist = bits.Read(5) + 1, hclen = bits.Read(4) + 4;
                int[] order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
                int[] clLengths = new int[19];
                for (int i = 0; i < hclen; i++)
                    clLengths[order[i]] = bits.Read(3);
                var cl = new Huffman(clLengths);
                int[] lengths = new int[hlit + hdist];
                for (int i = 0; i < lengths.Length;)
                {
                    int sym = cl.Decode(bits);
                    if (sym < 16)
                        lengths[i++] = sym;
                    else if (sym == 16)
                        for (int r = 3 + bits.Read(2), prev = lengths[i - 1]; r > 0; r--)
                            lengths[i++] = prev;
                    else
                        for (int r = sym == 17 ? 3 + bits.Read(3) : 11 + bits.Read(7); r > 0; r--)
                            lengths[i++] = 0;
                }
                litLen = new Huffman(lengths[..hlit]);
                dist = new Huffman(lengths[hlit..]);
            }
            int[] lengthBase = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
            int[] lengthExtra = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
            int[] distBase = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577];
            int[] distExtra = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
            while (true)
            {
                int sym = litLen.Decode(bits);
                if (sym < 256)
                {
                    produced++;
                    continue;
                }
                if (sym == 256)
                    break;
                int length = lengthBase[sym - 257] + bits.Read(lengthExtra[sym - 257]);
                int d = dist.Decode(bits);
                int distance = distBase[d] + bits.Read(distExtra[d]);
                max = Math.Max(max, distance);
                produced += length;
            }
        }
        while (!final);
        Assert.Equal(expectedOutput, produced);
        return max;
    }

    private sealed class BitReader(byte[] data)
    {
        private long _bit;

        public int Read(int count)
        {
            int value = 0;
            for (int i = 0; i < count; i++, _bit++)
                value |= ((data[(int)(_bit >> 3)] >> (int)(_bit & 7)) & 1) << i;
            return value;
        }

        public void AlignToByte() => _bit = (_bit + 7) & ~7L;
    }

    /// <summary>Canonical Huffman decoding, one bit at a time (slow, fine for tests).</summary>
    private sealed class Huffman
    {
        private readonly Dictionary<(int Length, int Code), int> _symbols = new();

        public Huffman(int[] lengths)
        {
            int maxLength = lengths.Max();
            int[] count = new int[maxLength + 2];
            foreach (int l in lengths)
            {
                if (l > 0)
                    count[l]++;
            }
            int[] next = new int[maxLength + 2];
            for (int bits = 1, code = 0; bits <= maxLength; bits++)
            {
                code = (code + count[bits - 1]) << 1;
                next[bits] = code;
            }
            for (int s = 0; s < lengths.Length; s++)
            {
                if (lengths[s] > 0)
                    _symbols[(lengths[s], next[lengths[s]]++)] = s;
            }
        }

        public int Decode(BitReader bits)
        {
            int code = 0;
            for (int length = 1; length <= 15; length++)
            {
                code = (code << 1) | bits.Read(1);
                if (_symbols.TryGetValue((length, code), out int symbol))
                    return symbol;
            }
            throw new InvalidDataException("bad Huffman code");
        }
    }

    #endregion
}
