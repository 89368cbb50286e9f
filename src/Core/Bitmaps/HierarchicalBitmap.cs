using System.Diagnostics;
using System.Diagnostics.CodeAnalysis;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace BitmapBackup.Core.Bitmaps;

/*
 * Hierarchical bitmap: a flat array of bits that can also skip empty regions quickly.
 *
 * The bits live in an ordinary array of 64-bit words, the leaf (level 0). Above it sit summary
 * levels, each 64 times smaller than the one below, up to a top level of exactly one word.
 * The single invariant that everything else relies on:
 *
 *     in every level L >= 1, bit N is set  iff  word N of level L-1 is non-zero.
 *
 * Two corollaries are kept as invariants too: leaf bits at or past Length are always zero, and
 * so are upper-level bits that stand for words past the end of the level below. (Serialize,
 * Count and the iterators depend on the first; the iterators' descent depends on the second.)
 *
 * A bit index therefore splits into 6-bit fields, one per level. For the 16,777,216-bit map of
 * a 1 TiB node at 64 KiB granularity (four levels, 24-bit indices):
 *
 *     bits 18-23 => bit in the top word (level 3, 1 word)
 *     bits 12-17 => bit in a level-2 word (64 words)     level-2 word = index >> 18
 *     bits  6-11 => bit in a level-1 word (4,096 words)  level-1 word = index >> 12
 *     bits  0-5  => bit in a leaf word (262,144 words)   leaf word    = index >> 6
 *
 * Level L has ceil(W(L-1) / 64) words, so the upper levels add 1/64 + 1/4096 + ... < 1/63 of the
 * leaf: 266,305 words against 262,144 for the map above, a ratio of 1.016.
 *
 * Costs, with w the number of leaf words an operation touches and B = 64:
 *   - Get, Count: O(1). Count is a field kept up to date from popcount deltas of every word
 *     that changes, never recomputed.
 *   - Set/Reset of a range within one word: one read-modify-write of the leaf word; the levels
 *     above are visited only when the word changes between zero and non-zero, and the walk
 *     up stops at the first level whose word does not change that way. A single dirty cluster
 *     costs a few nanoseconds.
 *   - Set/Reset of a longer range: O(w) at the leaf, then O(w/B) at level 1, O(w/B^2) at level 2
 *     and so on; again the walk stops at the first level that does not change. Reset needs a more
 *     careful test than Set: clearing bits in a word only clears the summary bit above if the
 *     whole word became zero, so the two edge words of each level are re-checked before going up.
 *   - NextSet: O(log_B n) worst case. It looks at the word holding "from"; if that is empty it
 *     climbs until a summary word has a set bit past the current position, then descends with
 *     one trailing-zero count per level. Iterating all runs is O(runs * log_B n) in the worst
 *     case and close to O(runs) in practice, because most climbs stop at level 1.
 *   - NextClear: scans leaf words for one that is not all ones (vectorised span search). The
 *     summary levels only record "non-zero", so they cannot skip full regions; for the dirty
 *     maps we keep, runs are short and the scan rarely leaves the starting word.
 *   - Merge (same length): visits only the leaf words that are non-zero in the source (found
 *     through its level 1), then ORs the upper levels word by word. OR is exact for summaries:
 *     (a | b) != 0 iff a != 0 or b != 0.
 *   - Merge across granularities: O(source runs) range Sets.
 *   - Resize, SetAll, ResetAll, Clone, CopyFrom: O(n / B) words.
 *   - Serialize/Deserialize: a byte copy of the leaf (little-endian words are already in the
 *     on-disk bit order); Deserialize then refreshes the summary bits of the words it wrote.
 */

/// <summary>
/// A bit-indexed dirty bitmap with summary levels for fast iteration, modelled on QEMU's HBitmap.
/// </summary>
/// <remarks>
/// <para>Bit <c>i</c> usually stands for cluster <c>i</c> of a disk at some granularity; the bitmap itself
/// knows nothing about bytes except in <see cref="Merge(HierarchicalBitmap, long, long)"/>.</para>
/// <para>Not thread-safe: callers serialise all access (including reads, and enumeration of
/// <see cref="Runs"/>) with their own lock. Mutating the bitmap between two steps of a
/// <see cref="Runs"/> enumeration is allowed on the same thread; the enumeration continues from the end
/// of the last run it returned and sees the current content.</para>
/// </remarks>
public sealed class HierarchicalBitmap
{
    // Word geometry. BitsPerWord = 1 << WordShift; index & WordMask is index % 64.
    private const int WordShift = 6;
    private const int BitsPerWord = 1 << WordShift;
    private const int WordMask = BitsPerWord - 1;

    // Rough per-array overhead on a 64-bit runtime (method table, sync block, length), for MemoryBytes.
    private const int ArrayOverheadBytes = 24;

