using System.Xml;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Tests.TestSupport;
using Xunit;

namespace BitmapBackup.Core.Tests;

/// <summary>
/// The per-cell counts of <see cref="DirtyBitmapDensity"/> against counting every bit, the levels and text of
/// <see cref="DirtyMapPicture"/>, and the SVG of <see cref="DirtyMapSvg"/>. Fixed seeds.
/// </summary>
public static class DirtyMapPictureTests
{
    public static TheoryData<long, int, double, int> Shapes => new()
    {
        { 1, 8, 1.0, 1 },
        { 7, 8, 0.5, 2 },
        { 100, 7, 0.3, 3 },
        { 4096, 64, 0.01, 4 },
        { 12345, 64, 0.2, 5 },
        { 12345, 1000, 0.9, 6 },
        { (3 * 4096) + 7, 4096, 0.05, 7 },
        { 262_144 + 13, 333, 0.001, 8 },
    };

    [Theory]
    [MemberData(nameof(Shapes))]
    public static void Counts_EqualACountOfEveryBit(long length, int cells, double density, int seed)
    {
        var bits = new HierarchicalBitmap(length);
        var random = new Random(seed);
        for (long b = 0; b < length; b++)
        {
            if (random.NextDouble() < density)
                bits.Set(b, 1 + Math.Min(length - b - 1, random.Next(0, 3)));
        }
        long[] counts = DirtyBitmapDensity.Count(bits, cells, out long runs);
        int w = (int)Math.Min(cells, length);
        Assert.Equal(w, counts.Length);
        var expected = new long[w];
        long expectedRuns = 0;
        for (long b = 0; b < length; b++)
        {
            if (!bits.Get(b))
                continue;
            expected[DirtyBitmapDensity.CellOf(b, w, length)]++;
            if (b == 0 || !bits.Get(b - 1))
                expectedRuns++;
        }
        Assert.Equal(expected, counts);
        Assert.Equal(expectedRuns, runs);
        Assert.Equal(bits.Count, counts.Sum());
        for (int c = 0; c < w; c++)
        {
            long start = DirtyBitmapDensity.CellStart(c, w, length);
            long end = DirtyBitmapDensity.CellStart(c + 1, w, length);
            Assert.InRange(end - start, length / w, (length / w) + 1);
            Assert.Equal(c, DirtyBitmapDensity.CellOf(start, w, length));
            Assert.Equal(c, DirtyBitmapDensity.CellOf(end - 1, w, length));
        }
    }

    [Fact]
    public static void CellBoundaries_DoNotOverflowForTheLargestBitmaps()
    {
        long length = HierarchicalBitmap.MaxLength;
        const int cells = 4096;
        long previous = 0;
        for (int c = 1; c <= cells; c++)
        {
            long start = DirtyBitmapDensity.CellStart(c, cells, length);
            Assert.True(start > previous, $"cell {c} starts at {start}, not after {previous}");
            Assert.Equal(c - 1, DirtyBitmapDensity.CellOf(start - 1, cells, length));
            previous = start;
        }
        Assert.Equal(length, previous);
    }

    [Fact]
    public static void Levels_ShowASingleDirtyClusterAndFillOnlyNearlyFullCells()
    {
        using var fixture = new RawNodeFixture(size: 64L << 20);
        DirtyBitmap bitmap = fixture.Node.AddBitmap("b", 65536); // 1,024 clusters, 8 cells of 128
        bitmap.MarkDirty(0, 1);                                   // cell 0: 1 of 128
        bitmap.MarkDirty(128L * 65536, 16L * 65536);             // cell 1: 16 of 128 = 1/8
        bitmap.MarkDirty(256L * 65536, 111L * 65536);            // cell 2: 111 of 128, just under 7/8
        bitmap.MarkDirty(384L * 65536, 112L * 65536);            // cell 3: 112 of 128 = 7/8
        bitmap.MarkDirty(512L * 65536, 128L * 65536);            // cell 4: all
        DirtyMapPicture picture = DirtyMapPicture.Of(bitmap, 8, DateTimeOffset.UnixEpoch);
        Assert.Equal([1, 2, 7, 8, 8, 0, 0, 0], Enumerable.Range(0, 8).Select(picture.Level));
        Assert.Equal("|▁▂▇██   |", picture.Strip);
        Assert.Equal(5, picture.Runs);
        Assert.Equal((1 + 16 + 111 + 112 + 128) * 65536L, picture.DirtyBytes);
    }

    [Theory]
    [InlineData(0, "0 B")]
    [InlineData(512, "512 B")]
    [InlineData(65536, "64 KiB")]
    [InlineData(1536 * 1024, "1.5 MiB")]
    [InlineData((1L << 40) - 1, "1023.9 GiB")]
    [InlineData(1L << 40, "1 TiB")]
    public static void FormatBytes_UsesBinaryUnitsAndNeverRoundsUp(long bytes, string text)
        => Assert.Equal(text, DirtyMapPicture.FormatBytes(bytes));

    [Fact]
    public static void Svg_IsWellFormedAndDescribesEveryCell()
    {
        using var fixture = new RawNodeFixture(size: 16L << 20);
        DirtyBitmap bitmap = fixture.Node.AddBitmap("x<&>\"'", 65536);
        bitmap.MarkDirty(5L << 20, 3L << 20);
        var time = new DateTimeOffset(2024, 6, 1, 12, 30, 0, TimeSpan.FromHours(2));
        DirtyMapPicture picture = DirtyMapPicture.Of(bitmap, 16, time);
        var doc = new XmlDocument();
        doc.LoadXml(picture.ToSvg());
        var ns = new XmlNamespaceManager(doc.NameTable);
        ns.AddNamespace("s", "http://www.w3.org/2000/svg");
        Assert.Equal("x<&>\"'", doc.DocumentElement!.GetAttribute("data-bitmap"));
        Assert.Equal("Read at 2024-06-01T10:30:00Z", doc.SelectSingleNode("//s:text[@id='time']", ns)!.InnerText);
        Assert.Equal(picture.Caption, doc.SelectSingleNode("//s:text[@id='caption']", ns)!.InnerText);
        XmlNodeList cells = doc.SelectNodes("//s:rect[@class='cell']", ns)!;
        Assert.Equal(16, cells.Count);
        for (int c = 0; c < 16; c++)
        {
            var rect = (XmlElement)cells[c]!;
            Assert.Equal(picture.Level(c).ToString(System.Globalization.CultureInfo.InvariantCulture), rect.GetAttribute("data-level"));
            Assert.Equal(((long)c << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), rect.GetAttribute("data-offset"));
        }
        Assert.Equal([0, 0, 0, 0, 0, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0], Enumerable.Range(0, 16).Select(picture.Level));
    }
}
