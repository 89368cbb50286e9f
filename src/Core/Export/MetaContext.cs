namespace BitmapBackup.Core.Export;

/// <summary>What a metadata context describes.</summary>
public enum MetaContextKind
{
    /// <summary><c>base:allocation</c>: allocation through the backing chain (bit 0 hole, bit 1 zero).</summary>
    BaseAllocation,

    /// <summary><c>qemu:dirty-bitmap:NAME</c>: one exported dirty bitmap (bit 0 dirty).</summary>
    DirtyBitmap,
}

/// <summary>
/// A metadata context an export offers. Ids are QEMU's fixed ones, so that traces of both servers read alike:
/// base:allocation is 0, id 1 is qemu:allocation-depth (not offered here), exported bitmap <c>i</c> is 2 + i.
/// Clients treat ids as opaque.
/// </summary>
/// <param name="Id">The context id sent with NBD_REP_META_CONTEXT (0 in a LIST reply) and in BLOCK_STATUS chunks.</param>
/// <param name="Name">The full context name, e.g. <c>qemu:dirty-bitmap:daily</c>.</param>
/// <param name="Kind">What it describes.</param>
/// <param name="BitmapIndex">For a dirty-bitmap context, the index of the bitmap in the export's list; -1 otherwise.</param>
public sealed record MetaContext(uint Id, string Name, MetaContextKind Kind, int BitmapIndex)
{
    public const string BaseAllocation = "base:allocation";

    public const string DirtyBitmapPrefix = "qemu:dirty-bitmap:";
}
