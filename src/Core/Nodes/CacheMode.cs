namespace BitmapBackup.Core.Nodes;

/// <summary>When a node's writes become durable (QEMU's cache modes of the same names).</summary>
public enum CacheMode
{
    /// <summary>Writes return once the driver has them; data and metadata are synced within the node's write-back window, at a backup's start, at <c>Sync-BlockNode</c> and at close.</summary>
    WriteBack,

    /// <summary>Every write is synced (data, metadata, fdatasync) before it returns.</summary>
    WriteThrough,
}
