using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/// <summary>
/// An image that is a block device (a disk, a partition, an LVM logical volume, a zvol, an iSCSI LUN, a loop or nbd
/// device), as QEMU's host_device driver sees it: its size comes from the kernel (a device's stat size is 0), it has
/// logical and physical sector sizes, and it can zero and discard ranges itself. Its size is fixed by the device: it
/// changes only when the device does (lvextend, losetup -c), never by a write past its end, which fails with ENOSPC.
/// </summary>
/// <remarks>
/// Devices are opened with buffered I/O, as QEMU's default cache mode opens them: the kernel completes a request that
/// is not aligned to the logical sector size through its page cache, so every offset and length works. The block
/// layer's own commands take sector-aligned ranges only; <see cref="ZeroOut"/> and <see cref="Discard"/> issue them on
/// the aligned part of a range and report what they covered, and the caller writes the unaligned head and tail.
/// </remarks>
public sealed class BlockDevice
{
    private BlockDevice(uint major, uint minor, int logical, int physical, long discardGranularity, bool discards)
    {
        Major = major;
        Minor = minor;
        LogicalSectorSize = logical;
        PhysicalSectorSize = physical;
        DiscardGranularity = discardGranularity;
        CanDiscard = discards;
    }

    /// <summary>Device number, major part (7 for loop devices, 253 for device-mapper on most systems).</summary>
    public uint Major { get; }

    /// <summary>Device number, minor part.</summary>
    public uint Minor { get; }

    /// <summary>The smallest unit the device addresses, in bytes (BLKSSZGET): 512 or 4096.</summary>
    public int LogicalSectorSize { get; }

    /// <summary>The unit the device writes without a read-modify-write, in bytes (BLKPBSZGET): at least the logical size.</summary>
    public int PhysicalSectorSize { get; }

    /// <summary>Whether the device accepts discards (its queue's discard_max_bytes is not 0).</summary>
    public bool CanDiscard { get; }

    /// <summary>The unit the device discards in, in bytes (queue/discard_granularity), at least the logical sector size.</summary>
    public long DiscardGranularity { get; }

    /// <summary>"major:minor", as /sys/dev/block and lsblk name the device.</summary>
    public string Number => $"{Major}:{Minor}";

    /// <summary>Whether <paramref name="path"/> names a block device (links followed); false for anything else or off Linux.</summary>
    public static bool IsAt(string path)
        => OperatingSystem.IsLinux() && LinuxFile.GetKind(path, out FileKind kind) == 0 && kind == FileKind.BlockDevice;

    /// <summary>The device under <paramref name="handle"/>, or null when it is not a block device (or not on Linux).</summary>
    /// <exception cref="IOException">The device does not report its sector sizes.</exception>
    internal static BlockDevice? Of(SafeFileHandle handle)
    {
        if (!OperatingSystem.IsLinux() || LinuxFile.GetKind(handle, out FileKind kind, out _) != 0 || kind != FileKind.BlockDevice)
            return null;
        if (LinuxFile.GetDeviceNumber(handle, out uint major, out uint minor) != 0)
            return null;
        int errno = LinuxFile.GetSectorSizes(handle, out int logical, out int physical);
        if (errno != 0)
            throw new IOException($"the device does not report its sector sizes: {LinuxFile.Describe(errno)}", errno);
        if (logical is < 512 or > 65536 || (logical & (logical - 1)) != 0)
            logical = 512;
        physical = Math.Max(physical, logical);
        string queue = QueueFolder(major, minor);
        bool discards = ReadNumber(queue, "discard_max_bytes") > 0;
        long granularity = Math.Max(ReadNumber(queue, "discard_granularity"), logical);
        return new BlockDevice(major, minor, logical, physical, granularity, discards);
    }

    /// <summary>The device's size in bytes now (BLKGETSIZE64); it changes when the device is grown or shrunk.</summary>
    /// <exception cref="IOException">The ioctl failed.</exception>
    internal static long ReadSize(SafeFileHandle handle)
    {
        int errno = LinuxFile.GetDeviceSize(handle, out long size);
        if (errno != 0)
            throw new IOException($"the size of the device cannot be read: {LinuxFile.Describe(errno)}", errno);
        return size;
    }

    /// <summary>
    /// Zero the sector-aligned middle of [offset, offset+length) in the device (BLKZEROOUT). Returns the range it
    /// zeroed, empty when the range holds no whole sector or the device refuses; the caller writes the rest.
    /// </summary>
    internal (long Offset, long Length) ZeroOut(SafeFileHandle handle, long offset, long length)
    {
        (long start, long end) = Inside(offset, length, LogicalSectorSize);
        if (end <= start || LinuxFile.ZeroOutDevice(handle, start, end - start) != 0)
            return (offset, 0);
        return (start, end - start);
    }

    /// <summary>
    /// Discard the part of [offset, offset+length) aligned to the discard granularity (BLKDISCARD). Returns whether a
    /// discard was issued; a device that cannot discard, or a range smaller than its unit, is left as it is (a discard
    /// is advice, as in QEMU).
    /// </summary>
    internal bool Discard(SafeFileHandle handle, long offset, long length)
    {
        if (!CanDiscard)
            return false;
        (long start, long end) = Inside(offset, length, DiscardGranularity);
        return end > start && LinuxFile.DiscardDevice(handle, start, end - start) == 0;
    }

    /// <summary>The largest range inside [offset, offset+length) whose ends are multiples of <paramref name="unit"/>.</summary>
    private static (long Start, long End) Inside(long offset, long length, long unit)
        => ((offset + unit - 1) / unit * unit, (offset + length) / unit * unit);

    /// <summary>The queue folder of the device in sysfs (a partition has none of its own: its disk's).</summary>
    private static string QueueFolder(uint major, uint minor)
    {
        string own = $"/sys/dev/block/{major}:{minor}/queue";
        return Directory.Exists(own) ? own : $"/sys/dev/block/{major}:{minor}/../queue";
    }

    private static long ReadNumber(string folder, string name)
    {
        try
        {
            return long.TryParse(File.ReadAllText(System.IO.Path.Combine(folder, name)).Trim(), out long n) ? n : 0;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return 0;
        }
    }
}
