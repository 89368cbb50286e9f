using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Features we refuse, each refused with an error that names it; header bits that restrict writing; and backing
/// chains that cannot be opened (missing file, loops, too deep).
/// </summary>
public sealed class Qcow2FeatureTests
{
    private static BlockException Refused(string path, bool readOnly = true)
        => Assert.Throws<BlockException>(() => Qcow2Image.Open(path, readOnly).Dispose());

    [Theory]
    [InlineData("luks", "encryption")]
    [InlineData("extended_l2", "extended L2")]
    [InlineData("data_file", "external data file")]
    public void UnsupportedFeature_IsRefusedByName(string feature, string named)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("f.qcow2");
        string[] args = feature switch
        {
            "luks" => ["create", "-f", "qcow2", "--object", "secret,id=sec0,data=x", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", img, "1M"],
            "extended_l2" => ["create", "-f", "qcow2", "-o", "extended_l2=on", img, "1M"],
            "data_file" => ["create", "-f", "qcow2", "-o", $"data_file={dir.File("data.raw")}", img, "1M"],
            _ => throw new ArgumentOutOfRangeException(nameof(feature)),
        };
        QemuResult made = QemuImg.Run(args);
        // LUKS key setup times its PBKDF on the CPU and fails ("Unable to get accurate CPU usage") on a busy machine: retry.
        for (int attempt = 0; attempt < 5 && made.ExitCode != 0 && made.Stderr.Contains("CPU usage", StringComparison.Ordinal); attempt++)
        {
            File.Delete(img);
            made = QemuImg.Run(args);
        }
        made.EnsureSuccess();
        foreach (bool readOnly in new[] { true, false })
        {
            BlockException e = Refused(img, readOnly);
            Assert.Equal(ErrorIds.UnsupportedImageFeature, e.ErrorId);
            Assert.Contains(named, e.Message, StringComparison.OrdinalIgnoreCase);
            Assert.Contains(img, e.Message);
        }
    }

    [Fact]
    public void UnknownIncompatibleBit_IsRefused_UnknownCompatibleBitIsNot()
    {
        using var dir = new TempDirectory();
        string img = dir.File("u.qcow2");
        Qcow2Image.Create(img, MiB);
        PatchU64(img, 72, 1UL << 20);
        BlockException e = Refused(img);
        Assert.Equal(ErrorIds.UnsupportedImageFeature, e.ErrorId);
        Assert.Contains("incompatible feature bit 20", e.Message);

        PatchU64(img, 72, 0);
        PatchU64(img, 80, 1UL << 33); // compatible: ignored
        PatchU64(img, 88, 1UL << 40); // auto-clear: cleared by the first write
        using (var image = Qcow2Image.Open(img, readOnly: false))
            image.Write(0, new byte[512]);
        Assert.Equal(0UL, ReadU64(img, 88));
    }

    [Fact]
    public void DirtyAndCorruptBits_AllowReadingOnly()
    {
        using var dir = new TempDirectory();
        string img = dir.File("d.qcow2");
        Qcow2Image.Create(img, MiB);
        PatchU64(img, 72, (ulong)Qcow2IncompatibleFeatures.Dirty);
        using (var image = Qcow2Image.Open(img, readOnly: true))
            Assert.True(image.IsDirty);
        BlockException e = Refused(img, readOnly: false);
        Assert.Equal(ErrorIds.ImageCorrupt, e.ErrorId);
        Assert.Contains("qemu-img check -r all", e.Message);

        PatchU64(img, 72, (ulong)Qcow2IncompatibleFeatures.Corrupt);
        using (var image = Qcow2Image.Open(img, readOnly: true))
            Assert.True(image.IsCorrupt);
        e = Refused(img, readOnly: false);
        Assert.Equal(ErrorIds.ImageCorrupt, e.ErrorId);
        Assert.Contains("corrupt", e.Message);
    }

    [Theory]
    [InlineData(1u)]
    [InlineData(4u)]
    public void OtherVersions_AreRefused(uint version)
    {
        using var dir = new TempDirectory();
        string img = dir.File("v.qcow2");
        Qcow2Image.Create(img, MiB);
        PatchU32(img, 4, version);
        BlockException e = Refused(img);
        Assert.Equal(ErrorIds.UnsupportedImageFeature, e.ErrorId);
        Assert.Contains($"version {version}", e.Message);
    }

