using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;

namespace BitmapBackup.Core.Persistence;

/*
 * The file that keeps persistent bitmaps outside an image (format in docs/raw-bitmap-sidecar.md): the raw image's
 * sidecar and the state folder's files alike. Every update writes a complete new file beside it and renames it over
 * the old one, so the file is always either the old or the new version, never a torn mix. Fields are big-endian, as
 * in qcow2; bitmap data uses QEMU's bit order, and each bitmap's data carries the first 8 bytes of its SHA-256 so
 * that corruption is detected rather than loaded as a plausible bitmap.
 *
 * Two header fields, reserved (zero) in the first files written, say what the bits were recorded against:
 * disk_size (bytes 24-31), the disk's size when the file was written, and identity_size (bytes 20-23), the length
 * of the owner's identity (ImageIdentity, text) stored as the last bytes of the file (state folder files only).
 */

/// <summary>What a bitmap file holds.</summary>
/// <param name="Bitmaps">The stored bitmaps, in order.</param>
/// <param name="DiskSize">The disk's size in bytes when the file was written; 0 when the file does not say.</param>
/// <param name="Identity">The identity of the disk the file belongs to (state folder files), or null.</param>
internal sealed record BitmapFileContents(IReadOnlyList<StoredBitmap> Bitmaps, long DiskSize, ImageIdentity? Identity);

/// <summary>Reads, builds and atomically replaces bitmap files.</summary>
internal static class BitmapFile
{
    private const ulong Magic = 0x4242_424D_4150_5300; // "BBBMAPS\0"
    private const uint Version = 1;
    private const int HeaderSize = 32;
    private const int EntryFixedSize = 48;
    private const uint FlagInUse = 1;
    private const uint FlagAuto = 2;
    private const int MaxIdentitySize = 64 * 1024;

    /// <summary>At most this many bitmaps per file (QEMU's QCOW2_MAX_BITMAPS).</summary>
    public const int MaxBitmaps = 65535;

    /// <summary>
    /// The contents of the file at <paramref name="path"/>, or null when there is none. <paramref name="what"/> names
    /// the file in errors ("Bitmap sidecar", "Bitmap state file").
    /// </summary>
    /// <exception cref="BlockException">ImageIOFailed (unreadable), ImageCorrupt (damaged).</exception>
    public static BitmapFileContents? Read(string path, string what)
    {
        if (!File.Exists(path))
            return null;
        byte[] file;
        try
        {
            file = ReadWhole(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError, $"Cannot read {what.ToLowerInvariant()} '{path}': {e.Message}", path, e);
        }
        return Parse(file, path, what);
    }

