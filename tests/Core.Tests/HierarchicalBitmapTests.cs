using BitmapBackup.Core.Bitmaps;
using Xunit;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// Checks <see cref="HierarchicalBitmap"/> against a flat shadow bitmap (a bool[]) after every mutation, with
/// lengths on the level boundaries (L1 = 64 bits per leaf word, L2 = 64 leaf words per level-1 word, ...).
/// All randomness uses fixed seeds.
/// </summary>
public static class HierarchicalBitmapTests
{
    private const long L1 = 64;
    private const long L2 = L1 * 64;
    private const long L3 = L2 * 64;

    private static readonly long[] BoundaryLengths = [0, 1, 63, 64, 65, L2 - 1, L2, L2 + 1, L3 + 1];

    private static readonly long[] OddLengths = [7, 100, 1000, 12345, (3 * L2) + 7, L3 - 23];

    public static TheoryData<long> Lengths => new(BoundaryLengths.Concat(OddLengths));

    // ---- Shadow model. ----

    private static bool[] ShadowOf(HierarchicalBitmap map)
    {
        var bits = new bool[map.Length];
        for (long i = 0; i < map.Length; i++)
        {
            bits[i] = map.Get(i);
        }

        return bits;
    }

    private static List<(long Start, long Count)> ShadowRuns(bool[] shadow, long from, long end)
    {
        var runs = new List<(long, long)>();
        end = Math.Min(end, shadow.Length);
        long i = from;
        while (i < end)
        {
            if (!shadow[i])
            {
                i++;
                continue;
            }

            long start = i;
            while (i < end && shadow[i])
            {
                i++;
            }

            runs.Add((start, i - start));
        }

        return runs;
    }

    private static long ShadowNext(bool[] shadow, bool value, long from, long end)
    {
        end = Math.Min(end, shadow.Length);
        for (long i = from; i < end; i++)
        {
            if (shadow[i] == value)
            {
                return i;
            }
        }

        return -1;
    }

    /// <summary>Compares every observable of the bitmap with the shadow and checks the internal invariants.</summary>
    private static void AssertMatches(bool[] shadow, HierarchicalBitmap map, Random random, string step)
    {
        map.CheckInvariants();
        Assert.Equal(shadow.LongLength, map.Length);
        Assert.Equal(shadow.LongCount(b => b), map.Count);

        for (long i = 0; i < shadow.Length; i++)
        {
            if (map.Get(i) != shadow[i])
            {
                Assert.Fail($"{step}: bit {i} is {map.Get(i)}, expected {shadow[i]}.");
            }
        }

        Assert.Equal(ShadowRuns(shadow, 0, long.MaxValue), map.Runs().ToList());

        long length = shadow.Length;
        var probes = new List<long> { 0, Math.Max(0, length - 1), length, length + 5 };
        for (int i = 0; i < 12; i++)
        {
            probes.Add(random.NextInt64(length + 1));
        }

        foreach (long from in probes)
        {
            long end = random.Next(3) switch
            {
                0 => long.MaxValue,
                1 => Math.Max(from, length),
                _ => from + random.NextInt64(200),
            };

            Assert.Equal(ShadowNext(shadow, true, from, end), map.NextSet(from, end));
            Assert.Equal(ShadowNext(shadow, false, from, end), map.NextClear(from, end));
            Assert.Equal(ShadowRuns(shadow, from, end), map.Runs(from, end).ToList());

            List<(long Start, long Count)> expected = ShadowRuns(shadow, from, end);
            bool found = map.NextRun(from, end, out long runStart, out long runCount);
            Assert.Equal(expected.Count > 0, found);
            if (found)
            {
                Assert.Equal(expected[0], (runStart, runCount));
            }
        }
    }

    private static (long Start, long Count) RandomRange(Random random, long length)
    {
        long start = random.NextInt64(length + 1);
        long room = length - start;
        long count = random.Next(4) switch
        {
            0 => Math.Min(room, 1),
            1 => random.NextInt64(Math.Min(room, 3) + 1),
            2 => random.NextInt64(Math.Min(room, 200) + 1),
            _ => random.NextInt64(room + 1),
        };
        return (start, count);
    }

    private static HierarchicalBitmap RandomBitmap(Random random, long length, out bool[] shadow)
    {
        var map = new HierarchicalBitmap(length);
        shadow = new bool[length];
        int ranges = random.Next(1, 12);
        for (int i = 0; i < ranges; i++)
        {
            (long start, long count) = RandomRange(random, length);
            if (random.Next(4) == 0)
            {
                count = Math.Min(count, 150); // keep most of them sparse
            }

            map.Set(start, count);
            Array.Fill(shadow, true, (int)start, (int)count);
        }

        return map;
    }

