using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Seeded random operations applied alike to raw images and to qcow2 images (a fresh one and an overlay on a
/// qemu-made base), compared after every batch through the driver and through qemu-img (check and compare).
/// </summary>
public sealed class Qcow2RandomizedTests
{
    [Theory]
    [InlineData(1, 512)]
    [InlineData(2, 4096)]
    [InlineData(3, 65536)]
    public void RandomOperations_KeepQcow2AndRawEqual(int seed, int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        var rng = new Random(seed);
        long size = 3 * MiB + 512;

        string baseImg = dir.File("base.qcow2");
        QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=65536", baseImg, (2 * MiB).ToString());
        QemuImg.IoOk(baseImg, "write -P 0x5a 0 2M", "write -z 300000 200000", "write -P 0x5b 1M 100000");
        string overlayRaw = dir.File("overlay.raw");
        QemuImg.RunOk("convert", "-O", "raw", baseImg, overlayRaw);
        using (FileStream fs = File.OpenWrite(overlayRaw))
            fs.SetLength(size);

        string plain = dir.File("plain.qcow2");
        string plainRaw = dir.File("plain.raw");
        string overlay = dir.File("overlay.qcow2");
        Qcow2Image.Create(plain, size, clusterSize);
        RawImage.Create(plainRaw, size);
        Qcow2Image.Create(overlay, size, clusterSize, "base.qcow2", ImageFormat.Qcow2);

        using var q1 = Qcow2Image.Open(plain, readOnly: false);
        using var r1 = RawImage.Open(plainRaw, readOnly: false);
        using var q2 = Qcow2Image.Open(overlay, readOnly: false);
        using var r2 = RawImage.Open(overlayRaw, readOnly: false);
        (IBlockImage Image, IBlockImage Mirror, string Path, string RawPath)[] pairs =
            [(q1, r1, plain, plainRaw), (q2, r2, overlay, overlayRaw)];

        for (int batch = 0; batch < 5; batch++)
        {
            for (int i = 0; i < 40; i++)
            {
                long current = q1.Size;
                int kind = rng.Next(20);
                if (kind == 0 && batch > 0)
                {
                    long newSize = (rng.NextInt64(MiB, 5 * MiB) / 512) * 512;
                    foreach (var p in pairs)
                    {
                        p.Image.Resize(newSize);
                        p.Mirror.Resize(newSize);
                    }
                    continue;
                }
                bool aligned = rng.Next(3) == 0;
                long offset = aligned ? rng.NextInt64(current / clusterSize) * clusterSize : rng.NextInt64(current);
                int length = (int)Math.Min(current - offset, aligned ? clusterSize * rng.Next(1, 4) : rng.Next(1, 3 * clusterSize));
                if (length == 0)
                    continue;
                bool zero = kind < 6;
                byte[] data = zero ? [] : Pattern(length, rng.Next());
                foreach (var p in pairs)
                {
                    foreach (IBlockImage target in new[] { p.Image, p.Mirror })
                    {
                        if (zero)
                            target.WriteZeroes(offset, length);
                        else
                            target.Write(offset, data);
                    }
                }
            }
            foreach (var p in pairs)
            {
                AssertBytesEqual(ReadAll(p.Mirror), ReadAll(p.Image), $"{Path.GetFileName(p.Path)} after batch {batch}");
                p.Image.Flush();
                p.Mirror.Flush();
                // both images stay open here, so qemu-img reads them with -U
                QemuImg.AssertClean(p.Path, forceShare: true);
                QemuImg.AssertSameContents(p.Path, p.RawPath, forceShare: true);
                Assert.Equal(Describe(QemuImg.TopLayerMap(p.Path, forceShare: true)), Describe(AllocationOf(p.Image)));
            }
        }
    }
}
