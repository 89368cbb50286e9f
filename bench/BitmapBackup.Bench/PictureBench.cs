using System.Diagnostics;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Nodes;
using static BitmapBackup.Bench.BenchSupport;

namespace BitmapBackup.Bench;

/// <summary>
/// Show-DirtyBitmap's cost (suite "picture"): the picture of the dirty bitmap of a sparse 1 TiB node at 64 KiB
/// granularity (16,777,216 clusters) with 1 % of its clusters dirty at random (about 166,000 runs): the per-cell count
/// (a walk of the runs under the node's lock) plus the text and the SVG, at the default 64 cells and at 1,024 cells.
/// The median of 15 repetitions after five warm-ups; the goal is checked against the median.
/// </summary>
public static class PictureBench
{
    private const long NodeBytes = 1L << 40;
    private const long Granularity = 64 * 1024;
    private const int Repetitions = 15;

    public static void Run(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        output.WriteLine("== picture: Show-DirtyBitmap of a 1 TiB node at 64 KiB granularity, 1 % dirty ==");
        output.WriteLine("   {0}", Describe());
        output.WriteLine("   median (best) of {0} repetitions after warm-up", Repetitions);
        string dir = Path.Combine(Path.GetTempPath(), "bb-bench-picture-" + Environment.ProcessId);
        Directory.CreateDirectory(dir);
        try
        {
            string image = Path.Combine(dir, "1tib.img");
            BlockEngine.CreateImage(image, NodeBytes);
            var engine = new BlockEngine();
            BlockNode node = engine.Open(image, "bench");
            DirtyBitmap bitmap = node.AddBitmap("daily", Granularity);
            var random = new Random(20240601);
            long clusters = NodeBytes / Granularity;
            for (long c = 0; c < clusters; c++)
            {
                if (random.NextDouble() < 0.01)
                    bitmap.MarkDirty(c * Granularity, Granularity);
            }
            output.WriteLine("   {0:N0} of {1:N0} clusters dirty ({2:P2}), {3:N0} extents", bitmap.DirtyBits, clusters,
                (double)bitmap.DirtyBits / clusters, bitmap.GetDirtyRanges().Count);
            foreach (int width in new[] { 64, 1024 })
            {
                int textLength = 0, svgLength = 0;
                (double median, double best) = Measure(() =>
                {
                    DirtyMapPicture picture = DirtyMapPicture.Of(bitmap, width, DateTimeOffset.Now);
                    textLength = picture.ToText().Sum(l => l.Length);
                    svgLength = picture.ToSvg().Length;
                });
                string verdict = median <= 50 ? "ok" : "MISSED";
                output.WriteLine("   {0,-40} {1,12:F3} ms        (best {2:F3})   goal: <= 50 ms [{3}]",
                    $"Picture, {width} cells, text + SVG", median, best, verdict);
                output.WriteLine("   {0,-40} {1,12:N0} chars of text, {2:N0} of SVG", "", textLength, svgLength);
            }
            DirtyMapPicture sample = DirtyMapPicture.Of(bitmap, 1024, DateTimeOffset.Now);
            (double countMedian, double countBest) = Measure(() => bitmap.CountPerCell(1024));
            (double textMedian, double textBest) = Measure(() => sample.ToText());
            (double svgMedian, double svgBest) = Measure(() => sample.ToSvg());
            output.WriteLine("   {0,-40} {1,12:F3} ms        (best {2:F3})", "  of which: count per cell (1024)", countMedian, countBest);
            output.WriteLine("   {0,-40} {1,12:F3} ms        (best {2:F3})", "  of which: text (1024)", textMedian, textBest);
            output.WriteLine("   {0,-40} {1,12:F3} ms        (best {2:F3})", "  of which: SVG (1024)", svgMedian, svgBest);
            engine.CloseAll();
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static (double Median, double Best) Measure(Action body)
    {
        for (int i = 0; i < 5; i++)
            body();
        var samples = new double[Repetitions];
        for (int i = 0; i < Repetitions; i++)
        {
            long start = Stopwatch.GetTimestamp();
            body();
            samples[i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        }
        Array.Sort(samples);
        return (samples[Repetitions / 2], samples[0]);
    }
}