    /// <summary>Parse a whole file; every field is checked before it is used.</summary>
    public static BitmapFileContents Parse(ReadOnlySpan<byte> file, string path, string what)
    {
        void Corrupt(string why)
            => Throw.Block(ErrorIds.ImageCorrupt, BlockErrorCategory.InvalidData,
                $"{what} '{path}' is corrupt: {why}. Move it away to open the image without its bitmaps.", path);

        if (file.Length < HeaderSize || BinaryPrimitives.ReadUInt64BigEndian(file) != Magic)
            Corrupt("it does not start with the sidecar header");
        if (BinaryPrimitives.ReadUInt32BigEndian(file[8..]) != Version)
            Corrupt($"version {BinaryPrimitives.ReadUInt32BigEndian(file[8..])} is not supported");
        uint count = BinaryPrimitives.ReadUInt32BigEndian(file[16..]);
        if (count > MaxBitmaps)
            Corrupt($"it claims {count} bitmaps");
        uint identitySize = BinaryPrimitives.ReadUInt32BigEndian(file[20..]);
        long diskSize = BinaryPrimitives.ReadInt64BigEndian(file[24..]);
        if (identitySize > MaxIdentitySize || identitySize > file.Length - HeaderSize)
            Corrupt($"its identity of {identitySize} bytes does not fit in the file");
        if (diskSize < 0)
            Corrupt($"it records a disk size of {diskSize} bytes");
        ImageIdentity? identity = null;
        if (identitySize > 0)
        {
            identity = ImageIdentity.Parse(file[^(int)identitySize..]);
            if (identity is null)
                Corrupt("its identity has no key");
        }
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
            result.Add(new StoredBitmap(name, granularity, (flags & FlagInUse) != 0, (flags & FlagAuto) != 0, bits)
            {
                DiskSize = diskSize == 0 ? null : diskSize,
            });
            pos += (int)length;
        }
        return new BitmapFileContents(result, diskSize, identity);
    }

    /// <summary>
    /// The file for <paramref name="bitmaps"/>: with their bits (<paramref name="storeBits"/>: a clean close; inconsistent
    /// ones stay in use without bits) or all in use without bits, recorded against <paramref name="diskSize"/> bytes and,
    /// when given, the owner's <paramref name="identity"/>.
    /// </summary>
    public static byte[] Build(IReadOnlyList<DirtyBitmap> bitmaps, bool storeBits, long diskSize, ImageIdentity? identity = null)
    {
        var entries = new List<(byte[] Name, uint Flags, long Granularity, byte[] Data, long Bits)>();
        foreach (DirtyBitmap b in bitmaps)
        {
            bool inUse = !storeBits || b.Inconsistent;
            byte[] data = inUse ? [] : b.Serialize();
            uint flags = (inUse ? FlagInUse : 0) | (b.Recording ? FlagAuto : 0);
            entries.Add((Encoding.UTF8.GetBytes(b.Name!), flags, b.Granularity, data, inUse ? 0 : b.Length));
        }
        byte[] owner = identity?.Serialize() ?? [];
        long entriesSize = entries.Sum(e => Align8(EntryFixedSize + 8 + e.Name.Length));
        long dataStart = HeaderSize + entriesSize;
        long dataEnd = dataStart + entries.Sum(e => Align8(e.Data.Length));
        byte[] file = new byte[dataEnd + owner.Length];
        BinaryPrimitives.WriteUInt64BigEndian(file, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(8), Version);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(12), HeaderSize);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(16), (uint)entries.Count);
        BinaryPrimitives.WriteUInt32BigEndian(file.AsSpan(20), (uint)owner.Length);
        BinaryPrimitives.WriteInt64BigEndian(file.AsSpan(24), diskSize);
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
        owner.CopyTo(file.AsSpan((int)dataEnd));
        return file;
    }

    /// <summary>
    /// Replace the file at <paramref name="path"/> by <paramref name="bytes"/>: written to "path.tmp" (locked as a
    /// writer, emptied, written, synced), renamed over it, and the folder synced. On failure the old file stays.
    /// </summary>
    /// <exception cref="BlockException">ImageInUse (another writer holds the temporary file), ImageIOFailed.</exception>
    public static void WriteAtomically(string path, byte[] bytes, string what)
    {
        string temp = path + ".tmp";
        Microsoft.Win32.SafeHandles.SafeFileHandle handle;
        try
        {
            handle = ImageFiles.OpenToRewrite(temp); // locked as a writer, then emptied
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
                Testing.FaultInjection.Check(temp, Testing.FaultOperation.FileWrite, 0, bytes.Length);
                fs.Write(bytes);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
            LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or BlockException)
        {
            TryDelete(temp); // the old file stays as it was: the update did not happen
            if (ex is BlockException)
                throw;
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot write {what.ToLowerInvariant()} '{path}': {ex.Message}", path, ex);
        }
    }

    /// <summary>
    /// The whole file, read without a lock: writers never change it in place (they rename a new file over it), and
    /// the open refuses a FIFO or a device put in its place instead of blocking on it.
    /// </summary>
    private static byte[] ReadWhole(string path)
    {
        using Microsoft.Win32.SafeHandles.SafeFileHandle handle = ImageFiles.OpenUnlocked(path);
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

    public static void TryDelete(string path)
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
}
