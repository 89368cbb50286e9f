using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Closing a node as Close-BlockNode does, so that whoever closes one names what is lost with it.</summary>
internal static class NodeClosing
{
    /// <summary>
    /// Close the node (persistent bitmaps stored, image flushed and released). Returns the warning that names its
    /// non-persistent bitmaps, which end with it, or null when it had none. Engine errors (NodeBusy...) are thrown.
    /// </summary>
    public static string? Close(BlockEngine engine, BlockNode node)
    {
        string[] dropped = node.Bitmaps.Where(b => !b.Persistent).Select(b => $"'{b.Name}' ({b.Count} dirty bytes)").ToArray();
        engine.Close(node);
        return dropped.Length > 0 ? $"Node '{node.Name}' closed; its bitmaps {string.Join(", ", dropped)} were not persistent and are gone." : null;
    }
}
