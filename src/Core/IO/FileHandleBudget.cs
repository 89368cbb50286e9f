using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/*
 * How many backing files this process keeps open at once. A backing chain is opened whole (every image's header
 * and tables are read and checked), but the descriptors of its read-only backing files are parkable
 * (ParkableFileHandle): when more of them are open than the budget allows, the least recently used idle one is
 * closed, and it opens itself again at its next use. So a chain of any depth costs at most the budget in file
 * descriptors, and a chain within the budget (every chain, under the usual limits) keeps every file open and
 * locked as QEMU does.
 *
 * The budget is a quarter of the process's soft limit on open files (RLIMIT_NOFILE, which .NET raises to the
 * hard limit at start), between 16 and 1024: nodes, targets, sidecars and sockets keep the rest. Only images
 * opened as backing files are parkable: a node, a backup target or the image a command names keeps its descriptor
 * (and its locks) for as long as it is open. When an open fails with EMFILE or ENFILE anyway, every idle parkable
 * descriptor is closed and the open is tried once more (ImageFiles).
 *
 * Recency is a global counter stamped on each use, so a use costs no lock here; choosing the victim scans the
 * open set, which happens only when a parkable file is opened or reopened.
 */
internal static class FileHandleBudget
{
    private static readonly object s_gate = new();
    private static readonly HashSet<ParkableFileHandle> s_open = [];
    private static long s_clock;
    private static int? s_limitOverride;

    /// <summary>Parkable descriptors this process keeps open at most.</summary>
    public static int Limit => s_limitOverride ?? DefaultLimit;

    /// <summary>Test hook: another limit (null: the default again).</summary>
    internal static int? LimitOverride
    {
        get => s_limitOverride;
        set
        {
            lock (s_gate)
            {
                s_limitOverride = value;
                ParkBeyond(Limit, except: null);
            }
        }
    }

    /// <summary>A quarter of the soft limit on open files, between 16 and 1024 (256 when the limit is unknown).</summary>
    public static int DefaultLimit { get; } = LinuxFile.OpenFileLimit() is (ulong soft, _)
        ? (int)Math.Clamp(soft / 4, 16UL, 1024UL)
        : 256;

    /// <summary>Parkable descriptors open now.</summary>
    public static int OpenCount
    {
        get
        {
            lock (s_gate)
                return s_open.Count;
        }
    }

    /// <summary>Times parked descriptors were opened again (a measure of thrashing, for tests and benchmarks).</summary>
    public static long Reopens => Interlocked.Read(ref s_reopens);

    private static long s_reopens;

    internal static long Tick() => Interlocked.Increment(ref s_clock);

    /// <summary>A parkable descriptor was opened (first, or again): count it, and park others beyond the budget.</summary>
    internal static void Opened(ParkableFileHandle handle, bool again)
    {
        if (again)
            Interlocked.Increment(ref s_reopens);
        lock (s_gate)
        {
            s_open.Add(handle);
            ParkBeyond(Limit, except: handle);
        }
    }

    /// <summary>A parkable descriptor was closed for good.</summary>
    internal static void Closed(ParkableFileHandle handle)
    {
        lock (s_gate)
            s_open.Remove(handle);
    }

    /// <summary>Close every idle parkable descriptor (the process ran out of descriptors). Returns how many were closed.</summary>
    public static int ParkIdle()
    {
        lock (s_gate)
            return ParkBeyond(0, except: null);
    }

    /// <summary>Park least recently used idle descriptors until at most <paramref name="limit"/> stay open.</summary>
    private static int ParkBeyond(int limit, ParkableFileHandle? except)
    {
        if (s_open.Count <= limit)
            return 0;
        int parked = 0;
        foreach (ParkableFileHandle victim in s_open.Where(h => h != except).OrderBy(h => h.LastUse).ToList())
        {
            if (s_open.Count <= limit)
                break;
            if (victim.TryPark())
            {
                s_open.Remove(victim);
                parked++;
            }
        }
        return parked;
    }
}
