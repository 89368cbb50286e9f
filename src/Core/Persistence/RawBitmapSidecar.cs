using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Persistence;

/*
 * Persistent bitmaps of a raw image, in a sidecar file "<image>.bitmaps" (format in docs/raw-bitmap-sidecar.md).
 * Every update writes a complete new file beside it and renames it over the old one, so the sidecar is always
 * either the old or the new version, never a torn mix. Fields are big-endian, as in qcow2; bitmap data uses
 * QEMU's bit order, and each bitmap's data carries the first 8 bytes of its SHA-256 so that corruption is
 * detected rather than loaded as a plausible bitmap.
 */

/// <summary>The raw image's bitmap sidecar.</summary>
public sealed class RawBitmapSidecar(string imagePath) : IBitmapStore
{
    public const string Suffix = ".bitmaps";
    private const ulong Magic = 0x4242_424D_4150_5300; // "BBBMAPS\0"
    private const uint Version = 1;
    private const int HeaderSize = 32;
    private const int EntryFixedSize = 48;
    private const uint FlagInUse = 1;
    private const uint FlagAuto = 2;
    private const int MaxBitmaps = 65535; // QEMU's QCOW2_MAX_BITMAPS

    public string Path { get; } = imagePath + Suffix;

    public IReadOnlyList<StoredBitmap> Load()
    {
        if (!File.Exists(Path))
            return [];
        byte[] file;
        try
        {
            file = ReadWhole(Path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError, $"Cannot read bitmap sidecar '{Path}': {e.Message}", Path, e);
        }
        return Parse(file);
    }

    private IReadOnlyList<StoredBitmap> Parse(ReadOnlySpan<byte> file)
    {
        if (file.Length < HeaderSize || BinaryPrimitives.ReadUInt64BigEndian(file) != Magic)
            Corrupt("it does not start with the sidecar header");
        if (BinaryPrimitives.ReadUInt32BigEndian(file[8..]) != Version)
            Corrupt($"version {BinaryPrimitives.ReadUInt32BigEndian(file[8..])} is not supported");
        uint count = BinaryPrimitives.ReadUInt32BigEndian(file[16..]);
        if (count > MaxBitmaps)
            Corrupt($"it claims {count} bitmaps");
        var result = new List<StoredBitmap>((int)count);
        int pos = HeaderSize;
        for (uint i = 0; i < count; i++)
        {
            if (pos > file.Length - EntryFixedSize)
                Corrupt($"entry {i} is cut off");
            ReadOnlySpan<byte> e = file[pos..];
            uint length = BinaryPrimitives.ReadUInt32BigEndian(e);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(e[4..]);
            long granularity = BinaryPrimitives.ReadInt64BigEndian(e[8..]);
            long dataOffset = BinaryPrimitives.ReadInt64BigEndian(e[16..]);
            long dataLength = BinaryPrimitives.ReadInt64BigEndian(e[24..]);
            long bitCount = BinaryPrimitives.ReadInt64BigEndian(e[32..]);
            int nameLength = BinaryPrimitives.ReadInt32BigEndian(e[40..]);
            if (nameLength <= 0 || nameLength > DirtyBitmapLimits.MaxNameBytes || length < EntryFixedSize + nameLength + 8 || length > file.Length - pos)
                Corrupt($"entry {i} has an impossible length");
            string name = Encoding.UTF8.GetString(e.Slice(EntryFixedSize + 8, nameLength));
            ReadOnlySpan<byte> hash = e.Slice(EntryFixedSize, 8);
            if (granularity < DirtyBitmapLimits.MinGranularity || granularity > DirtyBitmapLimits.MaxGranularity || (granularity & (granularity - 1)) != 0)
                Corrupt($"bitmap '{name}' has granularity {granularity}");
            HierarchicalBitmap? bits = null;
            if ((flags & FlagInUse) == 0)
            {
                if (bitCount < 0 || dataLength != HierarchicalBitmap.SerializedSize(bitCount) || dataOffset < HeaderSize || dataOffset > file.Length - dataLength)
                    Corrupt($"the data of bitmap '{name}' lies outside the file");
                ReadOnlySpan<byte> data = file.Slice((int)dataOffset, (int)dataLength);
                if (!SHA256.HashData(data).AsSpan(0, 8).SequenceEqual(hash))
                    Corrupt($"the data of bitmap '{name}' does not match its checksum");
                bits = new HierarchicalBitmap(bitCount);
                bits.Deserialize(data, 0, bitCount);
            }
            result.Add(new StoredBitmap(name, granularity, (flags & FlagInUse) != 0, (flags & FlagAuto) != 0, bits));
            pos += (int)length;
        }
        return result;
    }

    public void CheckCanStore(string name, long granularity, IReadOnlyList<DirtyBitmap> persistent)
    {
        if (persistent.Count >= MaxBitmaps)
            Throw.Block(ErrorIds.PersistenceNotSupported, BlockErrorCategory.InvalidOperation,
                $"Can't make bitmap '{name}' persistent in '{Path}': at most {MaxBitmaps} bitmaps can be stored.", name);
    }

