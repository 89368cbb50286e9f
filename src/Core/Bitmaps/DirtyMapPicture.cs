using System.Globalization;
using System.Text;

namespace BitmapBackup.Core.Bitmaps;

/*
 * A picture of a dirty bitmap (Show-DirtyBitmap): the disk drawn as a strip of W cells, each cell a run of
 * consecutive clusters (DirtyBitmapDensity), shaded by the share of its clusters that are dirty.
 *
 * Scale: nine glyphs, ' ' for a clean cell and the eight Unicode lower blocks U+2581-U+2588 for eighths of dirty
 * share: level = 0 for no dirty cluster, else 1 + floor(8 d / n) capped at 8 (d dirty of n clusters). So a single
 * dirty cluster in a cell of thousands still shows (as ▁: "under 12.5 %"), and █ means "87.5 % or more". The text is
 * four lines: a caption with the counts, the strip between two bars, an axis (0, the middle cell's offset, the disk
 * size) and the legend with the scale. The SVG form (DirtyMapSvg) draws the same cells and says the same in text.
 * Everything is computed from the per-cell counts, so the cost does not depend on the disk's size.
 */

/// <summary>A dirty bitmap drawn as a strip of cells: the counts behind it, and its text and SVG forms.</summary>
public sealed class DirtyMapPicture
{
    /// <summary>The glyph of each level: clean, then eighths of dirty share.</summary>
    public static readonly char[] Glyphs = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

    private static readonly CultureInfo Invariant = CultureInfo.InvariantCulture;

    private DirtyMapPicture(string node, string bitmap, long granularity, long diskSize, long[] counts, long runs, long dirtyBits, long bits, DateTimeOffset time)
    {
        Node = node;
        Bitmap = bitmap;
        Granularity = granularity;
        DiskSize = diskSize;
        DirtyPerCell = counts;
        Runs = runs;
        DirtyBits = dirtyBits;
        Bits = bits;
        Time = time;
    }

    public string Node { get; }

    public string Bitmap { get; }

    /// <summary>Bytes per bit (cluster).</summary>
    public long Granularity { get; }

    /// <summary>The node's size in bytes.</summary>
    public long DiskSize { get; }

    /// <summary>Dirty clusters of each cell.</summary>
    public IReadOnlyList<long> DirtyPerCell { get; }

    /// <summary>Runs of dirty clusters (the extents Get-DirtyBitmapRange lists).</summary>
    public long Runs { get; }

    public long DirtyBits { get; }

    /// <summary>Clusters of the disk (bits of the bitmap).</summary>
    public long Bits { get; }

    /// <summary>Dirty bytes as the bitmap's Count says: dirty clusters × granularity.</summary>
    public long DirtyBytes => DirtyBits * Granularity;

    /// <summary>When the bitmap was read.</summary>
    public DateTimeOffset Time { get; }

    public int Cells => DirtyPerCell.Count;