    // ---- Randomised sequences against the shadow. ----

    [Theory]
    [MemberData(nameof(Lengths))]
    public static void RandomOperations_MatchFlatShadow(long length)
    {
        var random = new Random(unchecked((int)(0x5EED + (length * 31))));
        var map = new HierarchicalBitmap(length);
        var shadow = new bool[length];
        AssertMatches(shadow, map, random, "new");

        int steps = length > L2 * 8 ? 40 : 150;
        for (int step = 0; step < steps; step++)
        {
            long current = shadow.Length;
            int operation = random.Next(20);
            string name;
            switch (operation)
            {
                case < 7:
                {
                    (long start, long count) = RandomRange(random, current);
                    map.Set(start, count);
                    Array.Fill(shadow, true, (int)start, (int)count);
                    name = $"Set({start}, {count})";
                    break;
                }

                case < 13:
                {
                    (long start, long count) = RandomRange(random, current);
                    map.Reset(start, count);
                    Array.Fill(shadow, false, (int)start, (int)count);
                    name = $"Reset({start}, {count})";
                    break;
                }

                case < 15:
                {
                    HierarchicalBitmap other = RandomBitmap(random, current, out bool[] otherShadow);
                    map.Merge(other);
                    for (int i = 0; i < shadow.Length; i++)
                    {
                        shadow[i] |= otherShadow[i];
                    }

                    Assert.Equal(otherShadow, ShadowOf(other)); // the source is untouched
                    name = "Merge";
                    break;
                }

                case < 17:
                {
                    long newLength = random.Next(5) switch
                    {
                        0 => length,
                        1 => Math.Max(0, current + random.Next(-65, 66)),
                        2 => BoundaryLengths[random.Next(BoundaryLengths.Length - 1)], // all but L3 + 1: keeps the run short
                        3 => random.NextInt64(current + 1),
                        _ => random.NextInt64(Math.Max(1, 2 * length) + 1),
                    };
                    map.Resize(newLength);
                    Array.Resize(ref shadow, (int)newLength);
                    name = $"Resize({current} -> {newLength})";
                    break;
                }

                case 17:
                {
                    (long start, long count) = RandomRange(random, current);
                    start &= ~7L;
                    count = Math.Min(count, current - start);
                    var bytes = new byte[HierarchicalBitmap.SerializedSize(count)];
                    random.NextBytes(bytes); // includes garbage in the unused high bits of the last byte
                    map.Deserialize(bytes, start, count);
                    for (long i = 0; i < count; i++)
                    {
                        shadow[start + i] = (bytes[i / 8] & (1 << (int)(i % 8))) != 0;
                    }

                    name = $"Deserialize({start}, {count})";
                    break;
                }

                case 18:
                {
                    HierarchicalBitmap copy = map.Clone();
                    map.Set(0, Math.Min(1, current)); // the clone must not see later changes
                    copy.CheckInvariants();
                    map = random.Next(2) == 0 ? copy : map;
                    if (ReferenceEquals(map, copy))
                    {
                        name = "Clone";
                    }
                    else
                    {
                        map.CopyFrom(copy);
                        name = "Clone+CopyFrom";
                    }

                    break;
                }

                default:
                {
                    bool all = random.Next(2) == 0;
                    if (all)
                    {
                        map.SetAll();
                    }
                    else
                    {
                        map.ResetAll();
                    }

                    Array.Fill(shadow, all);
                    name = all ? "SetAll" : "ResetAll";
                    break;
                }
            }

            AssertMatches(shadow, map, random, $"step {step}: {name}");
        }
    }

    [Theory]
    [MemberData(nameof(Lengths))]
    public static void SingleBits_EveryPosition_MatchShadow(long length)
    {
        // Walk one set bit through positions that straddle every word and summary boundary.
        var map = new HierarchicalBitmap(length);
        foreach (long bit in BoundaryPositions(length))
        {
            map.Set(bit, 1);
            map.CheckInvariants();
            Assert.Equal(1, map.Count);
            Assert.Equal(bit, map.NextSet(0));
            Assert.Equal(-1, map.NextSet(bit + 1));
            Assert.Equal([(bit, 1L)], map.Runs().ToList());
            map.Reset(bit, 1);
            map.CheckInvariants();
            Assert.Equal(0, map.Count);
            Assert.Equal(-1, map.NextSet(0));
        }
    }

