using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Raw images on block devices (issue 17), on real loop devices: size and sector sizes from the kernel, zeroing and
/// discarding in the device, a size that only the device changes, and the identity the bitmap state folder keys by.
/// Skipped without root and /dev/loop-control. Cmdlet-level behaviour: tests/Pester/BlockDevices.Tests.ps1.
/// </summary>
public sealed class BlockDeviceTests
{
    private const long Size = 16 << 20;

    [Fact]
    public void ADeviceHasTheKernelsSizeAndSectorSizes()
    {
        using LoopDevice loop = LoopDevice.Create(Size);
        using var image = Assert.IsType<RawImage>(BlockEngine.OpenImage(loop.Device, readOnly: true));
        Assert.Equal(Size, image.Size);
        Assert.NotNull(image.Device);
        Assert.Equal(512, image.Device!.LogicalSectorSize);
        Assert.True(image.Device.PhysicalSectorSize >= 512);
        Assert.Equal(7u, image.Device.Major); // the loop driver's major number
        Assert.All(image.GetAllocation(0, Size), e => Assert.Equal(AllocationState.Data, e.State)); // a device has no holes to report
    }

    [Fact]
    public void ZeroingAndDiscardingWorkAlignedOrNotAndTouchNothingOutside()
    {
        using LoopDevice loop = LoopDevice.Create(Size);
        byte[] ones = new byte[Size];
        Array.Fill(ones, (byte)0xCD);
        using (var image = (RawImage)BlockEngine.OpenImage(loop.Device, readOnly: false))
        {
            image.Write(0, ones);
            image.WriteZeroes(100, (1 << 20) + 300);            // unaligned head and tail around an aligned middle
            image.WriteZeroes(4 << 20, 200);                     // no whole sector: plain zeros
            image.Discard(8 << 20, 2 << 20);                     // a loop device discards by punching its file
            image.Flush();
        }
        byte[] read = File.ReadAllBytes(loop.BackingFile);
        Assert.Equal(0xCD, read[99]);
        Assert.DoesNotContain(read.AsSpan(100, (1 << 20) + 300).ToArray(), b => b != 0);
        Assert.Equal(0xCD, read[(1 << 20) + 400]);
        Assert.DoesNotContain(read.AsSpan(4 << 20, 200).ToArray(), b => b != 0);
        Assert.Equal(0xCD, read[(4 << 20) + 200]);
        Assert.Equal(0xCD, read[(8 << 20) - 1]);
        Assert.DoesNotContain(read.AsSpan(8 << 20, 2 << 20).ToArray(), b => b != 0); // the loop driver punched its file
        Assert.Equal(0xCD, read[10 << 20]);
    }

    [Fact]
    public void ADevicesSizeIsTheDevicesAndFollowsItWhenItGrows()
    {
        using LoopDevice loop = LoopDevice.Create(Size);
        var engine = new BlockEngine();
        BlockNode node = engine.Open(loop.Device, "lo");
        try
        {
            Assert.Equal(ErrorIds.DeviceSizeFixed, Assert.Throws<BlockException>(() => node.Resize(2 * Size)).ErrorId);
            using (var f = new FileStream(loop.BackingFile, FileMode.Open))
                f.SetLength(2 * Size);
            Assert.Equal(0, LoopDevice.Run("losetup", "-c", loop.Device).ExitCode);
            node.Resize(2 * Size);
            Assert.Equal(2 * Size, node.Size);
        }
        finally
        {
            engine.CloseAll();
        }
    }

    [Fact]
    public void ALoopDeviceIsKeyedByItsBackingFileSoAnotherFileAtTheSameDeviceIsAnotherDisk()
    {
        using LoopDevice loop = LoopDevice.Create(Size);
        string key;
        using (var image = (RawImage)BlockEngine.OpenImage(loop.Device, readOnly: true))
        {
            key = image.Identity!.Key;
            Assert.StartsWith("loop/", key);
            Assert.IsType<StateFolderBitmapStore>(BlockEngine.StoreFor(image, Path.Combine(Path.GetDirectoryName(loop.BackingFile)!, "state")));
        }
        string other = loop.BackingFile + ".other";
        using (var f = new FileStream(other, FileMode.CreateNew))
            f.SetLength(Size);
        Assert.Equal(0, LoopDevice.Run("losetup", "-d", loop.Device).ExitCode);
        Assert.Equal(0, LoopDevice.Run("losetup", loop.Device, other).ExitCode);
        using (var image = (RawImage)BlockEngine.OpenImage(loop.Device, readOnly: true))
            Assert.NotEqual(key, image.Identity!.Key);
    }
}