    [Fact]
    public void NotQcow2_IsUnsupportedFormat()
    {
        using var dir = new TempDirectory();
        string raw = dir.File("r.raw");
        File.WriteAllBytes(raw, new byte[4096]);
        Assert.Equal(ErrorIds.UnsupportedFormat, Refused(raw).ErrorId);
        Assert.Equal(ErrorIds.ImageNotFound, Refused(dir.File("missing.qcow2")).ErrorId);
    }

    [Fact]
    public void MissingBacking_IsBackingFileNotFound()
    {
        using var dir = new TempDirectory();
        string img = dir.File("o.qcow2");
        Qcow2Image.Create(img, MiB, backingFile: "gone.qcow2", backingFormat: ImageFormat.Qcow2);
        BlockException e = Refused(img);
        Assert.Equal(ErrorIds.BackingFileNotFound, e.ErrorId);
        Assert.Contains("gone.qcow2", e.Message);
    }

    [Fact]
    public void BackingLoops_AreRefused()
    {
        using var dir = new TempDirectory();
        string self = dir.File("self.qcow2");
        Qcow2Image.Create(self, MiB, backingFile: "self.qcow2", backingFormat: ImageFormat.Qcow2);
        Assert.Equal(ErrorIds.BackingChainLoop, Refused(self).ErrorId);

        string a = dir.File("a.qcow2");
        string b = dir.File("b.qcow2");
        Qcow2Image.Create(a, MiB, backingFile: "b.qcow2", backingFormat: ImageFormat.Qcow2);
        Qcow2Image.Create(b, MiB, backingFile: Path.Combine(dir.Path, "a.qcow2"), backingFormat: ImageFormat.Qcow2);
        Assert.Equal(ErrorIds.BackingChainLoop, Refused(a).ErrorId);
        Assert.Equal(ErrorIds.BackingChainLoop, Refused(b, readOnly: false).ErrorId);
    }

    [Fact]
    public void UnsupportedBackingFormat_IsNamed()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string vmdk = dir.File("b.vmdk");
        QemuImg.RunOk("create", "-f", "vmdk", vmdk, "1M");
        string img = dir.File("o.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-b", "b.vmdk", "-F", "vmdk", img, "1M");
        BlockException e = Refused(img);
        Assert.Equal(ErrorIds.UnsupportedFormat, e.ErrorId);
        Assert.Contains("vmdk", e.Message);
    }

    [Fact]
    public void RecordedRawBackingFormat_IsNotProbed()
    {
        using var dir = new TempDirectory();
        string q = dir.File("looks-like.qcow2");
        Qcow2Image.Create(q, MiB);
        byte[] fileBytes = File.ReadAllBytes(q);
        string img = dir.File("o.qcow2");
        Qcow2Image.Create(img, MiB, backingFile: "looks-like.qcow2", backingFormat: ImageFormat.Raw);
        using var image = Qcow2Image.Open(img, readOnly: true);
        Assert.Equal(ImageFormat.Raw, image.BackingFormat);
        var head = new byte[512];
        image.Read(0, head);
        AssertBytesEqual(fileBytes.AsSpan(0, 512), head, "raw view of the backing file");
    }

    [Fact]
    public void BackingFormat_IsProbedWhenNotRecorded()
    {
        using var dir = new TempDirectory();
        Qcow2Image.Create(dir.File("b.qcow2"), MiB);
        string img = dir.File("o.qcow2");
        Qcow2Image.Create(img, MiB, backingFile: "b.qcow2"); // probed at create: recorded as qcow2
        using (var image = Qcow2Image.Open(img, readOnly: true))
            Assert.Equal("qcow2", image.BackingFormatName);

        string unrecorded = dir.File("u.qcow2");
        Qcow2Image.Create(unrecorded, MiB, backingFile: "later.qcow2"); // missing at create: nothing recorded
        Qcow2Image.Create(dir.File("later.qcow2"), MiB);
        using (var image = Qcow2Image.Open(unrecorded, readOnly: true))
        {
            Assert.Null(image.BackingFormatName);
            Assert.Equal(ImageFormat.Qcow2, image.BackingFormat);
        }
    }

    internal static void PatchU64(string path, long offset, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        Patch(path, offset, b);
    }

    internal static void PatchU32(string path, long offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        Patch(path, offset, b);
    }

    private static void Patch(string path, long offset, ReadOnlySpan<byte> bytes)
    {
        using FileStream fs = File.Open(path, FileMode.Open, FileAccess.Write);
        fs.Position = offset;
        fs.Write(bytes);
    }

    private static ulong ReadU64(string path, long offset)
    {
        var b = new byte[8];
        using FileStream fs = File.OpenRead(path);
        fs.Position = offset;
        fs.ReadExactly(b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }
}