    private static IEnumerable<long> BoundaryPositions(long length)
    {
        var positions = new SortedSet<long>();
        foreach (long unit in new[] { 1, L1, L2, L3 })
        {
            for (long k = 0; k * unit <= length + unit && k < 5; k++)
            {
                positions.Add((k * unit) - 1);
                positions.Add(k * unit);
                positions.Add((k * unit) + 1);
            }
        }

        positions.Add(length - 1);
        return positions.Where(p => p >= 0 && p < length);
    }

    [Theory]
    [InlineData(0L, 1)]
    [InlineData(1L, 1)]
    [InlineData(64L, 1)]
    [InlineData(65L, 2)]
    [InlineData(L2, 2)]
    [InlineData(L2 + 1, 3)]
    [InlineData(L3, 3)]
    [InlineData(L3 + 1, 4)]
    [InlineData(16_777_216L, 4)]
    public static void LevelCount_OnBoundaries_IsMinimal(long length, int levels)
    {
        Assert.Equal(levels, new HierarchicalBitmap(length).LevelCount);
    }

    [Fact]
    public static void MemoryBytes_OneTebibyteAt64KiB_WithinTwoPercentOfFlat()
    {
        const long bits = 16_777_216; // 1 TiB / 64 KiB
        var map = new HierarchicalBitmap(bits);
        double ratio = (double)map.MemoryBytes / (bits / 8);
        Assert.InRange(ratio, 1.0, 1.02);
    }

    [Fact]
    public static void SetAll_ThenNextClear_FindsNothingAndOneRun()
    {
        var map = new HierarchicalBitmap(L2 + 5);
        map.SetAll();
        map.CheckInvariants();
        Assert.Equal(L2 + 5, map.Count);
        Assert.Equal(-1, map.NextClear(0));
        Assert.Equal([(0L, L2 + 5)], map.Runs().ToList());
        Assert.Equal([(10L, 90L)], map.Runs(10, 100).ToList());

        map.Reset(L2 + 2, 1);
        Assert.Equal(L2 + 2, map.NextClear(0));
        Assert.Equal([(0L, L2 + 2), (L2 + 3, 2L)], map.Runs().ToList());
    }

    [Fact]
    public static void NextRun_FromInsideRun_StartsAtFrom()
    {
        var map = new HierarchicalBitmap(300);
        map.Set(100, 50);
        Assert.True(map.NextRun(120, 300, out long start, out long count));
        Assert.Equal((120L, 30L), (start, count));
        Assert.True(map.NextRun(0, 130, out start, out count));
        Assert.Equal((100L, 30L), (start, count)); // clipped to end
        Assert.False(map.NextRun(150, 300, out start, out count));
        Assert.Equal((0L, 0L), (start, count));
    }

    [Fact]
    public static void Runs_ModifiedBetweenSteps_ContinuesAfterLastRun()
    {
        var map = new HierarchicalBitmap(1000);
        map.Set(10, 5);
        map.Set(500, 5);
        var seen = new List<(long, long)>();
        foreach ((long start, long count) in map.Runs())
        {
            seen.Add((start, count));
            map.Reset(start, count); // the usual "copy then clear" loop
            if (start == 10)
            {
                map.Set(700, 1);
                map.Set(0, 1); // behind the cursor: not revisited
            }
        }

        Assert.Equal([(10L, 5L), (500L, 5L), (700L, 1L)], seen);
        Assert.Equal(1, map.Count);
    }

    // ---- Resize. ----

    [Fact]
    public static void Resize_ShrinkThenGrow_DropsBitsAndNewBitsAreClear()
    {
        var map = new HierarchicalBitmap(L3 + 1);
        map.Set(0, 3);
        map.Set(L2 - 1, 2);
        map.Set(L3, 1);
        Assert.Equal(6, map.Count);

        map.Resize(L2);
        map.CheckInvariants();
        Assert.Equal(4, map.Count);
        Assert.Equal([(0L, 3L), (L2 - 1, 1L)], map.Runs().ToList());

        map.Resize(L3 + 1);
        map.CheckInvariants();
        Assert.Equal(4, map.Count);
        Assert.False(map.Get(L2));
        Assert.False(map.Get(L3));

        map.Resize(0);
        map.CheckInvariants();
        Assert.Equal(0, map.Count);
        Assert.Equal(-1, map.NextSet(0));
        map.Resize(65);
        Assert.Equal(-1, map.NextSet(0));
    }

