using System.IO.Hashing;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Digests;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>Cluster digests, the manifest file, and manifests written by backups and compared by scans.</summary>
public sealed class DigestManifestTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;

    [Fact]
    public void Hasher_GivesTheSameDigestWhateverThePieces_AndZeroForZeros()
    {
        const int cluster = 64 * KiB;
        long size = (3 * cluster) + 1000; // a partial last cluster
        byte[] disk = new byte[size];
        new Random(1).NextBytes(disk.AsSpan(0, cluster));
        new Random(2).NextBytes(disk.AsSpan(2 * cluster + 5, 100));
        new Random(3).NextBytes(disk.AsSpan(3 * cluster, 1000));
        UInt128[] expected = Enumerable.Range(0, 4).Select(i => ClusterHasher.Of(disk.AsSpan(i * cluster, (int)Math.Min(cluster, size - (i * cluster))))).ToArray();
        Assert.Equal(ClusterHasher.ZeroDigest, expected[1]);
        Assert.Equal(XxHash128.HashToUInt128(disk.AsSpan(0, cluster)), expected[0]);
        foreach (int piece in new[] { 1, 511, 4096, 65536, 100000, (int)size })
        {
            var got = new UInt128[4];
            var hasher = new ClusterHasher(cluster, size, (c, d) => got[c] = d);
            for (long pos = 0; pos < size; pos += piece)
            {
                int n = (int)Math.Min(piece, size - pos);
                ReadOnlySpan<byte> bytes = disk.AsSpan((int)pos, n);
                if (bytes.ContainsAnyExcept((byte)0))
                    hasher.Data(pos, bytes);
                else
                    hasher.Zeros(pos, n); // a hole reads the same as zero bytes
            }
            Assert.Equal(expected, got);
        }
    }

    [Fact]
    public void Hasher_RefusesBytesOutOfOrder()
    {
        var hasher = new ClusterHasher(65536, 1 << 20, (_, _) => { });
        Assert.Throws<ArgumentException>(() => hasher.Data(100, new byte[10]));
        hasher.Data(0, new byte[10]);
        Assert.Throws<ArgumentException>(() => hasher.Data(20, new byte[10]));
    }

    [Fact]
    public void Manifest_RoundTrips_AndRefusesADamagedHeaderOrATornFile()
    {
        using var dir = new TempDirectory();
        string path = dir.File("x.digests");
        var info = new DigestManifestInfo("/images/vm.qcow2", "daily", 65536, 10 * MiB + 512, 65536, "full.qcow2", DateTimeOffset.FromUnixTimeMilliseconds(1_700_000_000_000));
        using (DigestManifestWriter w = DigestManifestWriter.Create(path, info, previous: null))
        {
            Assert.False(File.Exists(path)); // written under its temporary name until the backup commits
            w.Write(3, new UInt128(0x0102030405060708UL, 0x1112131415161718UL));
            w.Write(160, UInt128.MaxValue);
            w.Commit(info.PointInTime);
        }
        Assert.False(File.Exists(path + ".tmp"));
        using (DigestManifest m = DigestManifest.Open(path))
        {
            Assert.Equal(info, m.Info);
            Assert.Equal(161, m.Info.ClusterCount);
            var d = new UInt128[161];
            m.ReadDigests(0, d);
            Assert.Equal(new UInt128(0x0102030405060708UL, 0x1112131415161718UL), d[3]);
            Assert.Equal(UInt128.MaxValue, d[160]);
            Assert.Equal(159, d.Count(x => x == ClusterHasher.ZeroDigest));
        }
        byte[] bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes.AsSpan(0, bytes.Length - 16).ToArray());
        Assert.Equal(ErrorIds.ImageCorrupt, Assert.Throws<BlockException>(() => DigestManifest.Open(path)).ErrorId);
        bytes[70] ^= 1;
        File.WriteAllBytes(path, bytes);
        Assert.Equal(ErrorIds.ImageCorrupt, Assert.Throws<BlockException>(() => DigestManifest.Open(path)).ErrorId);
        Assert.Equal(ErrorIds.DigestManifestNotFound, Assert.Throws<BlockException>(() => DigestManifest.Open(dir.File("none.digests"))).ErrorId);
    }

    [Fact]
    public void Writer_GathersPages_KeepsThePreviousDigestsAroundScatteredOnes_AndAgreesWithAModel()
    {
        // 300 pages of digests (76,800 clusters + 5, the last page short): enough for the writer to write pages out
        // before they are whole (it keeps at most a few hundred), and to come back to them.
        using var dir = new TempDirectory();
        const long clusters = (300 * 256) + 5;
        var info = new DigestManifestInfo("/images/vm.img", "daily", 65536, (clusters * 65536) - 100, 65536, "b1.qcow2", DateTimeOffset.FromUnixTimeMilliseconds(1_700_000_000_000));
        var model = new UInt128[clusters];
        Array.Fill(model, ClusterHasher.ZeroDigest);
        var random = new Random(7);
        string first = dir.File("b1.qcow2.digests");
        using (DigestManifestWriter w = DigestManifestWriter.Create(first, info, previous: null))
        {
            for (long c = 0; c < clusters; c++)
            {
                if (c % 3 == 0)
                    continue; // holes: zeros
                model[c] = new UInt128((ulong)random.NextInt64(), (ulong)c);
                w.Write(c, model[c]);
            }
            w.Commit(info.PointInTime);
        }
        string second = dir.File("b2.qcow2.digests");
        using (DigestManifest previous = DigestManifest.Open(first))
        using (DigestManifestWriter w = DigestManifestWriter.Create(second, info with { BackupFile = "b2.qcow2" }, previous))
        {
            // scattered over every page, twice over (a page written out early is gathered again), the last cluster too
            for (int i = 0; i < 2000; i++)
            {
                long c = i == 0 ? clusters - 1 : random.NextInt64(clusters);
                model[c] = new UInt128((ulong)random.NextInt64(), (ulong)i);
                w.Write(c, model[c]);
            }
            w.Commit(info.PointInTime);
        }
        foreach ((string path, bool isSecond) in new[] { (first, false), (second, true) })
        {
            using DigestManifest m = DigestManifest.Open(path);
            var d = new UInt128[clusters];
            m.ReadDigests(0, d);
            if (isSecond)
                Assert.Equal(model, d);
            else
                Assert.Equal(clusters - ((clusters + 2) / 3), d.Count(x => x != ClusterHasher.ZeroDigest));
        }
    }

    [Fact]
    public void AFailedBackup_LeavesNoManifest_AndTheNextOneWritesItWhole()
    {
        using var f = new RawNodeFixture(4 << 20);
        f.Node.Write(0, Qcow2TestHelpers.Pattern(3 * MiB, 4));
        f.Node.AddBitmap("b");
        string target = Path.Combine(f.Folder, "full.qcow2");
        Testing.FaultRule rule = Testing.FaultInjection.Add(f.Node.Path, Testing.FaultOperation.Read, offset: 2 * MiB, length: 1, times: 1);
        BackupJob failed;
        try
        {
            failed = BackupJob.Start(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess });
            Assert.True(failed.Completion.Wait(TimeSpan.FromSeconds(30)));
        }
        finally
        {
            Testing.FaultInjection.Remove(rule);
        }
        Assert.False(failed.Succeeded);
        Assert.Empty(Directory.GetFiles(f.Folder, "*.digests*"));
        BackupJob job = BackupJob.Start(new BackupRequest { Source = f.Node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess });
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.True(job.Succeeded, job.Error?.Message);
        using DigestManifest m = DigestManifest.Open(job.ManifestPath!);
        Assert.Equal(f.Node.Path, m.Info.NodePath);
        ManifestScanResult scan = ManifestScan.Compare(ManifestScan.Of(f.Node), m, _ => Assert.Fail("no cluster may differ"));
        Assert.Equal(64, scan.Clusters);
        Assert.Equal(3 * MiB, scan.BytesRead); // the hole is compared without a read
    }

    [Fact]
    public void Update_OfAnInconsistentBitmap_KeepsWhatIsWrittenDuringTheScan()
    {
        using var f = new RawNodeFixture(4 << 20);
        f.Node.Write(0, Qcow2TestHelpers.Pattern(4 * MiB, 5));
        DirtyBitmap b = f.Node.AddBitmap("b");
        BackupJob job = BackupJob.Start(new BackupRequest { Source = f.Node, Target = Path.Combine(f.Folder, "full.img"), TargetFormat = ImageFormat.Raw, Sync = BackupSyncMode.Full, BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess });
        Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)) && job.Succeeded);
        f.Node.Write(MiB, new byte[] { 1 }); // a change the bitmap is made to forget below
        b.Clear();
        b.Inconsistent = true; // as loaded after a crash: its bits cannot be trusted
        bool wrote = false;
        BitmapContentUpdateResult r = BitmapContentUpdate.Run(f.Node, b, job.ManifestPath, progress: scanned =>
        {
            if (!wrote && scanned >= 2 * MiB)
            {
                wrote = true;
                f.Node.Write(0, new byte[] { 2 }); // behind the scan: only the successor can see it
            }
        });
        Assert.True(r.WasInconsistent);
        Assert.Equal(1, r.Scan.ClustersDiffering);
        Assert.False(b.Inconsistent);
        Assert.False(b.Busy);
        Assert.Equal([(0L, 65536L), ((long)MiB, 65536L)], b.GetDirtyRanges());
    }
}
