using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup.Core.Persistence;

/// <summary>
/// One checkpoint of a node's crash-safe bitmaps, as a write-intent log slot holds it (docs/write-intent-log.md):
/// the exact bits and recording state of every crash-safe bitmap at one instant taken under the node's write gate.
/// <see cref="Clean"/>: written at a clean close, after the bitmaps were stored in the image; it keeps only which
/// bitmaps are crash-safe (no bits), and a crash-free image never needs the log's bits.
/// </summary>
public sealed record IntentCheckpoint(long Generation, bool Clean, long NodeSize, IReadOnlyList<IntentCheckpointEntry> Bitmaps)
{
    /// <summary>The entry of bitmap <paramref name="name"/>, or null.</summary>
    public IntentCheckpointEntry? Find(string name) => Bitmaps.FirstOrDefault(b => string.Equals(b.Name, name, StringComparison.Ordinal));
}

/// <summary>
/// A crash-safe bitmap in a checkpoint. <see cref="Bits"/>: its bits united with those of its successor (a backup in
/// progress at the checkpoint comes back as a failed one: no bit lost); null when it is inconsistent or the checkpoint
/// is clean. <see cref="Recording"/>: whether writes were being recorded into it (by it or its successor), which says
/// whether the log's intent regions belong to it after a crash.
/// </summary>
public sealed record IntentCheckpointEntry(string Name, long Granularity, bool Recording, bool Inconsistent, bool Recovered, HierarchicalBitmap? Bits);