    // ---- Serialization. ----

    [Fact]
    public static void Serialize_KnownBits_UsesQemuBitOrder()
    {
        var map = new HierarchicalBitmap(20);
        map.Set(0, 1);
        map.Set(3, 1);
        map.Set(9, 1);
        map.Set(19, 1);

        var bytes = new byte[3];
        map.Serialize(bytes, 0, 20);
        Assert.Equal(new byte[] { 0x09, 0x02, 0x08 }, bytes);

        var tail = new byte[2];
        map.Serialize(tail, 8, 12);
        Assert.Equal(new byte[] { 0x02, 0x08 }, tail);
    }

    [Fact]
    public static void Serialize_PartialLastByte_WritesUnusedHighBitsAsZero()
    {
        var map = new HierarchicalBitmap(24);
        map.Set(16, 8); // byte 2 is 0xFF in the bitmap
        var bytes = new byte[] { 0xAA, 0xAA, 0xAA, 0xAA };
        map.Serialize(bytes, 0, 20); // bits 16..19 are in range, 20..23 are not
        Assert.Equal(new byte[] { 0x00, 0x00, 0x0F, 0xAA }, bytes); // byte 3 is past SerializedSize: untouched
    }

    [Fact]
    public static void Deserialize_PartialLastByte_IgnoresHighBitsAndKeepsBitsOutsideRange()
    {
        var map = new HierarchicalBitmap(40);
        map.SetAll();
        map.Deserialize(new byte[] { 0x00, 0xF0 }, 8, 12); // bits 8..19 from the bytes: 8..15 clear, 16..19 clear
        map.CheckInvariants();
        Assert.Equal([(0L, 8L), (20L, 20L)], map.Runs().ToList());
        Assert.Equal(28, map.Count);

        var empty = new HierarchicalBitmap(20);
        empty.Deserialize(new byte[] { 0xFF, 0xFF, 0xFF }, 0, 20);
        empty.CheckInvariants();
        Assert.Equal(20, empty.Count);
        Assert.Equal(-1, empty.NextClear(0));
    }

    [Fact]
    public static void Deserialize_KnownBytes_SetsQemuBitOrder()
    {
        var map = new HierarchicalBitmap(24);
        map.Deserialize(new byte[] { 0x81, 0x00, 0x02 }, 0, 24);
        Assert.Equal([(0L, 1L), (7L, 1L), (17L, 1L)], map.Runs().ToList());
    }

    [Theory]
    [MemberData(nameof(Lengths))]
    public static void Serialize_RandomRanges_RoundTripAndMatchShadow(long length)
    {
        var random = new Random(unchecked((int)(0xB17 + length)));
        HierarchicalBitmap map = RandomBitmap(random, length, out bool[] shadow);

        var whole = new byte[HierarchicalBitmap.SerializedSize(length)];
        map.Serialize(whole, 0, length);
        var copy = new HierarchicalBitmap(length);
        copy.SetAll(); // Deserialize must clear as well as set
        copy.Deserialize(whole, 0, length);
        copy.CheckInvariants();
        Assert.Equal(shadow, ShadowOf(copy));

        for (int i = 0; i < 20; i++)
        {
            (long start, long count) = RandomRange(random, length);
            start &= ~7L;
            count = Math.Min(count, length - start);
            var bytes = new byte[HierarchicalBitmap.SerializedSize(count) + 1];
            random.NextBytes(bytes);
            byte sentinel = bytes[^1];
            map.Serialize(bytes, start, count);
            Assert.Equal(sentinel, bytes[^1]);
            for (long bit = 0; bit < (bytes.Length - 1) * 8L; bit++)
            {
                bool expected = bit < count && shadow[start + bit];
                Assert.Equal(expected, (bytes[bit / 8] & (1 << (int)(bit % 8))) != 0);
            }
        }
    }

    // ---- Merge across granularities. ----

    private static HierarchicalBitmap WithBits(long length, params long[] bits)
    {
        var map = new HierarchicalBitmap(length);
        foreach (long bit in bits)
        {
            map.Set(bit, 1);
        }

        return map;
    }

    private static long[] SetBits(HierarchicalBitmap map) =>
        map.Runs().SelectMany(r => Enumerable.Range(0, (int)r.Count).Select(i => r.Start + i)).ToArray();

