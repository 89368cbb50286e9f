using BitmapBackup.Bench;

// Usage: BitmapBackup.Bench [suite ...]   (no arguments: every suite). Build with -c Release.
// BitmapBackup.Bench nbd-server IMAGE SOCKET [BITMAP] is the nbd suite's server process, not a suite.
if (args.Length > 0 && args[0] == "nbd-server")
    return NbdServerHost.Run(args[1..]);

var suites = new Dictionary<string, Action<TextWriter>>(StringComparer.OrdinalIgnoreCase)
{
    ["bitmap"] = BitmapBench.Run,
    ["qcow2"] = Qcow2Bench.Run,
    ["backup"] = BackupBench.Run,
    ["digest"] = DigestBench.Run,
    ["cache"] = CacheBench.Run,
    ["huge"] = BackupBench.RunHuge,
    ["compress"] = CompressBench.Run,
    ["nbd"] = NbdBench.Run,
    ["picture"] = PictureBench.Run,
    ["devices"] = DeviceBench.Run,
    ["intent"] = IntentBench.Run,
};

string[] selected = args.Length == 0 ? [.. suites.Keys] : args;
string[] unknown = [.. selected.Where(name => !suites.ContainsKey(name))];
if (unknown.Length > 0)
{
    Console.Error.WriteLine($"Unknown suite(s): {string.Join(", ", unknown)}. Known: {string.Join(", ", suites.Keys)}.");
    return 2;
}

foreach (string name in selected)
{
    suites[name](Console.Out);
}

return 0;
