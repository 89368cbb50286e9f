using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup.Core.Export;

/// <summary>
/// The NBD exports of the process, by export name (unique, case-sensitive). Exports belong to the process, as nodes
/// do: the module uses <see cref="Default"/> and stops them all when its last runspace removes it and when the
/// process exits, before the nodes are closed. Tests make their own.
/// </summary>
public sealed class ExportRegistry
{
    /// <summary>How long <see cref="Stop"/> lets the requests in flight finish before it closes the connections.</summary>
    public static readonly TimeSpan DefaultDrainTimeout = TimeSpan.FromSeconds(5);

    private readonly Lock _lock = new();
    private readonly Dictionary<string, BlockExport> _exports = new(StringComparer.Ordinal);
    private readonly HashSet<string> _starting = new(StringComparer.Ordinal);

    public static ExportRegistry Default { get; } = new();

    /// <summary>The exports, ordered by name.</summary>
    public IReadOnlyList<BlockExport> Exports
    {
        get
        {
            lock (_lock)
                return _exports.Values.OrderBy(e => e.Name, StringComparer.Ordinal).ToArray();
        }
    }

    public BlockExport? Find(string name)
    {
        lock (_lock)
            return _exports.GetValueOrDefault(name);
    }

    /// <summary>
    /// Serve <paramref name="node"/> over NBD (<see cref="BlockExport"/>). The name (the node's when not given) is
    /// reserved while the export starts; the listener is bound outside the registry's lock.
    /// </summary>
    /// <exception cref="BlockException">ExportNameInUse, and those of BlockExport.Start.</exception>
    public BlockExport Start(BlockNode node, ExportOptions options)
    {
        string name = options.Name ?? node.Name;
        lock (_lock)
        {
            if (_exports.ContainsKey(name) || _starting.Contains(name))
                Throw.Block(ErrorIds.ExportNameInUse, BlockErrorCategory.ResourceExists,
                    $"Export name '{name}' is already in use{(_exports.TryGetValue(name, out BlockExport? other) ? $" (node '{other.Node.Name}' at {other.Uri})" : "")}.", name);
            _starting.Add(name);
        }
        try
        {
            BlockExport export = BlockExport.Start(node, name, options);
            lock (_lock)
                _exports.Add(name, export);
            return export;
        }
        finally
        {
            lock (_lock)
                _starting.Remove(name);
        }
    }

    /// <summary>Stop an export (drain, then disconnect) and forget it; returns how many clients it had.</summary>
    public int Stop(BlockExport export, TimeSpan? drainTimeout = null)
    {
        int clients = export.Stop(drainTimeout ?? DefaultDrainTimeout);
        lock (_lock)
        {
            if (_exports.TryGetValue(export.Name, out BlockExport? known) && known == export)
                _exports.Remove(export.Name);
        }
        return clients;
    }

    /// <summary>Stop every export, all draining at once within <paramref name="drainTimeout"/> in all; returns each with its client count.</summary>
    public IReadOnlyList<(BlockExport Export, int Clients)> StopAll(TimeSpan? drainTimeout = null)
    {
        BlockExport[] exports = [.. Exports];
        Task<int>[] stops = exports.Select(e => Task.Run(() => Stop(e, drainTimeout))).ToArray();
        Task.WaitAll(stops);
        return exports.Select((e, i) => (e, stops[i].Result)).ToArray();
    }

    /// <summary>The exports of one node.</summary>
    public IReadOnlyList<BlockExport> ExportsOf(BlockNode node) => Exports.Where(e => e.Node == node).ToArray();
}
