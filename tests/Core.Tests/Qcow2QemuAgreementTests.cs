using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Where QEMU and this driver must read an image the same way (issue 24): the virtual size in whole sectors, entries
/// QEMU calls invalid refused on read (not read as zeros), and a seeded mutation loop compared with qemu-img itself:
/// reads equal to qemu-img convert wherever both accept the image, and qemu-img check never worse after a writable
/// open and close.
/// </summary>
public sealed class Qcow2QemuAgreementTests
{
    private const int MiB = 1 << 20;

    [Fact]
    public void VirtualSize_IsReadInWholeSectors_AsQemuReadsIt_AndABitmapStoredThenStaysReadableForQemu()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = dir.File("r.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096", path, "17M");
        using (FileStream fs = File.Open(path, FileMode.Open, FileAccess.ReadWrite))
        {
            var size = new byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(size, (16UL << 20) + 1);
            fs.Position = 24;
            fs.Write(size);
        }
        Assert.Equal(16L << 20, QemuImg.Info(path).GetProperty("virtual-size").GetInt64());
        var engine = new BlockEngine();
        try
        {
            BlockNode node = engine.Open(path, "r");
            Assert.Equal(16L << 20, node.Size);
            Assert.Equal(ErrorIds.OffsetOutOfRange, Assert.Throws<BlockException>(() => node.Read((16L << 20) - 1, new byte[2])).ErrorId);
            node.AddBitmap("b", 512, persistent: true);
            node.Write(0, new byte[512]);
            engine.Close(node);
        }
        finally
        {
            engine.CloseAll();
        }
        QemuImg.AssertClean(path);
        Assert.Contains("\"name\": \"b\"", QemuImg.RunOk("info", "--output=json", path), StringComparison.Ordinal);
        QemuImg.RunOk("convert", "-O", "raw", path, dir.File("r.raw"));
    }

    /// <summary>An image qemu-img made, cluster 0 written by qemu-io, then its L2 entry 0 set to <paramref name="entry"/>.</summary>
    private static string ImageWithEntry(TempDirectory dir, Func<long, ulong> entry)
    {
        string path = dir.File($"e{Guid.NewGuid():N}.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", path, "64M");
        QemuImg.IoOk(path, "write -P 0x11 0 64k", "write -P 0x22 1M 64k");
        using FileStream fs = File.Open(path, FileMode.Open, FileAccess.ReadWrite);
        var buf = new byte[8];
        fs.Position = 40;
        fs.ReadExactly(buf);
        fs.Position = (long)BinaryPrimitives.ReadUInt64BigEndian(buf);
        fs.ReadExactly(buf);
        long l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(buf) & Qcow2L2Entry.OffsetMask);
        BinaryPrimitives.WriteUInt64BigEndian(buf, entry(l2));
        fs.Position = l2;
        fs.Write(buf);
        return path;
    }

    [Theory]
    [InlineData("reserved bit 1 of an allocated entry")]
    [InlineData("reserved bit 60 of an unallocated entry")]
    [InlineData("zero cluster at an unaligned host offset")]
    [InlineData("data cluster at an unaligned host offset")]
    [InlineData("data on its own L2 table")]
    public void DamagedEntries_ReadAsQemuReadsThem_AnErrorWhereQemuFails_NeverZerosInstead(string what)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string path = ImageWithEntry(dir, l2 => what switch
        {
            "reserved bit 1 of an allocated entry" => Qcow2L2Entry.CopiedFlag | 0x50000UL | 2UL,
            "reserved bit 60 of an unallocated entry" => 1UL << 60,
            "zero cluster at an unaligned host offset" => Qcow2L2Entry.CopiedFlag | 0x52a00UL | 1UL,
            "data cluster at an unaligned host offset" => Qcow2L2Entry.CopiedFlag | 0x50200UL,
            _ => Qcow2L2Entry.CopiedFlag | (ulong)l2,
        });
        QemuResult theirs = QemuImg.Io("-r", "-c", "read -v 0 16", path);
        using var image = Qcow2Image.Open(path, readOnly: true);
        var buffer = new byte[16];
        if ((theirs.Stdout + theirs.Stderr).Contains("read failed", StringComparison.Ordinal))
        {
            Assert.Equal(ErrorIds.ImageCorrupt, Assert.Throws<BlockException>(() => image.Read(0, buffer)).ErrorId);
        }
        else
        {
            image.Read(0, buffer);
            string hex = string.Join(' ', buffer.Select(b => b.ToString("x2")));
            Assert.Contains(hex, theirs.Stdout, StringComparison.Ordinal);
        }
        var rest = new byte[512];
        image.Read(MiB, rest); // the rest reads normally
        Assert.Equal(0x22, rest[0]);
    }

    [Theory]
    [InlineData("qemu-v3-64k-bitmaps")]
    [InlineData("compressed")]
    [InlineData("qemu-v2-4k")]
    public void Mutants_ReadAsQemuReadsThem_AndAWritableOpenNeverMakesQemuCheckWorse(string baseName)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        byte[] original = Qcow2HostileImageTests.MakeBase(baseName, dir);
        string path = dir.File("mutant.qcow2");
        string raw = dir.File("mutant.raw");
        var failures = new List<string>();
        int compared = 0, cases = 0;
        foreach ((string name, byte[] bytes) in Qcow2HostileImageTests.Mutations(original, 24 + baseName.Length).Where((_, i) => i % 9 == 0).Take(100)) // spread over the mutation kinds
        {
            cases++;
            File.WriteAllBytes(path, bytes);
            File.Delete(raw);
            bool qemuReads = QemuImg.Run("convert", "-f", "qcow2", "-O", "raw", path, raw).ExitCode == 0;
            byte[]? ours = null;
            try
            {
                using var image = Qcow2Image.Open(path, readOnly: true);
                ours = Qcow2TestHelpers.ReadAll(image);
            }
            catch (BlockException)
            {
            }
            catch (Exception e)
            {
                failures.Add($"{name}: {e.GetType().Name} {e.Message}");
                continue;
            }
            if (qemuReads && ours is not null)
            {
                compared++;
                byte[] theirs = File.ReadAllBytes(raw);
                if (theirs.Length != ours.Length || !theirs.AsSpan().SequenceEqual(ours))
                    failures.Add($"{name}: reads differ from qemu-img convert (first difference at {theirs.AsSpan().CommonPrefixLength(ours)})");
            }
            if (TryCheck(path) is not { } before)
                continue; // not a qcow2 image for qemu-img any more
            try
            {
                using var image = Qcow2Image.Open(path, readOnly: false);
            }
            catch (BlockException)
            {
            }
            QemuCheck after = TryCheck(path) ?? before;
            if (after.Corruptions > before.Corruptions || after.Leaks > before.Leaks || after.CheckErrors > before.CheckErrors)
                failures.Add($"{name}: qemu-img check got worse after a writable open and close: {before.Corruptions}/{before.Leaks}/{before.CheckErrors} -> {after.Corruptions}/{after.Leaks}/{after.CheckErrors}");
            if (failures.Count >= 10)
                break;
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {cases} mutants of {baseName}:\n" + string.Join("\n", failures));
        Assert.True(compared >= 10, $"only {compared} of {cases} mutants were read by both");
    }

    /// <summary>qemu-img check of an image qemu-img can check, or null (it is no qcow2 image for it, or check cannot run).</summary>
    private static QemuCheck? TryCheck(string path)
    {
        QemuResult r = QemuImg.Run("check", "--output=json", "-f", "qcow2", path);
        return r.ExitCode is 0 or 2 or 3 && r.Stdout.TrimStart().StartsWith('{') ? QemuImg.Check(path) : null;
    }
}