    /// <summary>Largest supported length in bits: the leaf must fit in one managed array.</summary>
    public const long MaxLength = 0x7FFFFFC7L * BitsPerWord; // Array.MaxLength words of 64 bits

    // Shape: changes only in the constructor and Resize.
    private long _length;        // Number of bits. Leaf bits at or past it are always zero.
    private ulong[][] _levels;   // _levels[0] is the leaf; _levels[^1] is the single top word.

    // Content: changes with every mutation.
    private long _count;         // Number of set leaf bits.

    /// <summary>Creates a bitmap of <paramref name="length"/> bits, all clear.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="length"/> is negative or above <see cref="MaxLength"/>.</exception>
    public HierarchicalBitmap(long length)
    {
        if ((ulong)length > MaxLength)
        {
            ThrowLengthOutOfRange(nameof(length), length);
        }

        _length = length;
        _levels = AllocateLevels(length);
    }

    /// <summary>Number of bits.</summary>
    public long Length => _length;

    /// <summary>Number of set bits, O(1).</summary>
    public long Count => _count;

    /// <summary>Bytes of managed memory held by all levels.</summary>
    public long MemoryBytes
    {
        get
        {
            long bytes = 0;
            foreach (ulong[] level in _levels)
            {
                bytes += ArrayOverheadBytes + ((long)level.Length * sizeof(ulong));
            }

            return bytes;
        }
    }

    /// <summary>Number of levels including the leaf (1 when the whole bitmap fits in one word).</summary>
    internal int LevelCount => _levels.Length;

    /// <summary>Returns bit <paramref name="bit"/> (0-based).</summary>
    public bool Get(long bit)
    {
        if ((ulong)bit >= (ulong)_length)
        {
            ThrowIndexOutOfRange(nameof(bit), bit, _length);
        }

        // A ulong shift uses only the low 6 bits of its count, so (int)bit acts as bit % 64.
        return (_levels[0][bit >> WordShift] & (1UL << (int)bit)) != 0;
    }

    /// <summary>Sets <paramref name="count"/> bits starting at bit <paramref name="start"/> (0-based).</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside [0, Length).</exception>
    public void Set(long start, long count)
    {
        CheckRange(start, count, nameof(start), nameof(count));
        if (count == 0)
        {
            return;
        }

        long last = start + count - 1;
        long word = start >> WordShift;
        if (word == last >> WordShift)
        {
            // Fast path: the whole range lies in one leaf word (every tracked write at 64 KiB
            // granularity that is 64 KiB or smaller, and most larger ones).
            ulong[] leaf = _levels[0];
            ulong mask = (ulong.MaxValue >> (int)(BitsPerWord - count)) << (int)start;
            ulong old = leaf[word];
            ulong added = mask & ~old;
            if (added == 0)
            {
                return;
            }

            leaf[word] = old | mask;
            _count += BitOperations.PopCount(added);
            if (old == 0)
            {
                PropagateSet(word);
            }

            return;
        }

        SetSpan(start, last);
    }

    /// <summary>Clears <paramref name="count"/> bits starting at bit <paramref name="start"/> (0-based).</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside [0, Length).</exception>
    public void Reset(long start, long count)
    {
        CheckRange(start, count, nameof(start), nameof(count));
        if (count == 0)
        {
            return;
        }

        long last = start + count - 1;
        long word = start >> WordShift;
        if (word == last >> WordShift)
        {
            ulong[] leaf = _levels[0];
            ulong mask = (ulong.MaxValue >> (int)(BitsPerWord - count)) << (int)start;
            ulong old = leaf[word];
            ulong removed = old & mask;
            if (removed == 0)
            {
                return;
            }

            ulong now = old & ~mask;
            leaf[word] = now;
            _count -= BitOperations.PopCount(removed);
            if (now == 0)
            {
                PropagateReset(word);
            }

            return;
        }

        ResetSpan(start, last);
    }

    /// <summary>Sets every bit.</summary>
    public void SetAll()
    {
        if (_length == 0)
        {
            return;
        }

        ulong[] leaf = _levels[0];
        leaf.AsSpan().Fill(ulong.MaxValue);
        leaf[^1] = TailMask(_length);
        _count = _length;
        for (int level = 1; level < _levels.Length; level++)
        {
            RebuildLevel(_levels, level);
        }
    }

    /// <summary>Clears every bit.</summary>
    public void ResetAll()
    {
        foreach (ulong[] level in _levels)
        {
            Array.Clear(level);
        }

        _count = 0;
    }

    /// <summary>First set bit at or after <paramref name="from"/> and before <paramref name="end"/>, or -1.</summary>
    /// <remarks><paramref name="end"/> is clipped to <see cref="Length"/>; <paramref name="from"/> past it returns -1.</remarks>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="from"/> is negative or <paramref name="end"/> is below it.</exception>
    public long NextSet(long from, long end = long.MaxValue)
    {
        CheckQuery(from, end);
        return NextSetCore(from, Math.Min(end, _length));
    }

