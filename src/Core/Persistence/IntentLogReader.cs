using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.IO;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Persistence;

/// <summary>
/// A write-intent log as found when its image is opened: the newest valid checkpoint and the union of the intent
/// blocks. <see cref="Problem"/> says why it cannot be used to recover the image's bitmaps (damaged, torn, another
/// image's); <see cref="Checkpoint"/> may still name the crash-safe bitmaps then.
/// </summary>
public sealed record IntentLogContents(string Path, IntentLogLayout? Layout, IntentCheckpoint? Checkpoint, HierarchicalBitmap? Intent, string? Problem)
{
    /// <summary>Whether the checkpoint and the intent regions may be used to rebuild bitmaps left in use by a crash.</summary>
    public bool CanRecover => Problem is null && Checkpoint is { Clean: false } && Intent is not null;

    /// <summary>The checkpoint's entry for a stored bitmap (same name and granularity): the bitmap is crash-safe; or null.</summary>
    public IntentCheckpointEntry? EntryFor(StoredBitmap stored)
        => Checkpoint?.Find(stored.Name) is { } e && e.Granularity == stored.Granularity ? e : null;

    /// <summary>
    /// Whether a stored bitmap left in use by a crash is rebuilt from this log at the next open (not loaded inconsistent):
    /// the log lists it, can be trusted, and is not being written (<paramref name="forceShare"/>: its writer may run).
    /// </summary>
    public bool Rebuilds(StoredBitmap stored, bool forceShare)
        => stored.InUse && !forceShare && CanRecover && EntryFor(stored) is { Inconsistent: false };
}

/// <summary>Reads a write-intent log and checks everything in it before any of it is trusted.</summary>
public static class IntentLogReader
{
    /// <summary>
    /// The log beside an image, or null when there is none. Opened as the image's node is (a writer's or a reader's
    /// image locks; none with <paramref name="forceShare"/>). The log must belong to the image file
    /// (<paramref name="image"/>: device, inode, birth time) and describe a disk of <paramref name="nodeSize"/> bytes.
    /// </summary>
    public static IntentLogContents? Read(string path, FileIdentity? image, long nodeSize, bool readOnly, bool forceShare)
    {
        if (!File.Exists(path))
            return null;
        try
        {
            using SafeFileHandle handle = forceShare ? ImageFiles.OpenUnlocked(path) : ImageFiles.Open(path, readOnly);
            return Read(path, handle, image, nodeSize);
        }
        catch (BlockException e) when (e.ErrorId != ErrorIds.TooManyOpenFiles)
        {
            return new IntentLogContents(path, null, null, null, $"it cannot be read: {e.Message}");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return new IntentLogContents(path, null, null, null, $"it cannot be read: {e.Message}");
        }
    }

    internal static IntentLogContents Read(string path, SafeFileHandle handle, FileIdentity? image, long nodeSize)
    {
        long length = RandomAccess.GetLength(handle);
        byte[] header = new byte[IntentLogLayout.BlockSize];
        ReadExactly(handle, header, 0, length);
        IntentLogLayout? layout = IntentLogFormat.DecodeHeader(header, length, out string? problem);
        if (layout is null)
            return new IntentLogContents(path, null, null, null, problem);

        IntentCheckpoint? newest = null;
        for (int slot = 0; slot < 2; slot++)
        {
            byte[] bytes = new byte[layout.SlotCapacity];
            ReadExactly(handle, bytes, layout.SlotOffset(slot), length);
            IntentCheckpoint? c = IntentLogFormat.DecodeSlot(bytes, layout, out _);
            if (c is not null && IntentLogLayout.SlotOf(c.Generation) == slot && (newest is null || c.Generation > newest.Generation))
                newest = c;
        }
        if (newest is null)
            return new IntentLogContents(path, layout, null, null, "neither of its checkpoints is complete");
        if (image is { } id && layout.Image is { } own && id != own)
            return new IntentLogContents(path, layout, newest, null,
                $"it belongs to another image file (it was made for {own}; '{layout.ImageName}' here is {id}): it was copied or moved here, or the image was replaced");
        if (newest.NodeSize != nodeSize)
            return new IntentLogContents(path, layout, newest, null,
                $"it describes a disk of {newest.NodeSize} bytes, but the image is {nodeSize} bytes (it was resized without this module)");
        if (IntentLogLayout.BlocksFor(nodeSize, layout.RegionSize) > layout.IntentBlocks)
            return new IntentLogContents(path, layout, newest, null, "it has too few intent blocks for the disk");

        long regions = IntentLogLayout.RegionsFor(nodeSize, layout.RegionSize);
        ulong[] words = new ulong[(regions + 63) / 64];
        byte[] block = new byte[IntentLogLayout.BlockSize];
        for (int i = 0; i < layout.IntentBlocks; i++)
        {
            ReadExactly(handle, block, layout.BlockOffset(i), length);
            if (IntentLogFormat.DecodeBlock(block, layout, i, newest.Generation, words) is { } torn)
                return new IntentLogContents(path, layout, newest, null, torn);
        }
        var intent = new HierarchicalBitmap(regions);
        for (long w = 0; w < words.Length; w++)
        {
            ulong word = words[w];
            while (word != 0)
            {
                int bit = System.Numerics.BitOperations.TrailingZeroCount(word);
                long r = (w * 64) + bit;
                if (r >= regions)
                    return new IntentLogContents(path, layout, newest, null, "its intent blocks mark regions past the end of the disk");
                intent.Set(r, 1);
                word &= word - 1;
            }
        }
        return new IntentLogContents(path, layout, newest, intent, null);
    }

    private static void ReadExactly(SafeFileHandle handle, byte[] buffer, long offset, long fileLength)
    {
        int done = 0;
        while (done < buffer.Length && offset + done < fileLength)
        {
            int n = RandomAccess.Read(handle, buffer.AsSpan(done), offset + done);
            if (n == 0)
                break;
            done += n;
        }
        buffer.AsSpan(done).Clear();
    }
}
