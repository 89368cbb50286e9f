using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// A corpus of damaged images made by seeded mutation of small valid ones: header fields set to edge values,
/// table entries pointing past the end of the file, at metadata or at nothing, truncation at many points,
/// overlapping tables, broken extensions and random byte flips. Opening, reading, mapping and writing each one
/// must either work or throw <see cref="BlockException"/>, never another exception, never hang, and never
/// allocate more than a bound that depends on the file size, not on what the file claims.
/// </summary>
public sealed class Qcow2HostileImageTests
{
    private static readonly TimeSpan CaseTimeout = TimeSpan.FromSeconds(20);

    public static TheoryData<string> Bases => new() { "ours-512", "qemu-v3-64k-bitmaps", "qemu-v2-4k", "compressed", "overlay", "refcount64-512", "refcount1-2k" };

    [Theory]
    [MemberData(nameof(Bases))]
    public void MutatedImages_WorkOrThrowBlockException(string baseName)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        byte[] original = MakeBase(baseName, dir);
        var failures = new List<string>();
        long worstAllocation = 0;
        int cases = 0;
        int readable = 0, writable = 0;
        string path = dir.File("mutant.qcow2");
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach ((string name, byte[] bytes) in Mutations(original, baseName.Length * 7919))
        {
            if (!seen.Add(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(bytes))))
                continue; // the same mutant twice (edge values that coincide)
            cases++;
            File.WriteAllBytes(path, bytes);
            long bound = (16L << 20) + (8L * bytes.Length); // caches are 4 MiB each; tables are bounded by the file
            string? failure = RunCase(path, out long allocated, out bool opened, out bool written);
            readable += opened ? 1 : 0;
            writable += written ? 1 : 0;
            worstAllocation = Math.Max(worstAllocation, allocated);
            if (failure is null && allocated > bound)
                failure = $"allocated {allocated >> 20} MiB for a {bytes.Length}-byte file (bound {bound >> 20} MiB)";
            if (failure is not null)
                failures.Add($"{name}: {failure}");
            if (failures.Count >= 15)
                break;
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {cases} mutants of {baseName} failed:\n" + string.Join("\n", failures));
        Assert.True(cases > 300, $"only {cases} mutants");
        // Most mutants must get past the header checks, or the corpus would only test those.
        Assert.True(readable > cases / 4, $"only {readable} of {cases} mutants of {baseName} could be opened");
        TestContext.Current.SendDiagnosticMessage(
            $"{baseName}: {cases} mutants, {readable} opened read-only, {writable} written, worst allocation {worstAllocation >> 10} KiB");
    }

    /// <summary>Exercise one image on its own thread (to bound time and count allocations); null when it behaved.</summary>
    private static string? RunCase(string path, out long allocated, out bool opened, out bool written)
    {
        string? failure = null;
        long bytes = 0;
        bool ro = false, rw = false;
        var thread = new Thread(() =>
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                (ro, rw) = Exercise(path);
            }
            catch (Exception e)
            {
                failure = $"{e.GetType().Name}: {e.Message} at {e.StackTrace?.Split('\n').FirstOrDefault()?.Trim()}";
            }
            bytes = GC.GetAllocatedBytesForCurrentThread() - before;
        }) { IsBackground = true };
        thread.Start();
        opened = written = false;
        if (!thread.Join(CaseTimeout))
        {
            allocated = 0;
            return $"did not finish within {CaseTimeout.TotalSeconds} s";
        }
        allocated = bytes;
        opened = ro;
        written = rw;
        return failure;
    }

    /// <summary>
    /// Open read-only and read/map; open read-write and write/zero/resize. BlockException is the expected way to
    /// refuse and is caught; anything else escapes. Returns whether each pass got through without one.
    /// </summary>
    private static (bool ReadOnly, bool ReadWrite) Exercise(string path)
    {
        var buffer = new byte[65536];
        bool ro = false, rw = false;
        try
        {
            using var image = Qcow2Image.Open(path, readOnly: true);
            long size = image.Size;
            foreach (long offset in Offsets(size))
                image.Read(offset, buffer.AsSpan(0, (int)Math.Min(buffer.Length, size - offset)));
            foreach (AllocationExtent _ in image.GetAllocation(0, size))
            {
            }
            _ = image.BackingChain;
            _ = image.Bitmaps;
            ro = true;
        }
        catch (BlockException)
        {
        }
        try
        {
            using var image = Qcow2Image.Open(path, readOnly: false);
            long size = image.Size;
            foreach (long offset in Offsets(size))
            {
                int n = (int)Math.Min(3000, size - offset);
                image.Write(offset, buffer.AsSpan(0, n));
                image.WriteZeroes(offset + (n / 2), n / 2);
                image.Read(offset, buffer.AsSpan(0, n));
            }
            image.Flush();
            if (size < 1L << 40)
            {
                image.Resize(size + MiB);
                image.Write(size + 1000, buffer.AsSpan(0, 5000));
                image.Resize(size);
            }
            foreach (AllocationExtent _ in image.GetAllocation(0, image.Size))
            {
            }
            rw = true;
        }
        catch (BlockException)
        {
        }
        return (ro, rw);
    }

    private static IEnumerable<long> Offsets(long size)
    {
        if (size <= 0)
            yield break;
        foreach (long o in new[] { 0, size / 3, size / 2 + 777, size - 1, Math.Max(0, size - 70000) })
        {
            if (o >= 0 && o < size)
                yield return o;
        }
    }

    #region Base images

    internal static byte[] MakeBase(string name, TempDirectory dir)
    {
        string path = dir.File("base-" + name + ".qcow2");
        switch (name)
        {
            case "ours-512":
                Qcow2Image.Create(path, MiB, 512);
                using (var image = Qcow2Image.Open(path, readOnly: false))
                {
                    image.Write(1000, Pattern(20000, 1));
                    image.Write(600000, Pattern(5000, 2));
                    image.WriteZeroes(4096, 4096);
                }
                break;
            case "qemu-v3-64k-bitmaps":
                QemuImg.RunOk("create", "-f", "qcow2", path, "2M");
                QemuImg.IoOk(path, "write -P 1 0 100000", "write -z 196608 65536", "write -P 2 1M 70000");
                QemuImg.RunOk("bitmap", "--add", path, "b0");
                QemuImg.RunOk("bitmap", "--add", "-g", "4096", path, "b1");
                break;
            case "qemu-v2-4k":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", path, "1M");
                QemuImg.IoOk(path, "write -P 3 0 10000", "write -P 4 500000 30000");
                break;
            case "compressed":
                string raw = dir.File("src.raw");
                var data = new byte[MiB];
                for (int i = 0; i < data.Length; i += 8192)
                    data.AsSpan(i, 4096).Fill((byte)(i >> 13));
                File.WriteAllBytes(raw, data);
                QemuImg.RunOk("convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536", "-f", "raw", raw, path);
                break;
            case "overlay":
                string baseImg = dir.File("backing.qcow2");
                QemuImg.RunOk("create", "-f", "qcow2", baseImg, "1M");
                QemuImg.IoOk(baseImg, "write -P 5 0 1M");
                Qcow2Image.Create(path, 2 * MiB, 4096, "backing.qcow2", ImageFormat.Qcow2);
                using (var image = Qcow2Image.Open(path, readOnly: false))
                {
                    image.Write(100, Pattern(9000, 3));
                    image.WriteZeroes(65536, 8192);
                }
                break;
            case "refcount64-512":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path, "512K");
                QemuImg.IoOk(path, "write -P 6 0 40000", "write -z 100000 5000");
                break;
            case "refcount1-2k":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=2048,refcount_bits=1", path, "1M");
                QemuImg.IoOk(path, "write -P 7 3000 40000");
                break;
            default:
                throw new ArgumentException(name);
        }
        return File.ReadAllBytes(path);
    }

    #endregion

    #region Mutations

    /// <summary>Header fields: offset and width in bytes.</summary>
    private static readonly (string Name, int Offset, int Width)[] HeaderFields =
    [
        ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
        ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4),
        ("l1_table_offset", 40, 8), ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
        ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
        ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
        ("header_length", 100, 4), ("compression_type", 104, 1),
    ];

    internal static IEnumerable<(string Name, byte[] Bytes)> Mutations(byte[] original, int seed)
    {
        var rng = new Random(seed);
        long fileLength = original.Length;
        int cb = (int)BinaryPrimitives.ReadUInt32BigEndian(original.AsSpan(20));
        long cs = 1L << cb;
        long l1Offset = (long)BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(40));
        int l1Size = (int)BinaryPrimitives.ReadUInt32BigEndian(original.AsSpan(36));
        long rtOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(48));
        long l2Offset = FirstL2(original, l1Offset, l1Size);
        long blockOffset = (long)(BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan((int)rtOffset)) & ~0x1FFUL);
        uint headerLength = BinaryPrimitives.ReadUInt32BigEndian(original.AsSpan(4)) >= 3 ? BinaryPrimitives.ReadUInt32BigEndian(original.AsSpan(100)) : 72;

        ulong[] edge =
        [
            0, 1, 2, 3, 4, 7, 8, 9, 16, 21, 22, 63, 64, 65, 511, 512, 4096, 65536,
            (ulong)cs, (ulong)cs + 8, (ulong)(2 * cs), (ulong)fileLength, (ulong)fileLength - 1, (ulong)fileLength + 512,
            (ulong)l1Offset, (ulong)rtOffset, (ulong)l2Offset, (ulong)blockOffset,
            0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1UL << 32, 1UL << 40, 1UL << 56, 1UL << 62, 1UL << 63, ulong.MaxValue,
        ];

        // 1. Every header field set to every edge value (and a few random ones).
        foreach ((string field, int offset, int width) in HeaderFields)
        {
            foreach (ulong v in edge.Concat(Enumerable.Range(0, 4).Select(_ => (ulong)rng.NextInt64())))
                yield return ($"{field}={v}", WithField(original, offset, width, v));
        }

        // 2. Table entries pointing at bad places: L1, L2, refcount table, refcount block.
        ulong copied = 1UL << 63;
        ulong[] pointers =
        [
            copied | (ulong)fileLength + (ulong)cs, copied | ((ulong)l2Offset + (ulong)(cs / 2)), copied, copied | (ulong)cs,
            copied | (ulong)l1Offset, copied | (ulong)rtOffset, copied | (ulong)blockOffset, copied | (ulong)l2Offset,
            (ulong)l2Offset | 0x1FF, (1UL << 56) - (ulong)cs, ulong.MaxValue, 1UL << 62, (1UL << 62) | (ulong)rng.NextInt64(),
            (1UL << 62) | 0x3FFF_FFFF_FFFF_FFFF, 1, copied | 1, (ulong)l2Offset | 1,
        ];
        foreach ((string table, long at, int entries) in new[] { ("l1", l1Offset, Math.Min(l1Size, 3)), ("l2", l2Offset, 4), ("reftable", rtOffset, 2) })
        {
            if (at <= 0)
                continue;
            for (int i = 0; i < entries; i++)
            {
                foreach (ulong v in pointers)
                    yield return ($"{table}[{i}]={v:x}", WithField(original, at + (i * 8), 8, v));
            }
        }
        if (blockOffset > 0)
        {
            yield return ("refblock=zeros", WithFill(original, blockOffset, cs, 0));
            yield return ("refblock=ones", WithFill(original, blockOffset, cs, 0xFF));
            for (int i = 0; i < 20; i++)
                yield return ($"refblock-random-{i}", WithRandom(original, blockOffset, Math.Min(cs, 64), rng, 3));
        }
        if (l2Offset > 0)
        {
            yield return ("l2=ones", WithFill(original, l2Offset, cs, 0xFF));
            for (int i = 0; i < 20; i++)
                yield return ($"l2-random-{i}", WithRandom(original, l2Offset, Math.Min(cs, 256), rng, 4));
        }

        // 3. Overlapping tables.
        yield return ("l1=reftable", WithField(original, 40, 8, (ulong)rtOffset));
        yield return ("reftable=l1", WithField(original, 48, 8, (ulong)l1Offset));
        yield return ("reftable=header", WithField(original, 48, 8, 0));
        yield return ("l1=header", WithField(original, 40, 8, 0));
        yield return ("l1=l2", WithField(original, 40, 8, (ulong)l2Offset));
        yield return ("reftable=l2", WithField(original, 48, 8, (ulong)l2Offset));
        yield return ("l1size=huge", WithField(original, 36, 4, 4u << 20));

        // 4. Header extensions: lengths past the area, a bitmaps extension pointing anywhere.
        foreach (uint len in new uint[] { 8, 24, 25, 1000, (uint)cs, uint.MaxValue })
            yield return ($"ext0.len={len}", WithField(original, headerLength + 4, 4, len));
        byte[] bitmaps = WithField(WithField(original, headerLength, 4, 0x23852875), headerLength + 4, 4, 24);
        bitmaps = WithField(bitmaps, 88, 8, 1);
        foreach ((uint count, ulong dirSize, ulong dirOffset) in new[] { (1u, 24UL, (ulong)cs), (70000u, 24UL, (ulong)cs), (1u, 1UL << 40, (ulong)cs), (1u, 64UL, (ulong)fileLength), (3u, 32UL, (ulong)l1Offset), (1u, 24UL, 0UL) })
        {
            byte[] m = WithField(bitmaps, headerLength + 8, 4, count);
            m = WithField(m, headerLength + 16, 8, dirSize);
            yield return ($"bitmaps({count},{dirSize},{dirOffset})", WithField(m, headerLength + 24, 8, dirOffset));
        }

        // 5. Truncation at many points.
        var cuts = new SortedSet<long> { 0, 3, 4, 71, 72, 100, 103, 104, 111, 112, cs - 1, cs, cs + 1, l1Offset, l1Offset + 4, rtOffset, rtOffset + 8, l2Offset, l2Offset + 100, blockOffset, blockOffset + 1, fileLength - 1, fileLength - 512 };
        for (int i = 0; i < 30; i++)
            cuts.Add(rng.NextInt64(fileLength));
        foreach (long cut in cuts.Where(c => c >= 0 && c < fileLength))
            yield return ($"truncate@{cut}", original.AsSpan(0, (int)cut).ToArray());

        // 6. Random byte flips, mostly in the metadata.
        long[] hot = [0, l1Offset, rtOffset, l2Offset, blockOffset];
        for (int i = 0; i < 200; i++)
        {
            long start = i % 4 == 3 ? 0 : hot[rng.Next(hot.Length)];
            long length = i % 4 == 3 ? fileLength : Math.Min(cs, 512);
            yield return ($"flip-{i}", WithRandom(original, start, length, rng, rng.Next(1, 5)));
        }
    }

    private static long FirstL2(byte[] image, long l1Offset, int l1Size)
    {
        for (int i = 0; i < l1Size && l1Offset + (i * 8) + 8 <= image.Length; i++)
        {
            long e = (long)(BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan((int)l1Offset + (i * 8))) & 0x00FF_FFFF_FFFF_FE00UL);
            if (e != 0)
                return e;
        }
        return 0;
    }

    private static byte[] WithField(byte[] original, long offset, int width, ulong value)
    {
        byte[] copy = (byte[])original.Clone();
        if (offset < 0 || offset + width > copy.Length)
            return copy;
        Span<byte> field = copy.AsSpan((int)offset, width);
        switch (width)
        {
            case 1:
                field[0] = (byte)value;
                break;
            case 4:
                BinaryPrimitives.WriteUInt32BigEndian(field, (uint)value);
                break;
            default:
                BinaryPrimitives.WriteUInt64BigEndian(field, value);
                break;
        }
        return copy;
    }

    private static byte[] WithFill(byte[] original, long offset, long length, byte value)
    {
        byte[] copy = (byte[])original.Clone();
        if (offset >= 0 && offset < copy.Length)
            copy.AsSpan((int)offset, (int)Math.Min(length, copy.Length - offset)).Fill(value);
        return copy;
    }

    private static byte[] WithRandom(byte[] original, long offset, long length, Random rng, int flips)
    {
        byte[] copy = (byte[])original.Clone();
        length = Math.Min(length, copy.Length - offset);
        if (offset < 0 || length <= 0)
            return copy;
        for (int i = 0; i < flips; i++)
            copy[offset + rng.NextInt64(length)] = (byte)rng.Next(256);
        return copy;
    }

    #endregion
}