    /// <summary>First clear bit at or after <paramref name="from"/> and before <paramref name="end"/>, or -1.</summary>
    /// <remarks><paramref name="end"/> is clipped to <see cref="Length"/>; <paramref name="from"/> past it returns -1.</remarks>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="from"/> is negative or <paramref name="end"/> is below it.</exception>
    public long NextClear(long from, long end = long.MaxValue)
    {
        CheckQuery(from, end);
        return NextClearCore(from, Math.Min(end, _length));
    }

    /// <summary>The first maximal run of set bits starting at or after <paramref name="from"/>, clipped to end.</summary>
    /// <remarks>A run that covers <paramref name="from"/> is returned starting at <paramref name="from"/>.
    /// Returns false (and zeroes the outputs) when [from, end) holds no set bit.</remarks>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="from"/> is negative or <paramref name="end"/> is below it.</exception>
    public bool NextRun(long from, long end, out long start, out long count)
    {
        CheckQuery(from, end);
        long limit = Math.Min(end, _length);
        long first = NextSetCore(from, limit);
        if (first < 0)
        {
            start = 0;
            count = 0;
            return false;
        }

        long stop = NextClearCore(first, limit);
        start = first;
        count = (stop < 0 ? limit : stop) - first;
        return true;
    }

    /// <summary>Maximal runs of set bits in [from, end), in order.</summary>
    /// <remarks>Arguments are checked when this method is called, not when enumeration starts.</remarks>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="from"/> is negative or <paramref name="end"/> is below it.</exception>
    public IEnumerable<(long Start, long Count)> Runs(long from = 0, long end = long.MaxValue)
    {
        CheckQuery(from, end);
        return RunsIterator(from, end);
    }

    private IEnumerable<(long Start, long Count)> RunsIterator(long from, long end)
    {
        long position = from;
        while (true)
        {
            // Re-read the length every step: the caller may resize between steps.
            long limit = Math.Min(end, _length);
            long first = NextSetCore(position, limit);
            if (first < 0)
            {
                yield break;
            }

            long stop = NextClearCore(first, limit);
            if (stop < 0)
            {
                stop = limit;
            }

            yield return (first, stop - first);
            position = stop;
        }
    }

    /// <summary>Returns an independent copy.</summary>
    public HierarchicalBitmap Clone()
    {
        var copy = new HierarchicalBitmap(_length);
        copy.CopyFrom(this);
        return copy;
    }

    /// <summary>Replace content with that of a bitmap of the same length.</summary>
    /// <exception cref="ArgumentException">The lengths differ.</exception>
    public void CopyFrom(HierarchicalBitmap source)
    {
        CheckSameLength(source);
        if (ReferenceEquals(source, this))
        {
            return;
        }

        // Same length implies the same shape at every level.
        for (int level = 0; level < _levels.Length; level++)
        {
            source._levels[level].AsSpan().CopyTo(_levels[level]);
        }

        _count = source._count;
    }

    /// <summary>this |= source (same length).</summary>
    /// <exception cref="ArgumentException">The lengths differ.</exception>
    public void Merge(HierarchicalBitmap source)
    {
        CheckSameLength(source);
        if (ReferenceEquals(source, this))
        {
            return;
        }

        ulong[] target = _levels[0];
        ulong[] from = source._levels[0];
        long delta = 0;
        if (_levels.Length == 1)
        {
            ulong merged = target[0] | from[0];
            delta = BitOperations.PopCount(merged) - BitOperations.PopCount(target[0]);
            target[0] = merged;
        }
        else
        {
            // Visit only the source's non-zero leaf words, as listed by its level 1.
            ulong[] summary = source._levels[1];
            for (int k = 0; k < summary.Length; k++)
            {
                ulong pending = summary[k];
                while (pending != 0)
                {
                    int word = (k << WordShift) + BitOperations.TrailingZeroCount(pending);
                    pending &= pending - 1;
                    ulong old = target[word];
                    ulong merged = old | from[word];
                    delta += BitOperations.PopCount(merged) - BitOperations.PopCount(old);
                    target[word] = merged;
                }
            }

            // A summary word of (a | b) is exactly the OR of the summaries of a and b.
            for (int level = 1; level < _levels.Length; level++)
            {
                OrInto(_levels[level], source._levels[level]);
            }
        }

        _count += delta;
    }