    public void MarkInUse(IReadOnlyList<DirtyBitmap> persistent) => Write(persistent, storeBits: false);

    public void Store(IReadOnlyList<DirtyBitmap> persistent)
    {
        if (persistent.Count == 0)
        {
            if (File.Exists(Path))
                File.Delete(Path);
            return;
        }
        Write(persistent, storeBits: true);
    }

    private void Write(IReadOnlyList<DirtyBitmap> bitmaps, bool storeBits)
    {
        var entries = new List<(byte[] Name, uint Flags, long Granularity, byte[] Data, long Bits)>();
        foreach (DirtyBitmap b in bitmaps)
        {
            bool inUse = !storeBits || b.Inconsistent;
            byte[] data = inUse ? [] : b.Serialize();
            uint flags = (inUse ? FlagInUse : 0) | (b.Recording ? FlagAuto : 0);
            entries.Add((Encoding.UTF8.GetBytes(b.Name!), flags, b.Granularity, data, inUse ? 0 : b.Length));
        }
        long entriesSize = entries.Sum(e => Align8(EntryFixedSize + 8 + e.Name.Length));
        long dataStart = HeaderSize + entriesSize;
        long total = dataStart + entries.Sum(e => Align8(e.Data.Length));
        byte[] file = new byte[total];
        BinaryPrimitives.WriteUInt64BigEndian(file, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(8), Version);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(12), HeaderSize);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(16), (uint)entries.Count);
        int pos = HeaderSize;
        long dataPos = dataStart;
        foreach (var e in entries)
        {
            int length = (int)Align8(EntryFixedSize + 8 + e.Name.Length);
            Span<byte> s = file.AsSpan(pos);
            BinaryPrimitives.WriteUInt32BigEndian(s, (uint)length);
            BinaryPrimitives.WriteUInt32BigEndian(s[4..], e.Flags);
            BinaryPrimitives.WriteInt64BigEndian(s[8..], e.Granularity);
            BinaryPrimitives.WriteInt64BigEndian(s[16..], e.Data.Length == 0 ? 0 : dataPos);
            BinaryPrimitives.WriteInt64BigEndian(s[24..], e.Data.Length);
            BinaryPrimitives.WriteInt64BigEndian(s[32..], e.Bits);
            BinaryPrimitives.WriteInt32BigEndian(s[40..], e.Name.Length);
            SHA256.HashData(e.Data).AsSpan(0, 8).CopyTo(s[EntryFixedSize..]);
            e.Name.CopyTo(s[(EntryFixedSize + 8)..]);
            e.Data.CopyTo(file.AsSpan((int)dataPos));
            pos += length;
            dataPos += Align8(e.Data.Length);
        }
        string temp = Path + ".tmp";
        Microsoft.Win32.SafeHandles.SafeFileHandle handle;
        try
        {
            handle = IO.ImageFiles.OpenToRewrite(temp); // locked as a writer, then emptied
        }
        catch (BlockException e) when (e.ErrorId != ErrorIds.ImageInUse) // in use: another writer's file, left alone
        {
            TryDelete(temp);
            throw;
        }
        try
        {
            using (var fs = new FileStream(handle, FileAccess.Write))
            {
                Testing.FaultInjection.Check(temp, Testing.FaultOperation.FileWrite, 0, file.Length);
                fs.Write(file);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, Path, overwrite: true);
            IO.LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(Path))!);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or BlockException)
        {
            TryDelete(temp); // the old sidecar stays as it was: the update did not happen
            if (ex is BlockException)
                throw;
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot write bitmap sidecar '{Path}': {ex.Message}", Path, ex);
        }
    }

    /// <summary>
    /// The whole sidecar, read without a lock: writers never change it in place (they rename a new file over it),
    /// and the open refuses a FIFO or a device put in its place instead of blocking on it.
    /// </summary>
    private static byte[] ReadWhole(string path)
    {
        using Microsoft.Win32.SafeHandles.SafeFileHandle handle = IO.ImageFiles.OpenUnlocked(path);
        long length = RandomAccess.GetLength(handle);
        if (length > Array.MaxLength)
            throw new IOException($"the file is {length} bytes long");
        byte[] bytes = new byte[length];
        int done = 0;
        while (done < bytes.Length)
        {
            int n = RandomAccess.Read(handle, bytes.AsSpan(done), done);
            if (n == 0)
                throw new IOException($"the file ended at {done} of {length} bytes");
            done += n;
        }
        return bytes;
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }

    private static long Align8(long n) => (n + 7) & ~7L;

    private void Corrupt(string why)
        => Throw.Block(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData,
            $"Bitmap sidecar '{Path}' is corrupt: {why}. Move it away to open the image without its bitmaps.", Path);
}
