using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Formats.Raw;

/// <summary>
/// A raw image: the file is the disk. Reads and writes are positional (RandomAccess); write-zeroes punches
/// holes where the file system can, and the allocation map reports holes as <see cref="AllocationState.Zero"/>
/// and everything else as data, as <c>qemu-img map</c> does for raw files.
/// </summary>
/// <remarks>
/// As QEMU's raw driver: a file whose length is not a multiple of 512 bytes is a disk of the length rounded up to
/// whole sectors, the bytes past the end of the file reading as zeros (a 1000-byte file is a 1024-byte disk; a write
/// there extends the file). A block device (QEMU's host_device) is a disk of the device's size; it zeroes ranges
/// with BLKZEROOUT, discards with BLKDISCARD where it can, reports all of itself as data (a device has no holes
/// to report: a backup's zero detection keeps its target sparse), and changes size only when the device does.
/// </remarks>
public sealed class RawImage : IBlockImage
{
    private const int HoleAlignment = 4096;
    private const int SectorSize = 512;
    private readonly SafeFileHandle _handle;
    private readonly BlockDevice? _device;
    private long _size;

    private RawImage(string path, SafeFileHandle handle, bool readOnly)
    {
        Path = path;
        _handle = handle;
        ReadOnly = readOnly;
        try
        {
            _device = BlockDevice.Of(handle);
            _size = _device is null ? AlignUp(RandomAccess.GetLength(handle), SectorSize) : BlockDevice.ReadSize(handle);
        }
        catch (IOException e)
        {
            handle.Dispose();
            throw new Errors.BlockException(Errors.ErrorIds.ImageIOFailed, Errors.BlockErrorCategory.ReadError,
                $"Cannot read the size of image '{path}': {e.Message}", path, e);
        }
    }

    /// <summary>The block device this image is, or null for a file.</summary>
    public BlockDevice? Device => _device;

    /// <summary>
    /// The stable identity of the image (a device's by-id name, a loop device's backing file, a file's inode), for
    /// state kept outside it; null where it has none.
    /// </summary>
    public ImageIdentity? Identity => _device is { } device ? ImageIdentity.OfDevice(_handle, device) : ImageIdentity.OfFile(_handle, Path);

    public ImageFormat Format => ImageFormat.Raw;
    public string Path { get; }
    public long Size => Volatile.Read(ref _size);
    public int ClusterSize => 0;
    public bool ReadOnly { get; }
    public string? BackingFile => null;

    /// <summary>
    /// Test hook: sees every write (offset, bytes; a punched hole as zeros) and every fdatasync (offset -1) of the file,
    /// in order, so that a test can rebuild the states a crash could leave.
    /// </summary>
    internal Action<long, byte[]?>? Observer { get; set; }

    /// <summary>Open a raw image; with <paramref name="forceShare"/> (read-only) without image locks.</summary>
    public static RawImage Open(string path, bool readOnly, bool forceShare = false) => new(path, ImageFiles.Open(path, readOnly, forceShare), readOnly);

    /// <summary>
    /// Create a sparse raw image of <paramref name="size"/> bytes; fails if the file exists, and leaves no file when the
    /// size cannot be set (ImageTooLargeForFileSystem: the file system cannot hold a file that large).
    /// </summary>
    public static void Create(string path, long size)
    {
        SafeFileHandle handle = ImageFiles.CreateNew(path);
        try
        {
            FileLength.Set(handle, path, size, "create");
        }
        catch
        {
            handle.Dispose();
            File.Delete(path);
            throw;
        }
        handle.Dispose();
    }