    [Fact]
    public static void MergeGranularity_FinerSourceIntoCoarserTarget_RoundsOutwards()
    {
        // 512-byte source bits, 4096-byte target bits: source bits 8k..8k+7 make target bit k.
        HierarchicalBitmap source = WithBits(64, 0, 9, 17, 18, 31, 32, 63);
        source.Set(40, 8);
        var target = new HierarchicalBitmap(8);
        target.Merge(source, 512, 4096);
        target.CheckInvariants();
        Assert.Equal(new long[] { 0, 1, 2, 3, 4, 5, 7 }, SetBits(target));
    }

    [Fact]
    public static void MergeGranularity_CoarserSourceIntoFinerTarget_CoversAndClips()
    {
        // 64 KiB source bits, 4 KiB target bits: source bit k makes target bits 16k..16k+15, clipped to 50.
        HierarchicalBitmap source = WithBits(4, 1, 3);
        HierarchicalBitmap target = WithBits(50, 2); // existing bits survive (OR)
        target.Merge(source, 65536, 4096);
        target.CheckInvariants();
        long[] expected = new long[] { 2 }.Concat(Enumerable.Range(16, 16).Select(i => (long)i)).Concat([48L, 49L]).ToArray();
        Assert.Equal(expected, SetBits(target));
        Assert.Equal(19, target.Count);
    }

    [Fact]
    public static void MergeGranularity_NonDividingGranularities_SetsEveryOverlappedBit()
    {
        // Source 3000 B: bit 1 = [3000, 6000) -> target 0,1; bit 5 = [15000, 18000) -> 3,4;
        // bit 9 = [27000, 30000) -> 6,7 (4096 B target bits).
        HierarchicalBitmap source = WithBits(10, 1, 5, 9);
        var target = new HierarchicalBitmap(8);
        target.Merge(source, 3000, 4096);
        Assert.Equal(new long[] { 0, 1, 3, 4, 6, 7 }, SetBits(target));
    }

    [Fact]
    public static void MergeGranularity_SourceLongerThanTarget_ClipsToLength()
    {
        HierarchicalBitmap source = WithBits(100, 3, 99);
        var target = new HierarchicalBitmap(3);
        target.Merge(source, 1, 2); // bit 3 -> target 1; bit 99 -> 49, past the end
        Assert.Equal(new long[] { 1 }, SetBits(target));
    }

    [Fact]
    public static void MergeGranularity_IntoItself_UsesSnapshot()
    {
        HierarchicalBitmap map = WithBits(16, 3);
        map.Merge(map, 2, 1); // bit 3 covers bytes [6, 8): bits 6, 7; must not cascade to 12..15
        Assert.Equal(new long[] { 3, 6, 7 }, SetBits(map));
    }

    [Theory]
    [InlineData(512L, 4096L, 1)]
    [InlineData(4096L, 512L, 2)]
    [InlineData(3000L, 4096L, 3)]
    [InlineData(65536L, 65536L, 4)]
    [InlineData(7L, 3L, 5)]
    public static void MergeGranularity_Random_MatchesPerBitDefinition(long sourceGranularity, long targetGranularity, int seed)
    {
        var random = new Random(seed);
        for (int round = 0; round < 20; round++)
        {
            long sourceLength = random.NextInt64(1, 3 * L2);
            long targetLength = random.NextInt64(1, 3 * L2);
            HierarchicalBitmap source = RandomBitmap(random, sourceLength, out bool[] sourceShadow);
            HierarchicalBitmap target = RandomBitmap(random, targetLength, out bool[] expected);

            for (long i = 0; i < sourceLength; i++)
            {
                if (!sourceShadow[i])
                {
                    continue;
                }

                long firstByte = i * sourceGranularity;
                long lastByte = ((i + 1) * sourceGranularity) - 1;
                for (long j = firstByte / targetGranularity; j <= lastByte / targetGranularity && j < targetLength; j++)
                {
                    expected[j] = true;
                }
            }

            target.Merge(source, sourceGranularity, targetGranularity);
            target.CheckInvariants();
            Assert.Equal(expected, ShadowOf(target));
        }
    }

    // ---- Argument errors. ----

    [Fact]
    public static void Constructor_NegativeLength_ThrowsArgumentOutOfRange()
    {
        Assert.Throws<ArgumentOutOfRangeException>("length", () => new HierarchicalBitmap(-1));
        Assert.Throws<ArgumentOutOfRangeException>("length", () => new HierarchicalBitmap(HierarchicalBitmap.MaxLength + 1));
    }

