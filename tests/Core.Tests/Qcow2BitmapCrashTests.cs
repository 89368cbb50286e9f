using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;
using static BitmapBackup.Core.Tests.Qcow2TestHelpers;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Crash consistency of the bitmap store: every write and fsync of a whole session (open and mark in use, guest
/// writes, a bitmap added, one removed, store at close) is recorded, and the states a crash could leave are
/// rebuilt: every prefix of the writes, and every single write of an fsync epoch on top of the epochs before it
/// (writes between two fsyncs may reach the disk in any order). Each state must pass qemu-img check without
/// corruption (leaks are allowed), load here, and hold each bitmap either in use or with the bits of a state the
/// session really passed through: never a bitmap read from clusters that were not written yet.
/// </summary>
public sealed class Qcow2BitmapCrashTests
{
    [Theory]
    [InlineData(65536)]
    [InlineData(512)]
    public void EveryCrashPoint_LeavesTheOldOrTheNewBitmaps_NeverGarbage(int clusterSize)
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string img = dir.File("session.qcow2");
        Qcow2Image.Create(img, 8 * MiB, clusterSize);
        HierarchicalBitmap a0, b0;
        using (BlockNode node = Qcow2BitmapNodes.Open(img))
        {
            node.AddBitmap("a", 4096, persistent: true);
            node.AddBitmap("b", 65536, persistent: true, disabled: true);
            node.Write(0, Pattern(20000, 1));
            node.GetBitmap("b").MarkDirty(5 * MiB, 300000);
            a0 = node.GetBitmap("a").Snapshot();
            b0 = node.GetBitmap("b").Snapshot();
        }
        byte[] before = File.ReadAllBytes(img);

        var log = new List<(long Offset, byte[]? Data)>();
        HierarchicalBitmap a1, c1;
        var image = Qcow2Image.Open(img, readOnly: false);
        image.ObserveFile((offset, data) => log.Add((offset, data)));
        var node2 = new BlockNode("s", image, new Qcow2BitmapStore(image));
        node2.LoadPersistentBitmaps();
        node2.Write(2 * MiB, Pattern(70000, 2));
        node2.AddBitmap("c", 65536, persistent: true);
        node2.Write(7 * MiB, Pattern(1000, 3));
        node2.RemoveBitmap(node2.GetBitmap("b"));
        a1 = node2.GetBitmap("a").Snapshot();
        c1 = node2.GetBitmap("c").Snapshot();
        node2.Dispose();
        Assert.NotEqual(0, a0.Count);
        Assert.NotEqual(a0.Count, a1.Count);
        Assert.NotEqual(0, c1.Count);
        Assert.NotEqual(0, b0.Count);

        var expected = new Dictionary<string, HierarchicalBitmap[]>
        {
            ["a"] = [a0, a1],
            ["b"] = [b0],
            ["c"] = [c1],
        };
        var states = new List<(string Name, List<(long Offset, byte[] Data)> Writes)>();
        var writes = log.Where(w => w.Data is not null).Select(w => (w.Offset, w.Data!)).ToList();
        for (int k = 0; k <= writes.Count; k++)
            states.Add(($"prefix {k}/{writes.Count}", writes.Take(k).ToList()));
        var done = new List<(long, byte[])>();
        var epoch = new List<(long, byte[])>();
        int epochs = 0;
        foreach ((long offset, byte[]? data) in log.Append((-1, null)))
        {
            if (data is not null)
            {
                epoch.Add((offset, data));
                continue;
            }
            if (epoch.Count > 1)
            {
                for (int i = 0; i < epoch.Count; i++)
                    states.Add(($"epoch {epochs} write {i} alone", [.. done, epoch[i]]));
            }
            done.AddRange(epoch);
            epoch.Clear();
            epochs++;
        }

        string crashed = dir.File("crashed.qcow2");
        var failures = new List<string>();
        foreach ((string name, List<(long Offset, byte[] Data)> applied) in states)
        {
            byte[] file = Apply(before, applied);
            File.WriteAllBytes(crashed, file);
            string? failure = CheckState(crashed, expected);
            if (failure is not null)
                failures.Add($"{name}: {failure}");
            if (failures.Count > 10)
                break;
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {states.Count} crash states are bad:\n" + string.Join("\n", failures));
        Assert.True(writes.Count > 20, $"only {writes.Count} writes recorded");
    }

    private static byte[] Apply(byte[] before, List<(long Offset, byte[] Data)> writes)
    {
        long length = Math.Max(before.Length, writes.Count == 0 ? 0 : writes.Max(w => w.Offset + w.Data.Length));
        var file = new byte[length];
        before.CopyTo(file, 0);
        foreach ((long offset, byte[] data) in writes)
            data.CopyTo(file, offset);
        return file;
    }

    /// <summary>Null when the state is one a crash may leave: checked clean but for leaks, loadable, bits from a real state.</summary>
    private static string? CheckState(string path, Dictionary<string, HierarchicalBitmap[]> expected)
    {
        QemuResult check = QemuImg.Run("check", "--output=json", path);
        if (check.ExitCode is not (0 or 3)) // 3: leaks only
            return $"qemu-img check exited {check.ExitCode}: {check.Stdout}{check.Stderr}";
        IReadOnlyList<StoredBitmap> stored;
        try
        {
            stored = Qcow2BitmapNodes.Load(path);
        }
        catch (Errors.BlockException e)
        {
            return "Load: " + e.Message;
        }
        string names = string.Join(",", stored.Select(s => s.Name));
        if (names is not ("a,b" or "a,b,c" or "a,c"))
            return $"bitmaps {names}";
        foreach (StoredBitmap s in stored)
        {
            if (s.InUse)
                continue;
            if (!expected[s.Name].Any(e => e.Runs().SequenceEqual(s.Bits!.Runs())))
                return $"bitmap '{s.Name}' is consistent with {s.Bits!.Count} bits, a state it never had";
        }
        List<(string Name, long Granularity, string Flags)> qemu = Qcow2BitmapNodes.QemuBitmaps(path);
        if (string.Join(",", qemu.Select(q => q.Name)) != names)
            return $"qemu-img info lists {string.Join(",", qemu.Select(q => q.Name))}, we load {names}";
        return null;
    }
}
