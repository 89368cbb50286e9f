using System.Buffers.Binary;
using System.Security.Cryptography;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Testing;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Writes that fail, at the file's system calls or because the image is corrupt: the range is marked dirty whatever
/// happened (QEMU's rule), a refusal changes no byte of the file, what a failed write allocated is given back (qemu-img
/// check finds no leak), a close that cannot sync or store keeps the node open, and a backup always concludes.
/// Faults are injected at the file boundary (<see cref="FaultOperation.FileWrite"/>, <see cref="FaultOperation.FileSync"/>);
/// the Pester fault campaign does the same with a real full filesystem.
/// </summary>
public sealed class FailedWriteTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;

    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    /// <summary>Run <paramref name="action"/> with a fault rule that is removed afterwards (other tests keep theirs).</summary>
    private static void WithFault(FaultRule rule, Action action)
    {
        try
        {
            action();
        }
        finally
        {
            FaultInjection.Remove(rule);
        }
    }

    private static (BlockEngine Engine, BlockNode Node) OpenQcow2(TempDirectory dir, string name, long size = 8 * MiB)
    {
        string path = dir.File(name + ".qcow2");
        BlockEngine.CreateImage(path, size, ImageFormat.Qcow2);
        var engine = new BlockEngine();
        return (engine, engine.Open(path, name));
    }

    [Fact]
    public void Qcow2_FailedDataWrite_IsMarked_AndLeavesNoLeak()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (BlockEngine engine, BlockNode node) = OpenQcow2(dir, "fail");
        DirtyBitmap b = node.AddBitmap("b", persistent: true);
        node.Write(0, Qcow2TestHelpers.Pattern(64 * KiB, 1));
        node.Flush();
        long end = new FileInfo(node.Path).Length;
        // New clusters go at the end of the file: every write there fails, as on a full disk.
        WithFault(FaultInjection.Add(node.Path, FaultOperation.FileWrite, offset: end, times: -1), () =>
        {
            Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => node.Write(2 * MiB + 512, new byte[200 * KiB])));     // partial first cluster: copy-on-write
            Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => node.Write(4 * MiB, Qcow2TestHelpers.Pattern(128 * KiB, 2)))); // whole clusters
        });
        Assert.Equal([(0L, 64L * KiB), (2L * MiB, 256L * KiB), (4L * MiB, 128L * KiB)], b.GetDirtyRanges());
        node.Write(6 * MiB, Qcow2TestHelpers.Pattern(64 * KiB, 3)); // the node goes on working once the disk does
        engine.Close(node);
        QemuImg.AssertClean(node.Path);
        StoredBitmap stored = Assert.Single(Qcow2BitmapNodes.Load(node.Path));
        Assert.False(stored.InUse);
        Assert.Equal(256 * KiB + 64 * KiB + 128 * KiB + 64 * KiB, stored.Count);
    }

    [Fact]
    public void Qcow2_FailedCompressedWrite_LeavesNoLeak()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = dir.File("c.qcow2");
        Qcow2Image.Create(path, 4 * MiB, 65536);
        using (Qcow2Image image = Qcow2Image.Open(path, readOnly: false))
        {
            byte[] text = new byte[128 * KiB];
            text.AsSpan().Fill((byte)'a');
            image.WriteCompressed(0, text.AsSpan(0, 64 * KiB));
            image.Flush();
            long end = new FileInfo(path).Length;
            WithFault(FaultInjection.Add(path, FaultOperation.FileWrite, offset: end, times: -1), () =>
                Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => image.WriteCompressed(64 * KiB, text))));
            image.Flush();
        }
        QemuImg.AssertClean(path);
    }

    [Fact]
    public void Close_ThatCannotSync_KeepsTheNodeOpen_WithItsBitmapsInUse_AndCanBeRetried()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        (BlockEngine engine, BlockNode node) = OpenQcow2(dir, "retry");
        DirtyBitmap b = node.AddBitmap("p", persistent: true);
        node.Write(MiB, Qcow2TestHelpers.Pattern(100 * KiB, 4));
        WithFault(FaultInjection.Add(node.Path, FaultOperation.FileSync, times: -1), () =>
        {
            Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => engine.Close(node)));
            Assert.Same(node, engine.Find(node.Name));
            Assert.False(node.IsClosed);
        });
        Assert.True(QemuImg.Run("info", "-U", "--output=json", node.Path).ExitCode == 0);
        node.Write(3 * MiB, new byte[512]); // still usable
        Assert.Equal(2 * 64 * KiB + 64 * KiB, b.Count);
        engine.Close(node);
        Assert.Null(engine.Find(node.Name));
        QemuImg.AssertClean(node.Path);
        StoredBitmap stored = Assert.Single(Qcow2BitmapNodes.Load(node.Path));
        Assert.False(stored.InUse);
        Assert.Equal([(16L, 2L), (48L, 1L)], stored.Bits!.Runs().ToArray());
    }

    [Fact]
    public void Raw_SidecarStoreThatFails_LeavesNoTemporaryFile_AndTheBitmapInUse()
    {
        using var f = new RawNodeFixture(1 << 20);
        f.Node.AddBitmap("p", persistent: true);
        f.Node.Write(0, new byte[10]);
        string sidecar = f.Node.Path + RawBitmapSidecar.Suffix;
        WithFault(FaultInjection.Add(sidecar + ".tmp", FaultOperation.FileWrite, times: -1), () =>
            Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => f.Engine.Close(f.Node))));
        Assert.False(File.Exists(sidecar + ".tmp"));
        Assert.True(Assert.Single(new RawBitmapSidecar(f.Node.Path).Load()).InUse); // a crash now: inconsistent, never clean
        f.Engine.Close(f.Node);
        StoredBitmap stored = Assert.Single(new RawBitmapSidecar(f.Node.Path).Load());
        Assert.False(stored.InUse);
        Assert.Equal(65536, stored.Count);
    }

    [Fact]
    public void WriteThrough_SyncsEveryWrite_AndAFailedSyncFailsTheWriteButMarksIt()
    {
        using var dir = new TempDirectory();
        string path = dir.File("wt.qcow2");
        BlockEngine.CreateImage(path, 4 * MiB, ImageFormat.Qcow2);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "wt", cache: CacheMode.WriteThrough);
        try
        {
            DirtyBitmap b = node.AddBitmap("b");
            node.Write(0, new byte[512]);
            Assert.False(node.HasUnsyncedWrites);
            WithFault(FaultInjection.Add(path, FaultOperation.FileSync, times: 1), () =>
                Assert.Equal(ErrorIds.ImageIOFailed, ErrorId(() => node.Write(MiB, new byte[512]))));
            Assert.Equal(2 * 64 * KiB, b.Count);
            Assert.True(node.HasUnsyncedWrites); // the next sync tries again
            node.Flush();
            Assert.False(node.HasUnsyncedWrites);
        }
        finally
        {
            engine.CloseAll();
        }
    }

    [Fact]
    public void WriteBack_WritesMetadataBackWithinTheWindow()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = dir.File("wb.qcow2");
        string raw = dir.File("wb.raw");
        BlockEngine.CreateImage(path, 4 * MiB, ImageFormat.Qcow2);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "wb");
        try
        {
            node.WriteBackWindow = TimeSpan.FromMilliseconds(200);
            byte[] data = Qcow2TestHelpers.Pattern(MiB, 5);
            node.Write(MiB, data);
            Assert.True(node.HasUnsyncedWrites);
            Assert.True(SpinWait.SpinUntil(() => !node.HasUnsyncedWrites, TimeSpan.FromSeconds(10)));
            var all = new byte[4 * MiB];
            data.CopyTo(all, MiB);
            File.WriteAllBytes(raw, all);
            // What another process reads from the file now is what the node reads: the metadata is on disk.
            Assert.Equal(0, QemuImg.Run("compare", "-U", "-f", "qcow2", "-F", "raw", path, raw).ExitCode);
        }
        finally
        {
            engine.CloseAll();
        }
    }

    [Fact]
    public void Backup_WhoseCommitCannotSync_FailsAndKeepsEveryBit_AndItsTargetIsGone()
    {
        using var f = new RawNodeFixture(4 << 20);
        DirtyBitmap b = f.Node.AddBitmap("b");
        f.Node.Write(0, Qcow2TestHelpers.Pattern(MiB, 6));
        string target = Path.Combine(f.Folder, "t.qcow2");
        BackupJob job = BackupJob.Start(new BackupRequest
        {
            Source = f.Node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full,
            BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess, BytesPerSecond = 4 * MiB,
        });
        // Created (and synced) already; from now on every sync of the target fails: its commit cannot be made durable.
        FaultRule rule = FaultInjection.Add(target + BackupTarget.PartialSuffix, FaultOperation.FileSync, times: -1);
        try
        {
            Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)));
        }
        finally
        {
            FaultInjection.Remove(rule);
        }
        Assert.Equal(BlockJobStatus.Concluded, job.Status);
        Assert.Equal(ErrorIds.ImageIOFailed, job.Error!.ErrorId);
        Assert.False(File.Exists(target));
        Assert.False(File.Exists(target + BackupTarget.PartialSuffix));
        Assert.False(b.Busy);
        Assert.Equal(16 * 65536, b.Count);
        // and the next backup succeeds
        BackupJob retry = BackupJob.Start(new BackupRequest
        {
            Source = f.Node, Target = target, TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full,
            BitmapName = "b", BitmapMode = BitmapSyncMode.OnSuccess,
        });
        Assert.True(retry.Completion.Wait(TimeSpan.FromSeconds(30)));
        Assert.True(retry.Succeeded, retry.Error?.Message);
        Assert.Equal(0, b.Count);
    }

    #region Corrupt L2 entries (qemu-iotests 060)

    /// <summary>An image qemu-img made, cluster 0 written by qemu-io, then its L2 entry set to <paramref name="entry"/>.</summary>
    private static string CorruptImage(TempDirectory dir, ulong entry, bool compressed = false)
    {
        string path = dir.File($"c{entry:x}.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", path, "64M");
        QemuImg.IoOk(path, compressed ? "write -c -P 0x11 0 64k" : "write -P 0x11 0 64k");
        if (!compressed)
            PatchL2Entry(path, 0, entry);
        return path;
    }

    private static long L2TableOffset(string path)
    {
        using FileStream fs = File.Open(path, FileMode.Open, FileAccess.Read);
        var buf = new byte[8];
        fs.Position = 40;
        fs.ReadExactly(buf);
        fs.Position = (long)BinaryPrimitives.ReadUInt64BigEndian(buf); // L1 table
        fs.ReadExactly(buf);
        return (long)(BinaryPrimitives.ReadUInt64BigEndian(buf) & 0x00ff_ffff_ffff_fe00UL);
    }

    private static void PatchL2Entry(string path, int index, ulong entry)
    {
        long l2 = L2TableOffset(path);
        using FileStream fs = File.Open(path, FileMode.Open, FileAccess.ReadWrite);
        var buf = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(buf, entry);
        fs.Position = l2 + (index * 8);
        fs.Write(buf);
    }

    private static ulong ReadL2Entry(string path, int index)
    {
        long l2 = L2TableOffset(path);
        using FileStream fs = File.Open(path, FileMode.Open, FileAccess.Read);
        var buf = new byte[8];
        fs.Position = l2 + (index * 8);
        fs.ReadExactly(buf);
        return BinaryPrimitives.ReadUInt64BigEndian(buf);
    }

    private static byte[] Hash(string path) => SHA256.HashData(File.ReadAllBytes(path));

    [Theory]
    [InlineData(0x8000_0000_0005_2a01UL)] // unaligned pre-allocated zero cluster
    [InlineData(0x4000_0000_1000_0000UL)] // compressed, past the end of the file
    [InlineData(0x4000_0000_0000_0100UL)] // compressed, into the header
    [InlineData(0x8000_0000_0001_0001UL)] // zero cluster on the refcount table
    public void WriteOverACorruptEntry_IsRefused_ChangesNoByte_IsMarked_AndLeaksNothing(ulong entry)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = CorruptImage(dir, entry);
        int leaksBefore = QemuImg.Check(path).Leaks;
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "z");
        try
        {
            DirtyBitmap b = node.AddBitmap("b");
            Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => node.Write(0, new byte[512])));
            Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => node.Write(0, new byte[64 * KiB])));
            Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => node.WriteZeroes(0, 64 * KiB)));
            Assert.Equal([(0L, 64L * KiB)], b.GetDirtyRanges()); // refused, yet marked: whatever a failed write did
            // The first refusal marked the image corrupt, as QEMU does: read-only from here on, reads of sound clusters work.
            Assert.True(node.ReadOnly);
            Assert.True(((Qcow2Image)node.Image).IsCorrupt);
            Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => node.Write(MiB, new byte[512])));
            var sound = new byte[512];
            node.Read(2 * MiB, sound);
            engine.Close(node);
        }
        finally
        {
            engine.CloseAll();
        }
        Assert.Equal(entry, ReadL2Entry(path, 0));
        QemuCheck check = QemuImg.Check(path);
        Assert.Equal(leaksBefore, check.Leaks);
        Assert.Contains("corrupt", QemuImg.RunOk("info", path), StringComparison.OrdinalIgnoreCase);
        // qemu-img refuses to write it too, until it is repaired
        Assert.NotEqual(0, QemuImg.Io("-c", "write -P 0x33 1M 512", path).ExitCode);
        using (Qcow2Image ro = Qcow2Image.Open(path, readOnly: true))
        {
            var back = new byte[512];
            ro.Read(2 * MiB, back); // read-only opens are allowed: rescue what can be read
            // The damaged cluster reads as QEMU reads it: an error where qemu-io fails, the same bytes where it does not.
            QemuResult theirs = QemuImg.Io("-r", "-c", "read -v 0 16", path);
            if ((theirs.Stdout + theirs.Stderr).Contains("read failed", StringComparison.Ordinal))
                Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => ro.Read(0, back)));
            else
            {
                ro.Read(0, back);
                Assert.Contains(back[0] == 0x11 ? "11 11 11 11" : "00 00 00 00", theirs.Stdout, StringComparison.Ordinal);
            }
        }
        Assert.Equal(ErrorIds.ImageCorrupt, Assert.Throws<BlockException>(() => new BlockEngine().Open(path, "again")).ErrorId);
        QemuImg.Run("check", "-r", "all", path);
        bool repairedByQemu = QemuImg.Check(path).ExitCode == 0;
        var repaired = new BlockEngine();
        try
        {
            if (repairedByQemu)
            {
                BlockNode again = repaired.Open(path, "again"); // writable again once repaired
                Assert.False(again.ReadOnly);
                again.Write(3 * MiB, new byte[512]);
            }
            else
            {
                // what qemu-img cannot repair (a compressed cluster past the end of the file) keeps the corrupt bit
                Assert.Equal(ErrorIds.ImageCorrupt, Assert.Throws<BlockException>(() => repaired.Open(path, "again")).ErrorId);
            }
        }
        finally
        {
            repaired.CloseAll();
        }
    }

    [Fact]
    public void RefusedWrite_ChangesNoByteOfTheFile()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = CorruptImage(dir, 0x8000_0000_0005_2a01UL);
        byte[] before = HashWithoutCorruptBit(path);
        var engine = new BlockEngine();
        try
        {
            BlockNode node = engine.Open(path, "z");
            Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => node.Write(0, new byte[512])));
            engine.Close(node);
        }
        finally
        {
            engine.CloseAll();
        }
        Assert.Equal(before, HashWithoutCorruptBit(path));
    }

    /// <summary>The file's hash with incompatible-feature bit 1 (corrupt) cleared: a refusal may set that bit, nothing else.</summary>
    private static byte[] HashWithoutCorruptBit(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        bytes[72 + 7] &= unchecked((byte)~2);
        return SHA256.HashData(bytes);
    }

    [Fact]
    public void RefusedWriteIntoADamagedCompressedCluster_LeaksNothing()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = CorruptImage(dir, 0, compressed: true);
        ulong entry = ReadL2Entry(path, 0);
        Assert.NotEqual(0UL, entry & 0x4000_0000_0000_0000UL);
        long dataOffset = (long)(entry & ((1UL << 54) - 1)); // 64 KiB clusters: offset in bits 0-53
        using (FileStream fs = File.Open(path, FileMode.Open, FileAccess.ReadWrite))
        {
            fs.Position = dataOffset;
            fs.Write(Enumerable.Repeat((byte)0xff, 512).ToArray());
        }
        byte[] before = HashWithoutCorruptBit(path);
        var engine = new BlockEngine();
        try
        {
            BlockNode node = engine.Open(path, "d");
            Assert.Equal(ErrorIds.ImageCorrupt, ErrorId(() => node.Write(512, new byte[512])));
            engine.Close(node);
        }
        finally
        {
            engine.CloseAll();
        }
        Assert.Equal(before, HashWithoutCorruptBit(path));
        Assert.Equal(0, QemuImg.Check(path).Leaks);
        QemuImg.RunOk("check", "-r", "all", path); // clears the corrupt bit (and the damaged cluster stays as it is)
        QemuImg.IoOk(path, "write -P 0x22 1M 64k");
        Assert.Equal(0, QemuImg.Check(path).Leaks);
    }

    #endregion
}
