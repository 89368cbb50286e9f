using BitmapBackup.Core.IO;
using BitmapBackup.Core.Nodes;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Formats.Raw;

/// <summary>
/// A raw image: the file is the disk. Reads and writes are positional (RandomAccess); write-zeroes punches
/// holes where the file system can, and the allocation map reports holes as <see cref="AllocationState.Zero"/>
/// and everything else as data, as <c>qemu-img map</c> does for raw files.
/// </summary>
public sealed class RawImage : IBlockImage
{
    private const int HoleAlignment = 4096;
    private readonly SafeFileHandle _handle;
    private long _size;

    private RawImage(string path, SafeFileHandle handle, bool readOnly)
    {
        Path = path;
        _handle = handle;
        ReadOnly = readOnly;
        _size = RandomAccess.GetLength(handle);
    }

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

    /// <summary>Create a sparse raw image of <paramref name="size"/> bytes; fails if the file exists.</summary>
    public static void Create(string path, long size)
    {
        using SafeFileHandle handle = ImageFiles.CreateNew(path);
        ImageFiles.Io(path, "create", () => RandomAccess.SetLength(handle, size));
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

    public void Flush()
    {
        Observer?.Invoke(-1, null);
        Testing.FaultInjection.Check(Path, Testing.FaultOperation.FileSync, 0, 1);
        ImageFiles.Io(Path, "flush", () => LinuxFile.DataSync(_handle));
    }

    public void Resize(long newSize)
    {
        ImageFiles.Io(Path, "resize", () => RandomAccess.SetLength(_handle, newSize));
        Volatile.Write(ref _size, newSize);
    }

    public IEnumerable<AllocationExtent> GetAllocation(long offset, long length)
    {
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
}
