using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Damaged bitmaps extensions, made by seeded mutation of valid images that hold bitmaps (ours and QEMU's): the
/// extension fields, every directory entry field, bitmap table entries pointing anywhere, random flips in the
/// directory, tables and data, truncation. Loading through Qcow2BitmapStore, and the engine's whole cycle
/// (load, mark in use, write, add, remove, store), must work or throw BlockException, never anything else, never
/// hang, and allocate no more than a bound that depends on the file size. What we store after a successful cycle
/// must load again.
/// </summary>
public sealed class Qcow2BitmapHostileTests
{
    private static readonly TimeSpan CaseTimeout = TimeSpan.FromSeconds(20);

    public static TheoryData<string> Bases => new() { "ours-512", "ours-64k-in-use", "qemu-4k" };

    [Theory]
    [MemberData(nameof(Bases))]
    public void MutatedBitmapExtensions_LoadOrThrowBlockException(string baseName)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        byte[] original = MakeBase(baseName, dir);
        string path = dir.File("mutant.qcow2");
        var failures = new List<string>();
        int cases = 0, loaded = 0, cycled = 0;
        long worst = 0;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach ((string name, byte[] bytes) in Mutations(original, baseName.Length * 104729))
        {
            if (!seen.Add(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(bytes))))
                continue;
            cases++;
            File.WriteAllBytes(path, bytes);
            long bound = (16L << 20) + (16L * bytes.Length);
            string? failure = RunCase(path, out long allocated, out bool didLoad, out bool didCycle);
            loaded += didLoad ? 1 : 0;
            cycled += didCycle ? 1 : 0;
            worst = Math.Max(worst, allocated);
            if (failure is null && allocated > bound)
                failure = $"allocated {allocated >> 20} MiB for a {bytes.Length}-byte file (bound {bound >> 20} MiB)";
            if (failure is not null)
                failures.Add($"{name}: {failure}");
            if (failures.Count >= 15)
                break;
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {cases} mutants of {baseName} failed:\n" + string.Join("\n", failures));
        Assert.True(cases > 200, $"only {cases} mutants");
        Assert.True(loaded > cases / 20, $"only {loaded} of {cases} mutants of {baseName} loaded");
        Assert.True(cycled > cases / 20, $"only {cycled} of {cases} mutants of {baseName} went through the whole cycle");
        TestContext.Current.SendDiagnosticMessage($"{baseName}: {cases} mutants, {loaded} loaded, {cycled} through the whole cycle, worst allocation {worst >> 10} KiB");
    }

    [Fact]
    public void CorruptEntries_AreRefusedWithAMessageNamingTheProblem()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        byte[] original = MakeBase("ours-512", dir);
        string path = dir.File("bad.qcow2");
        Qcow2BitmapDirectoryEntry first;
        File.WriteAllBytes(path, original);
        using (var image = Qcow2Image.Open(path, readOnly: true))
            first = image.Bitmaps[0];
        long e = first.EntryOffset;

        string Refusal(byte[] bytes)
        {
            File.WriteAllBytes(path, bytes);
            BlockException ex = Assert.Throws<BlockException>(() =>
            {
                using var image = Qcow2Image.Open(path, readOnly: true);
                new Qcow2BitmapStore(image).Load();
            });
            Assert.Contains(path, ex.Message);
            return ex.ErrorId + ": " + ex.Message;
        }

        Assert.Contains("type 2", Refusal(With(original, e + 16, 1, 2)));
        Assert.Contains("granularity 2^8", Refusal(With(original, e + 17, 1, 8)));
        Assert.Contains("granularity 2^32", Refusal(With(original, e + 17, 1, 32)));
        Assert.Contains("reserved flags", Refusal(With(original, e + 12, 4, first.Flags | 4)));
        Assert.Contains("bitmap table of 0 entries", Refusal(With(original, e + 8, 4, 0)));
        Assert.Contains("needs", Refusal(With(original, e + 8, 4, first.TableSize + 1)));
        Assert.Contains("not a cluster-aligned", Refusal(With(original, e, 8, (ulong)first.TableOffset + 8)));
        Assert.Contains("overlaps the L1 table", Refusal(With(original, e, 8, BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(40)))));
        Assert.Contains("past the end of the file", Refusal(With(original, e, 8, (ulong)original.Length + 4096)));
        string extra = Refusal(With(original, e + 20, 4, 8));
        Assert.Contains(ErrorIds.ImageCorrupt, extra); // the name no longer fits where the directory says
        ulong tableEntry = BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan((int)first.TableOffset));
        Assert.NotEqual(0UL, tableEntry);
        Assert.Contains("reserved bits", Refusal(With(original, first.TableOffset, 8, tableEntry | 2)));
        Assert.Contains("bit 0", Refusal(With(original, first.TableOffset, 8, tableEntry | 1)));
        Assert.Contains("which holds the refcount table", Refusal(With(original, first.TableOffset, 8, BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(48)))));
        Assert.Contains("already holds", Refusal(With(original, first.TableOffset, 8, (ulong)first.TableOffset)));
        (int at, _, _, _) = Qcow2BitmapNodes.Extension(original)!.Value;
        Assert.Contains("reserved field", Refusal(With(original, at + 12, 4, 1)));
        Assert.StartsWith(ErrorIds.ImageCorrupt, Refusal(With(original, e + 16, 1, 0)));
    }

    /// <summary>Run one mutant on its own thread (to bound time and count allocations); null when it behaved.</summary>
    private static string? RunCase(string path, out long allocated, out bool loaded, out bool cycled)
    {
        string? failure = null;
        long bytes = 0;
        bool l = false, c = false;
        var thread = new Thread(() =>
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                (l, c) = Exercise(path);
            }
            catch (Exception e)
            {
                failure = $"{e.GetType().Name}: {e.Message} at {e.StackTrace?.Split('\n').FirstOrDefault()?.Trim()}";
            }
            bytes = GC.GetAllocatedBytesForCurrentThread() - before;
        }) { IsBackground = true };
        thread.Start();
        if (!thread.Join(CaseTimeout))
        {
            allocated = 0;
            loaded = cycled = false;
            return $"did not finish within {CaseTimeout.TotalSeconds} s";
        }
        allocated = bytes;
        loaded = l;
        cycled = c;
        return failure;
    }

    private static (bool Loaded, bool Cycled) Exercise(string path)
    {
        bool loaded = false, cycled = false;
        try
        {
            using var image = Qcow2Image.Open(path, readOnly: true);
            IReadOnlyList<StoredBitmap> stored = new Qcow2BitmapStore(image).Load();
            foreach (StoredBitmap b in stored)
                _ = b.Bits?.Count;
            loaded = true;
        }
        catch (BlockException)
        {
        }
        try
        {
            using (BlockNode node = Qcow2BitmapNodes.Open(path))
            {
                node.Write(0, new byte[3000]);
                node.AddBitmap("added-by-test", 65536, persistent: true);
                if (node.Bitmaps.FirstOrDefault(b => b.Persistent && b.Name != "added-by-test") is { } victim)
                    node.RemoveBitmap(victim);
                node.Write(node.Size / 2, new byte[5000]);
            }
            cycled = true;
        }
        catch (BlockException)
        {
        }
        if (cycled)
        {
            // What we stored must load again (the rest of the image may still be damaged: then a BlockException is fine).
            try
            {
                using var image = Qcow2Image.Open(path, readOnly: true);
                Assert.Contains(new Qcow2BitmapStore(image).Load(), b => b.Name == "added-by-test" && !b.InUse);
            }
            catch (BlockException)
            {
            }
        }
        return (loaded, cycled);
    }

    #region Base images

    private static byte[] MakeBase(string name, TempDirectory dir)
    {
        string path = dir.File("base-" + name + ".qcow2");
        switch (name)
        {
            case "ours-512":
                Qcow2Image.Create(path, 4 * MiB, 512);
                using (BlockNode node = Qcow2BitmapNodes.Open(path))
                {
                    node.AddBitmap("fine", 512, persistent: true); // 8 KiB of bits: 16 data clusters, a 1-cluster table
                    node.AddBitmap("coarse", 65536, persistent: true, disabled: true);
                    node.Write(1000, Pattern(20000, 1));
                    node.Write(3 * MiB, Pattern(300000, 2));
                    node.GetBitmap("coarse").MarkDirty(0, 4 * MiB);
                }
                break;
            case "ours-64k-in-use":
                Qcow2Image.Create(path, 8 * MiB, 65536);
                using (BlockNode node = Qcow2BitmapNodes.Open(path))
                {
                    node.AddBitmap("stored", 4096, persistent: true);
                    node.Write(65536, Pattern(100000, 3));
                }
                BlockNode crashed = Qcow2BitmapNodes.Open(path);
                crashed.AddBitmap("never-stored", 65536, persistent: true);
                crashed.Image.Dispose();
                break;
            case "qemu-4k":
                QemuImg.RunOk("create", "-f", "qcow2", "-o", "cluster_size=4096", path, "2M");
                QemuImg.RunOk("bitmap", "--add", "-g", "512", path, "b0");
                QemuImg.RunOk("bitmap", "--add", "-g", "65536", path, "b1");
                QemuImg.IoOk(path, "write -P 1 0 100000", "write -P 2 1M 70000");
                QemuImg.RunOk("bitmap", "--disable", path, "b1");
                break;
            default:
                throw new ArgumentException(name);
        }
        QemuImg.AssertClean(path);
        return File.ReadAllBytes(path);
    }

    #endregion

    #region Mutations

    private static IEnumerable<(string Name, byte[] Bytes)> Mutations(byte[] original, int seed)
    {
        var rng = new Random(seed);
        string scratch = Path.Combine(Path.GetTempPath(), "bb-hostile-" + Guid.NewGuid().ToString("N")[..8] + ".qcow2");
        File.WriteAllBytes(scratch, original);
        IReadOnlyList<Qcow2BitmapDirectoryEntry> entries;
        try
        {
            using var image = Qcow2Image.Open(scratch, readOnly: true);
            entries = image.Bitmaps;
        }
        finally
        {
            File.Delete(scratch);
        }
        (int at, uint count, ulong dirSize, ulong dirOffset) = Qcow2BitmapNodes.Extension(original)!.Value;
        int cb = (int)BinaryPrimitives.ReadUInt32BigEndian(original.AsSpan(20));
        long cs = 1L << cb;
        long fileLength = original.Length;
        long l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(40));
        long reftable = (long)BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan(48));
        long otherTable = entries[^1].TableOffset;
        long firstData = FirstDataCluster(original, entries);

        ulong[] edges =
        [
            0, 1, 2, 7, 8, 9, 31, 32, 63, 64, 255, 511, 512, 1023, 1024, 4096, 65535, 65536,
            (ulong)cs, (ulong)cs + 8, (ulong)fileLength, (ulong)fileLength - (ulong)cs, (ulong)fileLength + (ulong)cs,
            (ulong)l1, (ulong)reftable, dirOffset, (ulong)otherTable, (ulong)firstData,
            0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x800_0000, 0x800_0001, 1UL << 40, 1UL << 56, 1UL << 63, ulong.MaxValue,
        ];

        // 1. The extension's fields.
        foreach ((string field, int offset, int width) in new[] { ("nb_bitmaps", 8, 4), ("reserved", 12, 4), ("dir_size", 16, 8), ("dir_offset", 24, 8), ("ext_length", 4, 4) })
        {
            foreach (ulong v in edges)
                yield return ($"ext.{field}={v}", With(original, at + offset, width, v));
        }
        yield return ("autoclear=0", With(original, 88, 8, 0));
        yield return ("ext.type=0", With(original, at, 4, 0));

        // 2. Every field of every directory entry.
        foreach (Qcow2BitmapDirectoryEntry e in entries)
        {
            foreach ((string field, int offset, int width) in new[] { ("table_offset", 0, 8), ("table_size", 8, 4), ("flags", 12, 4), ("type", 16, 1), ("granularity_bits", 17, 1), ("name_size", 18, 2), ("extra_data_size", 20, 4) })
            {
                foreach (ulong v in edges.Concat<ulong>([(ulong)e.TableOffset + 512, e.TableSize + 1UL, e.TableSize - 1UL, e.Flags ^ 1UL, e.Flags ^ 2UL, 4, 3, (ulong)e.GranularityBits + 1]))
                    yield return ($"{e.Name}.{field}={v}", With(original, e.EntryOffset + offset, width, v));
            }
        }

        // 3. Bitmap table entries pointing anywhere.
        ulong[] pointers =
        [
            1, 2, 0x100, 0x1FF, (ulong)fileLength, (ulong)fileLength + (ulong)cs, (ulong)l1, (ulong)reftable, dirOffset, (ulong)otherTable,
            (ulong)firstData, (ulong)firstData | 1, (ulong)firstData + 512, 1UL << 56, 1UL << 63, ulong.MaxValue, (ulong)cs,
        ];
        foreach (Qcow2BitmapDirectoryEntry e in entries)
        {
            for (int i = 0; i < Math.Min(3, (int)e.TableSize); i++)
            {
                foreach (ulong v in pointers)
                    yield return ($"{e.Name}.table[{i}]={v:x}", With(original, e.TableOffset + (i * 8), 8, v));
            }
        }

        // 4. Random flips in the extension record, the directory, the tables and the data.
        var hot = new List<(long Start, long Length)> { (at, 32), ((long)dirOffset, (long)dirSize) };
        foreach (Qcow2BitmapDirectoryEntry e in entries)
            hot.Add((e.TableOffset, (long)e.TableSize * 8));
        if (firstData > 0)
            hot.Add((firstData, cs));
        for (int i = 0; i < 150; i++)
        {
            (long start, long length) = hot[rng.Next(hot.Count)];
            byte[] copy = (byte[])original.Clone();
            for (int k = rng.Next(1, 4); k > 0; k--)
            {
                long p = start + rng.NextInt64(Math.Max(1, length));
                if (p < copy.Length)
                    copy[p] = (byte)rng.Next(256);
            }
            yield return ($"flip-{i}", copy);
        }

        // 5. Truncation inside the bitmap structures.
        foreach (long cut in hot.SelectMany(h => new[] { h.Start, h.Start + 1, h.Start + (h.Length / 2) }).Where(c => c > 0 && c < fileLength).Distinct())
            yield return ($"truncate@{cut}", original.AsSpan(0, (int)cut).ToArray());
    }

    /// <summary>The first data cluster any bitmap table names, or 0.</summary>
    private static long FirstDataCluster(byte[] file, IReadOnlyList<Qcow2BitmapDirectoryEntry> entries)
    {
        foreach (Qcow2BitmapDirectoryEntry e in entries)
        {
            for (int i = 0; i < e.TableSize && e.TableOffset + (i * 8) + 8 <= file.Length; i++)
            {
                long offset = (long)(BinaryPrimitives.ReadUInt64BigEndian(file.AsSpan((int)e.TableOffset + (i * 8))) & 0x00FF_FFFF_FFFF_FE00UL);
                if (offset != 0)
                    return offset;
            }
        }
        return 0;
    }

    private static byte[] With(byte[] original, long offset, int width, ulong value)
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
            case 2:
                BinaryPrimitives.WriteUInt16BigEndian(field, (ushort)value);
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

    #endregion
}