    /// <summary>Merge between granularities: bit i of source covers bytes [i*sourceGranularity, (i+1)*sourceGranularity);
    /// every bit of this (granularity targetGranularity) overlapping a set source range gets set (clipped to Length).</summary>
    /// <remarks>Works in both directions: a finer source sets every coarser target bit it touches (rounding
    /// outwards), a coarser source sets every finer target bit it covers. The granularities need not divide each
    /// other. Cost: O(source runs) range Sets.</remarks>
    /// <exception cref="ArgumentOutOfRangeException">A granularity is zero or negative.</exception>
    public void Merge(HierarchicalBitmap source, long sourceGranularity, long targetGranularity)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(sourceGranularity);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(targetGranularity);
        if (sourceGranularity == targetGranularity && source._length == _length)
        {
            Merge(source);
            return;
        }

        if (ReferenceEquals(source, this))
        {
            // Setting bits while iterating our own runs would feed the output back into the input.
            source = Clone();
        }

        // Byte offsets fit in a long when the source's last byte does; otherwise use 128-bit arithmetic.
        bool narrow = source._length <= long.MaxValue / sourceGranularity;
        long position = 0;
        long sourceLength = source._length;
        while (position < sourceLength)
        {
            long first = source.NextSetCore(position, sourceLength);
            if (first < 0)
            {
                break;
            }

            long stop = source.NextClearCore(first, sourceLength);
            if (stop < 0)
            {
                stop = sourceLength;
            }

            position = stop;

            // Target bits [firstBit, endBit) overlap source bytes [first*sg, stop*sg): round the start down and
            // the end up.
            long firstBit, endBit;
            if (narrow)
            {
                long byteEnd = stop * sourceGranularity;
                firstBit = first * sourceGranularity / targetGranularity;
                endBit = (byteEnd / targetGranularity) + (byteEnd % targetGranularity != 0 ? 1 : 0);
            }
            else
            {
                Int128 byteEnd = (Int128)stop * sourceGranularity;
                Int128 wideFirst = (Int128)first * sourceGranularity / targetGranularity;
                Int128 wideEnd = (byteEnd + targetGranularity - 1) / targetGranularity;
                firstBit = (long)Int128.Min(wideFirst, _length);
                endBit = (long)Int128.Min(wideEnd, _length);
            }

            if (firstBit >= _length)
            {
                break; // runs come in order, so every later one is past the end too
            }

            endBit = Math.Min(endBit, _length);
            SetSpan(firstBit, endBit - 1);
        }
    }

    /// <summary>Grow (new bits clear) or shrink (bits past the end dropped).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="newLength"/> is negative or above <see cref="MaxLength"/>.</exception>
    public void Resize(long newLength)
    {
        if ((ulong)newLength > MaxLength)
        {
            ThrowLengthOutOfRange(nameof(newLength), newLength);
        }

        if (newLength == _length)
        {
            return;
        }

        if (newLength < _length)
        {
            // Clearing the dropped tail first fixes the count and every summary level; after that the arrays
            // can simply be truncated, because the bits they lose are all zero.
            ResetSpan(newLength, _length - 1);
        }

        ulong[][] old = _levels;
        long[] sizes = LevelSizes(newLength);
        var levels = new ulong[sizes.Length][];
        for (int level = 0; level < levels.Length; level++)
        {
            if (level < old.Length && old[level].Length == sizes[level])
            {
                levels[level] = old[level];
                continue;
            }

            levels[level] = new ulong[sizes[level]];
            if (level < old.Length)
            {
                int keep = (int)Math.Min(sizes[level], old[level].Length);
                old[level].AsSpan(0, keep).CopyTo(levels[level]);
            }
            else
            {
                // A level the old shape did not have (the bitmap grew past a power of 64 words).
                RebuildLevel(levels, level);
            }
        }

        _levels = levels;
        _length = newLength;
    }

    /// <summary>Bytes needed to serialize bits [startBit, startBit+bitCount): ceil(bitCount/8). startBit multiple of 8.</summary>
    public static long SerializedSize(long bitCount) => (bitCount + 7) / 8;

    /// <summary>QEMU order: bit N -> bit N%8 of byte N/8 (relative to startBit, which must be a multiple of 8).</summary>
    /// <remarks>Writes exactly <see cref="SerializedSize"/> bytes; unused high bits of a last partial byte are 0.</remarks>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside [0, Length).</exception>
    /// <exception cref="ArgumentException"><paramref name="startBit"/> is not a multiple of 8, or
    /// <paramref name="destination"/> is too short.</exception>
    public void Serialize(Span<byte> destination, long startBit, long bitCount)
    {
        CheckSerialization(startBit, bitCount, destination.Length, nameof(destination));
        int byteCount = (int)SerializedSize(bitCount);
        if (byteCount == 0)
        {
            return;
        }

        Span<byte> output = destination[..byteCount];
        long firstByte = startBit >> 3;
        if (BitConverter.IsLittleEndian)
        {
            // A little-endian ulong holds bit k in bit k%8 of byte k/8: the leaf already is the on-disk format.
            LeafBytes((int)firstByte, byteCount).CopyTo(output);
        }
        else
        {
            ulong[] leaf = _levels[0];
            for (int i = 0; i < byteCount; i++)
            {
                long b = firstByte + i;
                output[i] = (byte)(leaf[b >> 3] >> (int)((b & 7) * 8));
            }
        }

        int tailBits = (int)(bitCount & 7);
        if (tailBits != 0)
        {
            output[^1] &= (byte)((1 << tailBits) - 1);
        }
    }

    /// <summary>Inverse of Serialize: sets AND clears bits in the range from the bytes.</summary>
    /// <remarks>Bits outside the range keep their values; unused high bits of a last partial byte are ignored.</remarks>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside [0, Length).</exception>
    /// <exception cref="ArgumentException"><paramref name="startBit"/> is not a multiple of 8, or
    /// <paramref name="source"/> is too short.</exception>
    public void Deserialize(ReadOnlySpan<byte> source, long startBit, long bitCount)
    {
        CheckSerialization(startBit, bitCount, source.Length, nameof(source));
        if (bitCount == 0)
        {
            return;
        }

        ulong[] leaf = _levels[0];
        int firstWord = (int)(startBit >> WordShift);
        int lastWord = (int)((startBit + bitCount - 1) >> WordShift);
        long before = PopCount(leaf.AsSpan(firstWord, lastWord - firstWord + 1));

        int fullBytes = (int)(bitCount >> 3);
        int tailBits = (int)(bitCount & 7);
        long firstByte = startBit >> 3;
        if (BitConverter.IsLittleEndian)
        {
            Span<byte> bytes = LeafBytes((int)firstByte, fullBytes + (tailBits != 0 ? 1 : 0));
            source[..fullBytes].CopyTo(bytes);
            if (tailBits != 0)
            {
                byte keep = (byte)(0xFF << tailBits);
                bytes[^1] = (byte)((bytes[^1] & keep) | (source[fullBytes] & ~keep));
            }
        }
        else
        {
            int byteCount = fullBytes + (tailBits != 0 ? 1 : 0);
            for (int i = 0; i < byteCount; i++)
            {
                // Bits of the last partial byte past the range keep their old value.
                ulong keep = i < fullBytes ? 0UL : (0xFFUL << tailBits) & 0xFF;
                long b = firstByte + i;
                int shift = (int)((b & 7) * 8);
                ulong old = leaf[b >> 3];
                ulong value = (old >> shift & keep) | (source[i] & ~keep & 0xFF);
                leaf[b >> 3] = (old & ~(0xFFUL << shift)) | (value << shift);
            }
        }

        long after = PopCount(leaf.AsSpan(firstWord, lastWord - firstWord + 1));
        _count += after - before;
        RefreshSummaries(firstWord, lastWord);
    }

    /// <summary>Checks every structural invariant; throws <see cref="InvalidOperationException"/> on the first
    /// violation. O(n); for tests.</summary>
    internal void CheckInvariants()
    {
        long[] sizes = LevelSizes(_length);
        if (sizes.Length != _levels.Length)
        {
            throw new InvalidOperationException($"{_levels.Length} levels, expected {sizes.Length}.");
        }

        for (int level = 0; level < sizes.Length; level++)
        {
            if (_levels[level].Length != sizes[level])
            {
                throw new InvalidOperationException($"Level {level} has {_levels[level].Length} words, expected {sizes[level]}.");
            }
        }

        ulong[] leaf = _levels[0];
        if (_length > 0 && (leaf[^1] & ~TailMask(_length)) != 0)
        {
            throw new InvalidOperationException("Leaf bits past Length are set.");
        }

        if (_length == 0 && leaf[0] != 0)
        {
            throw new InvalidOperationException("Empty bitmap has a set bit.");
        }

        long count = PopCount(leaf);
        if (count != _count)
        {
            throw new InvalidOperationException($"Count is {_count}, leaf holds {count}.");
        }

        for (int level = 1; level < _levels.Length; level++)
        {
            ulong[] lower = _levels[level - 1];
            ulong[] upper = _levels[level];
            for (long bit = 0; bit < (long)upper.Length * BitsPerWord; bit++)
            {
                bool summary = (upper[bit >> WordShift] & (1UL << (int)bit)) != 0;
                bool nonZero = bit < lower.Length && lower[bit] != 0;
                if (summary != nonZero)
                {
                    throw new InvalidOperationException($"Level {level} bit {bit} is {summary}, word below non-zero is {nonZero}.");
                }
            }
        }
    }

    // ---- Range helpers. "first" and "last" are inclusive bit indices inside [0, Length). ----

    /// <summary>Sets leaf bits [first, last] and propagates; first and last may share a word.</summary>
    private void SetSpan(long first, long last)
    {
        ulong[] leaf = _levels[0];
        long firstWord = first >> WordShift;
        long lastWord = last >> WordShift;
        long added = SetBits(leaf, first, last, out bool wokeZeroWord);
        _count += added;
        if (wokeZeroWord)
        {
            SetSummaries(firstWord, lastWord);
        }
    }

    /// <summary>Clears leaf bits [first, last] and propagates; first and last may share a word.</summary>
    private void ResetSpan(long first, long last)
    {
        ulong[] leaf = _levels[0];
        long removed = ResetBits(leaf, first, last);
        _count -= removed;
        if (removed != 0)
        {
            ResetSummaries(leaf, first >> WordShift, last >> WordShift);
        }
    }

    /// <summary>Sets bits [first, last] of one level. Returns the number of bits that changed; reports whether
    /// any word went from zero to non-zero (only then does the level above change).</summary>
    private static long SetBits(ulong[] words, long first, long last, out bool wokeZeroWord)
    {
        long firstWord = first >> WordShift;
        long lastWord = last >> WordShift;
        ulong head = ulong.MaxValue << (int)first;
        ulong tail = ulong.MaxValue >> (WordMask - (int)(last & WordMask));
        if (firstWord == lastWord)
        {
            ulong mask = head & tail;
            ulong old = words[firstWord];
            words[firstWord] = old | mask;
            wokeZeroWord = old == 0;
            return BitOperations.PopCount(mask & ~old);
        }

        long added = 0;
        bool woke = false;
        ulong value = words[firstWord];
        added += BitOperations.PopCount(head & ~value);
        woke |= value == 0;
        words[firstWord] = value | head;

        for (long i = firstWord + 1; i < lastWord; i++)
        {
            value = words[i];
            added += BitsPerWord - BitOperations.PopCount(value);
            woke |= value == 0;
            words[i] = ulong.MaxValue;
        }

        value = words[lastWord];
        added += BitOperations.PopCount(tail & ~value);
        woke |= value == 0;
        words[lastWord] = value | tail;

        wokeZeroWord = woke;
        return added;
    }

    /// <summary>Clears bits [first, last] of one level; returns the number of bits that changed.</summary>
    private static long ResetBits(ulong[] words, long first, long last)
    {
        long firstWord = first >> WordShift;
        long lastWord = last >> WordShift;
        ulong head = ulong.MaxValue << (int)first;
        ulong tail = ulong.MaxValue >> (WordMask - (int)(last & WordMask));
        if (firstWord == lastWord)
        {
            ulong mask = head & tail;
            ulong old = words[firstWord];
            words[firstWord] = old & ~mask;
            return BitOperations.PopCount(old & mask);
        }

        long removed = BitOperations.PopCount(words[firstWord] & head);
        words[firstWord] &= ~head;
        for (long i = firstWord + 1; i < lastWord; i++)
        {
            removed += BitOperations.PopCount(words[i]);
            words[i] = 0;
        }

        removed += BitOperations.PopCount(words[lastWord] & tail);
        words[lastWord] &= ~tail;
        return removed;
    }

    /// <summary>Leaf word <paramref name="word"/> just went from zero to non-zero: set its summary bits.</summary>
    private void PropagateSet(long word)
    {
        ulong[][] levels = _levels;
        long bit = word;
        for (int level = 1; level < levels.Length; level++)
        {
            ulong[] words = levels[level];
            long index = bit >> WordShift;
            ulong old = words[index];
            words[index] = old | (1UL << (int)bit);
            if (old != 0)
            {
                return; // that word was already non-zero, so the levels above already say so
            }

            bit = index;
        }
    }

    /// <summary>Leaf word <paramref name="word"/> just became zero: clear summary bits while words empty out.</summary>
    private void PropagateReset(long word)
    {
        ulong[][] levels = _levels;
        long bit = word;
        for (int level = 1; level < levels.Length; level++)
        {
            ulong[] words = levels[level];
            long index = bit >> WordShift;
            ulong now = words[index] & ~(1UL << (int)bit);
            words[index] = now;
            if (now != 0)
            {
                return;
            }

            bit = index;
        }
    }

    /// <summary>Leaf words [firstWord, lastWord] are all non-zero now: set their summary bits, level by level,
    /// stopping at the first level where no word went from zero to non-zero.</summary>
    private void SetSummaries(long firstWord, long lastWord)
    {
        ulong[][] levels = _levels;
        for (int level = 1; level < levels.Length; level++)
        {
            SetBits(levels[level], firstWord, lastWord, out bool woke);
            if (!woke)
            {
                return;
            }

            firstWord >>= WordShift;
            lastWord >>= WordShift;
        }
    }

    /// <summary>Leaf words [firstWord, lastWord] were cleared inside a range. Every word strictly inside is zero,
    /// but the two edge words may still hold bits outside the range; only words that are now zero may lose their
    /// summary bit, so the edges are re-checked at each level before going up.</summary>
    private void ResetSummaries(ulong[] leaf, long firstWord, long lastWord)
    {
        ulong[][] levels = _levels;
        ulong[] lower = leaf;
        for (int level = 1; level < levels.Length; level++)
        {
            if (lower[firstWord] != 0)
            {
                firstWord++;
            }

            if (lower[lastWord] != 0)
            {
                lastWord--;
            }

            if (firstWord > lastWord)
            {
                return;
            }

            ulong[] words = levels[level];
            if (ResetBits(words, firstWord, lastWord) == 0)
            {
                return; // summary already clear: nothing above changes either
            }

            lower = words;
            firstWord >>= WordShift;
            lastWord >>= WordShift;
        }
    }

    /// <summary>Recomputes the summary bits of leaf words [firstWord, lastWord] after they were overwritten
    /// with arbitrary content (bits may have been set and cleared).</summary>
    private void RefreshSummaries(long firstWord, long lastWord)
    {
        ulong[][] levels = _levels;
        for (int level = 1; level < levels.Length; level++)
        {
            ulong[] lower = levels[level - 1];
            ulong[] words = levels[level];
            bool changed = false;
            for (long i = firstWord; i <= lastWord; i++)
            {
                ulong bit = 1UL << (int)i;
                ulong old = words[i >> WordShift];
                ulong now = lower[i] != 0 ? old | bit : old & ~bit;
                if (now != old)
                {
                    words[i >> WordShift] = now;
                    changed = true;
                }
            }

            if (!changed)
            {
                return;
            }

            firstWord >>= WordShift;
            lastWord >>= WordShift;
        }
    }

    // ---- Search. "limit" is already clipped to Length. ----

    private long NextSetCore(long from, long limit)
    {
        if (from >= limit)
        {
            return -1;
        }

        ulong[] leaf = _levels[0];
        long word = from >> WordShift;
        ulong bits = leaf[word] & (ulong.MaxValue << (int)from);
        if (bits == 0)
        {
            word = NextNonZeroWord(word + 1);
            if (word < 0)
            {
                return -1;
            }

            bits = leaf[word];
        }

        long found = (word << WordShift) + BitOperations.TrailingZeroCount(bits);
        return found < limit ? found : -1;
    }

    /// <summary>Index of the first non-zero leaf word at or after <paramref name="word"/>, or -1.</summary>
    private long NextNonZeroWord(long word)
    {
        ulong[][] levels = _levels;

        // Climb: at level L, "position" is a bit index of level L (= a word index of level L-1). Look in the
        // word holding it, from that bit on; if nothing is there, move to the next word, i.e. bit index
        // "word + 1" of the level above.
        long position = word;
        int level = 1;
        while (true)
        {
            if (level >= levels.Length)
            {
                return -1;
            }

            ulong[] words = levels[level];
            long index = position >> WordShift;
            if (index >= words.Length)
            {
                return -1;
            }

            ulong bits = words[index] & (ulong.MaxValue << (int)position);
            if (bits != 0)
            {
                position = (index << WordShift) + BitOperations.TrailingZeroCount(bits);
                break;
            }

            position = index + 1;
            level++;
        }

        // Descend: bit "position" of level L is set, so word "position" of level L-1 is non-zero; its lowest
        // set bit is the first candidate one level down.
        while (--level > 0)
        {
            position = (position << WordShift) + BitOperations.TrailingZeroCount(levels[level][position]);
        }

        return position;
    }

    private long NextClearCore(long from, long limit)
    {
        if (from >= limit)
        {
            return -1;
        }

        ulong[] leaf = _levels[0];
        long word = from >> WordShift;
        ulong holes = ~leaf[word] & (ulong.MaxValue << (int)from);
        if (holes == 0)
        {
            long lastWord = (limit - 1) >> WordShift;
            if (word == lastWord)
            {
                return -1;
            }

            int offset = leaf.AsSpan((int)word + 1, (int)(lastWord - word)).IndexOfAnyExcept(ulong.MaxValue);
            if (offset < 0)
            {
                return -1;
            }

            word += 1 + offset;
            holes = ~leaf[word];
        }

        long found = (word << WordShift) + BitOperations.TrailingZeroCount(holes);
        return found < limit ? found : -1;
    }

    // ---- Shape. ----

    /// <summary>Words per level: the leaf holds ceil(length/64) words (at least one), each level above
    /// ceil(below/64), up to a level of one word.</summary>
    private static long[] LevelSizes(long length)
    {
        long words = Math.Max(1, (length + WordMask) >> WordShift);
        int count = 1;
        for (long w = words; w > 1; w = (w + WordMask) >> WordShift)
        {
            count++;
        }

        var sizes = new long[count];
        for (int level = 0; level < count; level++)
        {
            sizes[level] = words;
            words = (words + WordMask) >> WordShift;
        }

        return sizes;
    }

    private static ulong[][] AllocateLevels(long length)
    {
        long[] sizes = LevelSizes(length);
        var levels = new ulong[sizes.Length][];
        for (int level = 0; level < sizes.Length; level++)
        {
            levels[level] = new ulong[sizes[level]];
        }

        return levels;
    }

    /// <summary>Recomputes all of level <paramref name="level"/> from the level below.</summary>
    private static void RebuildLevel(ulong[][] levels, int level)
    {
        ulong[] lower = levels[level - 1];
        ulong[] upper = levels[level];
        for (int k = 0; k < upper.Length; k++)
        {
            int start = k << WordShift;
            int end = Math.Min(start + BitsPerWord, lower.Length);
            ulong summary = 0;
            for (int i = start; i < end; i++)
            {
                if (lower[i] != 0)
                {
                    summary |= 1UL << (i - start);
                }
            }

            upper[k] = summary;
        }
    }

    /// <summary>Mask of the valid bits in the last leaf word of a non-empty bitmap of <paramref name="length"/> bits.</summary>
    private static ulong TailMask(long length) => ulong.MaxValue >> (int)((BitsPerWord - (length & WordMask)) & WordMask);

    private Span<byte> LeafBytes(int firstByte, int byteCount) =>
        MemoryMarshal.AsBytes(_levels[0].AsSpan()).Slice(firstByte, byteCount);

    private static long PopCount(ReadOnlySpan<ulong> words)
    {
        long count = 0;
        foreach (ulong word in words)
        {
            count += BitOperations.PopCount(word);
        }

        return count;
    }

    private static void OrInto(ulong[] target, ulong[] source)
    {
        Debug.Assert(target.Length == source.Length, "Merged levels must have the same shape.");
        for (int i = 0; i < target.Length; i++)
        {
            target[i] |= source[i];
        }
    }

    // ---- Argument checks: one unsigned compare per bound, throws kept out of line. ----

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void CheckRange(long start, long count, string startName, string countName)
    {
        // (ulong)start > (ulong)Length catches negative starts too; Length - start cannot then overflow.
        if ((ulong)start > (ulong)_length)
        {
            ThrowIndexOutOfRange(startName, start, _length + 1);
        }

        if ((ulong)count > (ulong)(_length - start))
        {
            ThrowCountOutOfRange(countName, count, _length - start);
        }
    }

    private static void CheckQuery(long from, long end)
    {
        if (from < 0)
        {
            ThrowNegative(nameof(from), from);
        }

        if (end < from)
        {
            ThrowEndBeforeFrom(end, from);
        }
    }

    private void CheckSerialization(long startBit, long bitCount, int bufferLength, string bufferName)
    {
        CheckRange(startBit, bitCount, nameof(startBit), nameof(bitCount));
        if ((startBit & 7) != 0)
        {
            ThrowUnaligned(startBit);
        }

        if (bufferLength < SerializedSize(bitCount))
        {
            ThrowBufferTooSmall(bufferName, bufferLength, SerializedSize(bitCount));
        }
    }

    private void CheckSameLength(HierarchicalBitmap source)
    {
        ArgumentNullException.ThrowIfNull(source);
        if (source._length != _length)
        {
            ThrowLengthMismatch(source._length, _length);
        }
    }

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowLengthOutOfRange(string paramName, long value) =>
        throw new ArgumentOutOfRangeException(paramName, value, $"Length must be between 0 and {MaxLength} bits.");

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowIndexOutOfRange(string paramName, long value, long bound) =>
        throw new ArgumentOutOfRangeException(paramName, value, $"Must be non-negative and less than {bound}.");

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowCountOutOfRange(string paramName, long value, long available) =>
        throw new ArgumentOutOfRangeException(paramName, value, $"Must be non-negative and at most {available} (bits left after start).");

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowNegative(string paramName, long value) =>
        throw new ArgumentOutOfRangeException(paramName, value, "Must be non-negative.");

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowEndBeforeFrom(long end, long from) =>
        throw new ArgumentOutOfRangeException(nameof(end), end, $"Must not be less than from ({from}).");

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowUnaligned(long startBit) =>
        throw new ArgumentException($"Must be a multiple of 8 (got {startBit}).", nameof(startBit));

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowBufferTooSmall(string paramName, int length, long needed) =>
        throw new ArgumentException($"Buffer holds {length} bytes; {needed} are needed.", paramName);

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowLengthMismatch(long sourceLength, long length) =>
        throw new ArgumentException($"Source has {sourceLength} bits; this bitmap has {length}.", "source");
}
