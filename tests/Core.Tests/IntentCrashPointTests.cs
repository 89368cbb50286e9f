using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Formats.Raw;
using BitmapBackup.Core.Jobs;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Persistence;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Every crash point of a short session, without relying on timing (in the spirit of ALICE and CrashMonkey). The
/// session's writes and fdatasyncs to the image and to its write-intent log are recorded in order; then, for every
/// prefix of them, the files are rebuilt as a crash could leave them: what each file synced before the crash point is
/// there; what it wrote after its last sync is kept, dropped, or kept in one file and dropped in the other. Each state
/// is opened (read-only, so the state is not changed) and must hold the invariant: every crash-safe bitmap loads
/// consistent, as a superset of the writes it was recording that reached the image, and the disabled one exactly as it
/// was. A torn intent block must load inconsistent; a torn checkpoint falls back to the other one, still a superset.
/// </summary>
public sealed class IntentCrashPointTests
{
    private const long Size = 4 << 20;
    private const long Region = 64 << 10;

    private sealed record Event(bool Log, long Offset, byte[]? Data);

    /// <summary>One step of the session: the events it made are [Start, End).</summary>
    private sealed record Op(string Kind, int Start, int End, long Offset = 0, long Length = 0, string Bitmap = "", HierarchicalBitmap? Bits = null, long Granularity = 0);

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public void EveryCrashPointLeavesTheCrashSafeBitmapsASupersetOfTheirWrites(string format)
    {
        using var dir = new TempDirectory();
        string path = dir.File(format == "qcow2" ? "s.qcow2" : "s.img");
        BlockEngine.CreateImage(path, Size, format == "qcow2" ? ImageFormat.Qcow2 : ImageFormat.Raw, clusterSize: format == "qcow2" ? 4096 : null);
        string logPath = path + WriteIntentLog.Suffix;

        // Set up before the recorded window: bitmaps, the disabled one's bits, the log.
        var engine = new BlockEngine();
        BlockNode node = engine.Open(path, "s");
        node.CheckpointWindow = Timeout.InfiniteTimeSpan;
        node.WriteBackWindow = Timeout.InfiniteTimeSpan;
        node.IntentRegionSize = Region;
        node.AddBitmap("a", 65536, persistent: true, crashSafe: true);
        node.AddBitmap("f", 4096, persistent: true, crashSafe: true);
        DirtyBitmap off = node.AddBitmap("off", 4096, persistent: true, crashSafe: true);
        node.AddBitmap("z", 65536, persistent: true, crashSafe: true, disabled: true);
        DirtyBitmap src = node.AddBitmap("src", 4096);
        node.Write(3 << 20, new byte[5000]);
        off.Disable();
        src.MarkDirty(2 << 20, 200000);
        node.Flush();
        node.Checkpoint();
        node.Checkpoint(); // the intent empty: the window starts from a quiet log
        HierarchicalBitmap offBits = off.Snapshot();
        HierarchicalBitmap zBits = node.GetBitmap("z").Snapshot();
        byte[] image0 = File.ReadAllBytes(path);
        byte[] log0 = File.ReadAllBytes(logPath);

        var events = new List<Event>();
        void Observe(bool log, long offset, byte[]? data)
        {
            lock (events)
                events.Add(new Event(log, offset, data));
        }
        if (node.Image is RawImage raw)
            raw.Observer = (o, d) => Observe(false, o, d);
        else
            ((Qcow2Image)node.Image).ObserveFile((o, d) => Observe(false, o, d));
        node.IntentLog!.Observer = (o, d) => Observe(true, o, d);

        // The recorded session.
        var ops = new List<Op>();
        int Mark()
        {
            lock (events)
                return events.Count;
        }
        void Do(string kind, Action action, long offset = 0, long length = 0, string bitmap = "", HierarchicalBitmap? bits = null, long granularity = 0)
        {
            int start = Mark();
            action();
            ops.Add(new Op(kind, start, Mark(), offset, length, bitmap, bits, granularity));
        }
        var rng = new Random(format.Length * 1000 + 21);
        void Writes(int count)
        {
            for (int i = 0; i < count; i++)
            {
                long offset = rng.NextInt64(Size - 100_000) / 512 * 512;
                int length = rng.Next(1, 100_000);
                Do("write", () => node.Write(offset, new byte[length].AsSpan().Fill2((byte)(i + 1))), offset, length);
            }
        }
        Writes(6);
        for (int i = 0; i < 6; i++) // a sequential stream: marked ahead
        {
            long offset = (1 << 20) + (i * 40_000L);
            Do("write", () => node.Write(offset, new byte[40_000]), offset, 40_000);
        }
        Do("checkpoint", node.Checkpoint);
        Writes(4);
        Do("flush", node.Flush);
        Do("enable", () => node.GetBitmap("z").Enable(), bitmap: "z");
        Writes(4);
        HierarchicalBitmap srcBits = src.Snapshot();
        Do("merge", () => node.GetBitmap("a").MergeFrom([src]), bitmap: "a", bits: srcBits, granularity: 4096);
        Do("zeroes", () => node.WriteZeroes(Size - 200_000, 200_000), Size - 200_000, 200_000);
        Do("checkpoint", node.Checkpoint);
        Writes(3);
        Do("clear", () => node.GetBitmap("f").Clear(), bitmap: "f");
        Writes(3);
        Do("checkpoint", node.Checkpoint);
        Do("checkpoint", node.Checkpoint);
        Writes(3);
        BackupJob job = null!;
        Do("freeze", () =>
        {
            job = BackupJob.Start(new BackupRequest
            {
                Source = node, Target = dir.File("full.qcow2"), TargetFormat = ImageFormat.Qcow2, Sync = BackupSyncMode.Full,
                BitmapName = "a", BitmapMode = BitmapSyncMode.OnSuccess, AutoFinalize = false,
            });
            Assert.True(SpinWait.SpinUntil(() => job.Status == BlockJobStatus.Pending, TimeSpan.FromSeconds(30)));
        }, bitmap: "a");
        Writes(3); // recorded by the successor
        Do("checkpoint", node.Checkpoint);
        Do("abdicate", () =>
        {
            job.Complete();
            Assert.True(job.Completion.Wait(TimeSpan.FromSeconds(30)));
            Assert.True(job.Succeeded);
        }, bitmap: "a");
        Writes(3);
        node.SimulateCrash();

        Assert.True(events.Count(e => e.Log && e.Data is not null) > 15, $"only {events.Count(e => e.Log && e.Data is not null)} log writes recorded");
        IntentLogLayout layout = IntentLogFormat.DecodeHeader(log0, log0.Length, out _)!;

        // Every crash state, and every torn write of the log: a torn intent block is refused (inconsistent), a torn
        // checkpoint falls back to the other slot (still a superset). The files are advanced one event at a time.
        var failures = new List<string>();
        int states = 0, tornBlocks = 0, tornSlots = 0;
        var image = new CrashFile(image0);
        var log = new CrashFile(log0);
        for (int k = 0; k <= events.Count && failures.Count <= 10; k++)
        {
            if (k > 0)
                (events[k - 1].Log ? log : image).Apply(events[k - 1]);
            Dictionary<string, List<(long, long)>> required = Required(ops, events, k);
            foreach ((bool keepImage, bool keepLog) in new[] { (true, true), (false, false), (true, false), (false, true) })
            {
                if (!(image.Pending || log.Pending) && !(keepImage && keepLog))
                    continue; // the same state as "kept"
                states++;
                string? problem = Check(path, logPath, keepImage ? image.Current : image.Durable, keepLog ? log.Current : log.Durable,
                    required, offBits, zBits, ops, k, expectConsistent: true);
                if (problem is not null)
                    failures.Add($"crash after event {k}/{events.Count} (image pending {(keepImage ? "kept" : "dropped")}, log pending {(keepLog ? "kept" : "dropped")}): {problem}");
            }
            if (k == events.Count || events[k] is not { Log: true, Data: not null } e)
                continue;
            bool isSlot = e.Offset >= layout.SlotOffset(0);
            byte[] torn = (byte[])log.Current.Clone();
            // Only the first part of the write reached the disk: for a block, its first 2 KiB; for a slot, its first half.
            int part = isSlot ? e.Data.Length / 2 : 2048;
            for (int at = 0; at < e.Data.Length; at += IntentLogLayout.BlockSize)
            {
                int n = Math.Min(part, e.Data.Length - at);
                ReadOnlySpan<byte> whole = e.Data.AsSpan(at, Math.Min(IntentLogLayout.BlockSize, e.Data.Length - at));
                ReadOnlySpan<byte> old = torn.AsSpan((int)e.Offset + at, whole.Length);
                if (whole.SequenceEqual(old))
                    continue; // this block is not changed by the write
                if (whole[n..].SequenceEqual(old[n..]) || whole[..n].SequenceEqual(old[..n]))
                    continue; // torn there, it would read as the old or the new block: not a tear
                e.Data.AsSpan(at, n).CopyTo(torn.AsSpan((int)e.Offset + at));
                break; // one torn block (or slot) per state
            }
            if (torn.AsSpan().SequenceEqual(log.Current))
                continue;
            string? tornProblem;
            if (isSlot)
            {
                tornSlots++;
                tornProblem = Check(path, logPath, image.Current, torn, required, offBits, zBits, ops, k, expectConsistent: true);
            }
            else
            {
                tornBlocks++;
                tornProblem = CheckInconsistent(path, logPath, image.Current, torn);
            }
            if (tornProblem is not null)
                failures.Add($"torn {(isSlot ? "checkpoint" : "intent block")} write at event {k}: {tornProblem}");
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {states} crash states are bad:\n" + string.Join("\n", failures));
        Assert.True(tornBlocks > 5 && tornSlots > 3, $"torn blocks {tornBlocks}, torn slots {tornSlots}");
    }

    /// <summary>
    /// One file as a crash could leave it, advanced event by event: Current has every write so far, Durable only those
    /// made before the file's last fdatasync; Pending says whether they differ.
    /// </summary>
    private sealed class CrashFile(byte[] initial)
    {
        private readonly List<Event> _pending = [];

        public byte[] Current { get; private set; } = (byte[])initial.Clone();

        public byte[] Durable { get; private set; } = (byte[])initial.Clone();

        public bool Pending => _pending.Count > 0;

        public void Apply(Event e)
        {
            if (e.Data is null)
            {
                foreach (Event p in _pending)
                    Durable = Put(Durable, p);
                _pending.Clear();
                return;
            }
            Current = Put(Current, e);
            _pending.Add(e);
        }

        private static byte[] Put(byte[] file, Event e)
        {
            if (e.Offset + e.Data!.Length > file.Length)
                Array.Resize(ref file, (int)(e.Offset + e.Data.Length));
            e.Data.CopyTo(file, e.Offset);
            return file;
        }
    }

    /// <summary>What each bitmap must hold after a crash following event k (byte ranges), given the session's steps.</summary>
    private static Dictionary<string, List<(long, long)>> Required(List<Op> ops, List<Event> events, int k)
    {
        var required = new Dictionary<string, List<(long, long)>> { ["a"] = [], ["f"] = [], ["z"] = [] };
        var recording = new HashSet<string> { "a", "f" };
        var sinceFreeze = new List<(long, long)>();
        bool frozen = false;
        foreach (Op op in ops)
        {
            if (op.Start >= k)
                break;
            switch (op.Kind)
            {
                case "write" or "zeroes":
                    // required once the write reached the image: any of its image events lies before the crash
                    bool reached = Enumerable.Range(op.Start, Math.Min(op.End, k) - op.Start).Any(i => !events[i].Log && events[i].Data is not null);
                    if (!reached)
                        break;
                    foreach (string b in recording)
                        required[b].Add((op.Offset, op.Length));
                    if (frozen)
                        sinceFreeze.Add((op.Offset, op.Length));
                    break;
                case "enable":
                    if (op.End <= k)
                        recording.Add(op.Bitmap);
                    break;
                case "merge":
                    if (op.End <= k)
                    {
                        foreach ((long start, long count) in op.Bits!.Runs())
                            required[op.Bitmap].Add((start * op.Granularity, count * op.Granularity));
                    }
                    break;
                case "clear":
                    required[op.Bitmap].Clear(); // in flight or done: the older bits are no longer owed
                    break;
                case "freeze":
                    frozen = true;
                    break;
                case "abdicate":
                    required[op.Bitmap] = [.. sinceFreeze]; // in flight or done: only the writes since the backup's point in time are owed
                    break;
            }
        }
        return required;
    }

    private static readonly Dictionary<string, byte[]> OnDisk = [];

    /// <summary>Make the file hold <paramref name="bytes"/>, rewriting only the 4 KiB pieces that differ from the last state.</summary>
    private static void WriteInPlace(string path, byte[] bytes)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Write); // same inode: the log's identity check holds
        lock (OnDisk)
        {
            if (!OnDisk.TryGetValue(path, out byte[]? was) || was.Length != bytes.Length)
            {
                fs.SetLength(bytes.Length);
                fs.Write(bytes);
            }
            else
            {
                for (int at = 0; at < bytes.Length; at += 4096)
                {
                    int n = Math.Min(4096, bytes.Length - at);
                    if (bytes.AsSpan(at, n).SequenceEqual(was.AsSpan(at, n)))
                        continue;
                    fs.Position = at;
                    fs.Write(bytes, at, n);
                }
            }
            OnDisk[path] = (byte[])bytes.Clone();
        }
    }

    private static string? Check(string path, string logPath, byte[] image, byte[] log, Dictionary<string, List<(long, long)>> required,
        HierarchicalBitmap offBits, HierarchicalBitmap zBits, List<Op> ops, int k, bool expectConsistent)
    {
        WriteInPlace(path, image);
        WriteInPlace(logPath, log);
        BlockNode node;
        try
        {
            node = new BlockEngine().Open(path, "c", readOnly: true);
        }
        catch (Errors.BlockException e)
        {
            return "open: " + e.Message;
        }
        try
        {
            foreach (string name in new[] { "a", "f", "off", "z" })
            {
                DirtyBitmap b = node.GetBitmap(name);
                if (b.Inconsistent && expectConsistent)
                    return $"bitmap '{name}' is inconsistent";
            }
            foreach ((string name, List<(long, long)> ranges) in required)
            {
                DirtyBitmap bitmap = node.GetBitmap(name);
                HierarchicalBitmap bits = bitmap.Snapshot();
                foreach ((long offset, long length) in ranges)
                {
                    long end = (offset + length - 1) / bitmap.Granularity + 1;
                    long clear = bits.NextClear(offset / bitmap.Granularity, end);
                    if (clear >= 0 && clear < end)
                        return $"bitmap '{name}' misses byte {clear * bitmap.Granularity} of the write at {offset}+{length}";
                }
            }
            if (!node.GetBitmap("off").Snapshot().Runs().SequenceEqual(offBits.Runs()))
                return "the disabled bitmap 'off' changed";
            bool enableStarted = ops.Any(o => o.Kind == "enable" && o.Start < k);
            if (!enableStarted && !node.GetBitmap("z").Snapshot().Runs().SequenceEqual(zBits.Runs()))
                return "bitmap 'z' changed while it was disabled";
            return null;
        }
        finally
        {
            node.Dispose();
        }
    }

    private static string? CheckInconsistent(string path, string logPath, byte[] image, byte[] log)
    {
        WriteInPlace(path, image);
        WriteInPlace(logPath, log);
        using BlockNode node = new BlockEngine().Open(path, "c", readOnly: true);
        foreach (string name in new[] { "a", "f", "off", "z" })
        {
            if (!node.GetBitmap(name).Inconsistent)
                return $"bitmap '{name}' loaded consistent from a torn log";
        }
        return null;
    }
}

internal static class SpanFill
{
    /// <summary>Fill and return the span (a recognizable pattern per write).</summary>
    public static ReadOnlySpan<byte> Fill2(this Span<byte> span, byte value)
    {
        span.Fill(value);
        return span;
    }
}