    public void Read(long offset, Span<byte> buffer)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            int n = 0;
            int start = done;
            Span<byte> rest = buffer[start..];
            try
            {
                Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileRead, offset + start, rest.Length);
                n = RandomAccess.Read(_handle, rest, offset + start);
            }
            catch (IOException e)
            {
                throw new Errors.BlockException(Errors.ErrorIds.ImageIOFailed, Errors.BlockErrorCategory.ReadError,
                    $"I/O error on image '{Path}' during read at offset {offset + start}: {e.Message}", Path, e);
            }
            if (n == 0)
            {
                rest.Clear(); // past the end of a file shorter than its size: reads as zeros
                return;
            }
            done += n;
        }
    }

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        Observer?.Invoke(offset, data.ToArray());
        Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileWrite, offset, data.Length);
        try
        {
            RandomAccess.Write(_handle, data, offset);
        }
        catch (IOException e)
        {
            throw new Errors.BlockException(Errors.ErrorIds.ImageIOFailed, Errors.BlockErrorCategory.WriteError,
                $"I/O error on image '{Path}' during write at offset {offset}: {e.Message}", Path, e);
        }
    }

    public void WriteZeroes(long offset, long length)
    {
        if (_device is { } device)
        {
            // The device zeroes the sector-aligned middle itself; an unaligned head and tail are written as zeros.
            (long start, long zeroed) = device.ZeroOut(_handle, offset, length);
            if (zeroed == 0)
            {
                WriteZeroBytes(offset, length);
                return;
            }
            WriteZeroBytes(offset, start - offset);
            WriteZeroBytes(start + zeroed, offset + length - start - zeroed);
            return;
        }
        long end = offset + length;
        long holeStart = (offset + HoleAlignment - 1) / HoleAlignment * HoleAlignment;
        long holeEnd = end == Size ? end : end / HoleAlignment * HoleAlignment;
        if (holeEnd > holeStart && LinuxFile.TryPunchHole(_handle, holeStart, holeEnd - holeStart))
        {
            Observer?.Invoke(holeStart, new byte[holeEnd - holeStart]);
            WriteZeroBytes(offset, holeStart - offset);
            WriteZeroBytes(holeEnd, end - holeEnd);
        }
        else
        {
            WriteZeroBytes(offset, length);
        }
    }

    private void WriteZeroBytes(long offset, long length)
    {
        if (length <= 0)
            return;
        byte[] zeros = new byte[(int)Math.Min(length, 1 << 20)];
        while (length > 0)
        {
            int n = (int)Math.Min(length, zeros.Length);
            Write(offset, zeros.AsSpan(0, n));
            offset += n;
            length -= n;
        }
    }

    /// <summary>Start the file's writeback without waiting (a hint).</summary>
    public void StartWriteback() => LinuxFile.StartWriteback(_handle);

    public void Flush()
    {
        Observer?.Invoke(-1, null);
        Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileSync, 0, 1);
        ImageFiles.Io(Path, "flush", () => LinuxFile.DataSync(_handle));
    }

    /// <summary>
    /// Discard the range. A device discards the part aligned to its discard unit (BLKDISCARD), where it can, and
    /// leaves the rest as it is (what a discarded range reads is the device's to say); a file punches a hole.
    /// </summary>
    public void Discard(long offset, long length)
    {
        if (_device is { } device)
        {
            Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileWrite, offset, length);
            device.Discard(_handle, offset, length);
            return;
        }
        WriteZeroes(offset, length);
    }

    /// <summary>
    /// Set the file's length. A block device cannot be resized here: its size is the device's (lvextend, losetup -c
    /// change it), and the only size accepted is the one it has now, which the node then takes (QEMU's block_resize
    /// of a host_device refuses to grow it too).
    /// </summary>
    /// <exception cref="Errors.BlockException">DeviceSizeFixed, ImageIOFailed.</exception>
    public void Resize(long newSize)
    {
        if (_device is not null)
        {
            long deviceSize = 0;
            ImageFiles.Io(Path, "resize", () => deviceSize = BlockDevice.ReadSize(_handle));
            if (newSize != deviceSize)
                Errors.Throw.Block(Errors.ErrorIds.DeviceSizeFixed, Errors.BlockErrorCategory.InvalidOperation,
                    $"'{Path}' is a block device of {deviceSize} bytes: its size is the device's, so it can only be set to {deviceSize}. " +
                    "Grow or shrink the device itself (lvextend, losetup -c, ...), then resize the node to the device's new size.", Path);
            Volatile.Write(ref _size, newSize);
            return;
        }
        FileLength.Set(_handle, Path, newSize, "resize");
        Volatile.Write(ref _size, newSize);
    }

    public IEnumerable<AllocationExtent> GetAllocation(long offset, long length)
    {
        if (_device is not null)
        {
            yield return new AllocationExtent(offset, length, AllocationState.Data);
            yield break;
        }
        long end = offset + length;
        long pos = offset;
        while (pos < end)
        {
            if (!LinuxFile.TryFindData(_handle, pos, Size, out long dataStart, out long dataEnd))
            {
                yield return new AllocationExtent(pos, end - pos, AllocationState.Data);
                yield break;
            }
            dataStart = Math.Min(dataStart, end);
            dataEnd = Math.Min(dataEnd, end);
            if (dataStart > pos)
                yield return new AllocationExtent(pos, dataStart - pos, AllocationState.Zero);
            if (dataEnd > dataStart)
                yield return new AllocationExtent(dataStart, dataEnd - dataStart, AllocationState.Data);
            if (dataEnd <= pos) // no progress possible: nothing more to find
            {
                if (dataStart <= pos)
                    yield return new AllocationExtent(pos, end - pos, AllocationState.Zero);
                yield break;
            }
            pos = Math.Max(dataEnd, dataStart);
        }
    }

    public void Dispose() => _handle.Dispose();

    private static long AlignUp(long n, long unit) => (n + unit - 1) / unit * unit;
}