    /// <summary>Read <paramref name="bitmap"/> into a picture <paramref name="width"/> cells wide (fewer when the bitmap has fewer bits).</summary>
    public static DirtyMapPicture Of(DirtyBitmap bitmap, int width, DateTimeOffset time)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        (long[] counts, long runs, long dirtyBits, long bits) = bitmap.CountPerCell(width);
        return new DirtyMapPicture(bitmap.Node.Name, bitmap.Name ?? "(successor)", bitmap.Granularity, bitmap.Node.Size, counts, runs, dirtyBits, bits, time);
    }

    #region Cells

    /// <summary>First cluster of a cell (<see cref="Bits"/> for the cell past the last).</summary>
    public long CellStart(int cell) => DirtyBitmapDensity.CellStart(cell, Cells, Bits);

    /// <summary>Clusters of a cell.</summary>
    public long CellBits(int cell) => CellStart(cell + 1) - CellStart(cell);

    /// <summary>Byte offset of a cell on the disk.</summary>
    public long CellOffset(int cell) => Math.Min(DiskSize, CellStart(cell) * Granularity);

    /// <summary>Bytes of the disk a cell covers (the last one may end with a partial cluster).</summary>
    public long CellLength(int cell) => Math.Min(DiskSize, CellStart(cell + 1) * Granularity) - CellOffset(cell);

    /// <summary>0 for a clean cell, else 1-8: 1 + floor(8 × dirty share), capped at 8.</summary>
    public int Level(int cell)
    {
        long dirty = DirtyPerCell[cell];
        long n = CellBits(cell);
        return dirty <= 0 || n <= 0 ? 0 : (int)Math.Min(8, 1 + (dirty * 8 / n));
    }

    /// <summary>The glyph of a cell.</summary>
    public char Glyph(int cell) => Glyphs[Level(cell)];

    /// <summary>What each level means, for legends: ' ' none, ▁ under 12.5 %, ▂ 12.5-25 %, ..., █ 87.5 % or more.</summary>
    public static string LevelMeaning(int level) => level switch
    {
        0 => "none",
        1 => "under 12.5 %",
        8 => "87.5 % or more",
        _ => string.Create(Invariant, $"{(level - 1) * 12.5}-{level * 12.5} %"),
    };

    #endregion

    #region Text

    /// <summary>The caption: node, bitmap and counts.</summary>
    public string Caption
        => string.Create(Invariant,
            $"Dirty bitmap '{Bitmap}' of node '{Node}': {FormatBytes(DirtyBytes)} dirty ({DirtyBytes:N0} of {DiskSize:N0} bytes, {Percent(DirtyBytes, DiskSize)}), {DirtyBits:N0} of {Bits:N0} clusters of {FormatBytes(Granularity)}, {Runs:N0} {(Runs == 1 ? "extent" : "extents")}");

    /// <summary>The scale: what one cell of the strip stands for.</summary>
    public string Scale
    {
        get
        {
            bool even = Bits % Cells == 0;
            long perCell = Bits / Cells;
            string clusters = even ? string.Create(Invariant, $"{perCell:N0} {(perCell == 1 ? "cluster" : "clusters")}") : string.Create(Invariant, $"{perCell:N0}-{perCell + 1:N0} clusters");
            string bytes = FormatBytes(even ? perCell * Granularity : DiskSize / Cells);
            return $"Scale: {Cells} cells, each {(even ? "" : "about ")}{bytes} of the disk ({clusters} of {FormatBytes(Granularity)}).";
        }
    }

    /// <summary>The legend of the glyphs.</summary>
    public static string Legend
        => "Dirty share of a cell: " + string.Join("  ", Enumerable.Range(0, Glyphs.Length).Select(l => $"'{Glyphs[l]}' {LevelMeaning(l)}"));

    /// <summary>The strip: one glyph per cell between two bars.</summary>
    public string Strip
    {
        get
        {
            var text = new StringBuilder(Cells + 2);
            text.Append('|');
            for (int c = 0; c < Cells; c++)
                text.Append(Glyph(c));
            text.Append('|');
            return text.ToString();
        }
    }

    /// <summary>The axis under the strip: 0 under the first cell, the middle cell's offset, the disk size under the last.</summary>
    public string Axis
    {
        get
        {
            int width = Cells + 2;
            char[] line = Enumerable.Repeat(' ', width).ToArray();
            string left = "0";
            string right = FormatBytes(DiskSize);
            int middleCell = Cells / 2;
            string middle = FormatBytes(CellOffset(middleCell));
            Put(line, 1, left);
            int rightAt = Math.Max(left.Length + 2, width - 1 - right.Length);
            int middleAt = 1 + middleCell - (middle.Length / 2);
            if (middleCell > 0 && middleAt > 1 + left.Length + 1 && middleAt + middle.Length + 1 < rightAt)
                Put(line, middleAt, middle);
            return (new string(line, 0, Math.Min(width, rightAt)) + right).TrimEnd();
        }
    }

    /// <summary>The picture as text lines: caption, strip, axis, scale and legend.</summary>
    public IReadOnlyList<string> ToText() => [Caption, Strip, Axis, Scale, Legend];

    /// <summary>The picture as an SVG document (<see cref="DirtyMapSvg"/>).</summary>
    public string ToSvg() => DirtyMapSvg.Render(this);

    private static void Put(char[] line, int at, string text)
    {
        for (int i = 0; i < text.Length && at + i < line.Length; i++)
            line[at + i] = text[i];
    }

    /// <summary>A share as a percentage with up to two decimals ("0.29 %").</summary>
    public static string Percent(long part, long whole)
        => whole <= 0 ? "0 %" : string.Create(Invariant, $"{Math.Round(100.0 * part / whole, 2):0.##} %");

    /// <summary>Bytes in binary units with up to one decimal: 512 B, 64 KiB, 1.5 GiB.</summary>
    public static string FormatBytes(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double value = bytes;
        int unit = 0;
        while (Math.Abs(value) >= 1024 && unit < units.Length - 1)
        {
            value /= 1024;
            unit++;
        }
        return string.Create(Invariant, $"{Math.Floor(value * 10) / 10:0.#} {units[unit]}");
    }

    #endregion
}