    [Theory]
    [InlineData(-1L)]
    [InlineData(100L)]
    [InlineData(long.MinValue)]
    public static void Get_InvalidIndex_ThrowsArgumentOutOfRange(long bit)
    {
        var map = new HierarchicalBitmap(100);
        Assert.Throws<ArgumentOutOfRangeException>("bit", () => map.Get(bit));
    }

    [Theory]
    [InlineData(-1L, 1L, "start")]
    [InlineData(101L, 0L, "start")]
    [InlineData(0L, -1L, "count")]
    [InlineData(0L, 101L, "count")]
    [InlineData(100L, 1L, "count")]
    [InlineData(1L, long.MaxValue, "count")]
    [InlineData(long.MaxValue, long.MaxValue, "start")]
    public static void SetReset_InvalidRange_ThrowsArgumentOutOfRange(long start, long count, string paramName)
    {
        var map = new HierarchicalBitmap(100);
        Assert.Throws<ArgumentOutOfRangeException>(paramName, () => map.Set(start, count));
        Assert.Throws<ArgumentOutOfRangeException>(paramName, () => map.Reset(start, count));
        Assert.Equal(0, map.Count);
    }

    [Fact]
    public static void SetReset_EmptyRangeAtEnd_IsAllowed()
    {
        var map = new HierarchicalBitmap(100);
        map.Set(100, 0);
        map.Reset(100, 0);
        map.Set(0, 100);
        Assert.Equal(100, map.Count);
    }

    [Fact]
    public static void Queries_InvalidArguments_ThrowArgumentOutOfRange()
    {
        var map = new HierarchicalBitmap(100);
        Assert.Throws<ArgumentOutOfRangeException>("from", () => map.NextSet(-1));
        Assert.Throws<ArgumentOutOfRangeException>("from", () => map.NextClear(-1));
        Assert.Throws<ArgumentOutOfRangeException>("end", () => map.NextSet(10, 5));
        Assert.Throws<ArgumentOutOfRangeException>("from", () => map.NextRun(-1, 10, out _, out _));
        Assert.Throws<ArgumentOutOfRangeException>("from", () => map.Runs(-1)); // eager, before enumeration
        Assert.Throws<ArgumentOutOfRangeException>("end", () => map.Runs(10, 9));
        Assert.Equal(-1, map.NextClear(100));
        Assert.Equal(-1, map.NextClear(500));
    }

    [Fact]
    public static void Resize_InvalidLength_ThrowsArgumentOutOfRange()
    {
        var map = new HierarchicalBitmap(100);
        Assert.Throws<ArgumentOutOfRangeException>("newLength", () => map.Resize(-1));
        Assert.Throws<ArgumentOutOfRangeException>("newLength", () => map.Resize(HierarchicalBitmap.MaxLength + 1));
    }

    [Fact]
    public static void Merge_InvalidSource_Throws()
    {
        var map = new HierarchicalBitmap(100);
        Assert.Throws<ArgumentNullException>("source", () => map.Merge(null!));
        Assert.Throws<ArgumentException>("source", () => map.Merge(new HierarchicalBitmap(101)));
        Assert.Throws<ArgumentException>("source", () => map.CopyFrom(new HierarchicalBitmap(99)));
        Assert.Throws<ArgumentOutOfRangeException>("sourceGranularity", () => map.Merge(map, 0, 1));
        Assert.Throws<ArgumentOutOfRangeException>("targetGranularity", () => map.Merge(map, 1, -1));
    }

    [Fact]
    public static void Serialize_InvalidArguments_Throw()
    {
        var map = new HierarchicalBitmap(100);
        var bytes = new byte[13];
        Assert.Throws<ArgumentException>("startBit", () => map.Serialize(bytes, 4, 8));
        Assert.Throws<ArgumentException>("startBit", () => map.Deserialize(bytes, 12, 8));
        Assert.Throws<ArgumentOutOfRangeException>("startBit", () => map.Serialize(bytes, -8, 8));
        Assert.Throws<ArgumentOutOfRangeException>("bitCount", () => map.Serialize(bytes, 96, 8));
        Assert.Throws<ArgumentOutOfRangeException>("bitCount", () => map.Deserialize(bytes, 0, 101));
        Assert.Throws<ArgumentException>("destination", () => map.Serialize(new byte[12], 0, 100));
        Assert.Throws<ArgumentException>("source", () => map.Deserialize(new byte[1], 0, 9));
    }
}
