using System.Globalization;
using System.Text;
using System.Xml;

namespace BitmapBackup.Core.Bitmaps;

/// <summary>
/// The SVG form of a <see cref="DirtyMapPicture"/>, for reports: a title; the caption, the time and the scale as
/// text (ids title, caption, time, scale); the strip as one rect per cell (class "cell", shaded by level with
/// fill-opacity level/8, its offset, length, dirty clusters and level in data- attributes, and a tooltip on each dirty
/// cell); the axis
/// labels; and the legend, one swatch per level. Names are escaped by the XML writer, so any bitmap name is safe.
/// </summary>
public static class DirtyMapSvg
{
    private const int Margin = 16;
    private const int StripTop = 86;
    private const int StripHeight = 40;
    private const int TargetWidth = 960;
    private const string DirtyColor = "#c62828";
    private static readonly CultureInfo Invariant = CultureInfo.InvariantCulture;

    /// <summary>The SVG document (UTF-8 text, no byte order mark).</summary>
    public static string Render(DirtyMapPicture picture)
    {
        ArgumentNullException.ThrowIfNull(picture);
        int cellWidth = Math.Max(1, TargetWidth / picture.Cells);
        int stripWidth = cellWidth * picture.Cells;
        int width = Math.Max(stripWidth, 720) + (2 * Margin);
        int height = StripTop + StripHeight + 96;
        var text = new StringBuilder(4096 + (picture.Cells * 320));
        var settings = new XmlWriterSettings { Indent = true, IndentChars = "  ", OmitXmlDeclaration = false, Encoding = new UTF8Encoding(false), NewLineChars = "\n" };
        using (var w = XmlWriter.Create(new StringWriterUtf8(text), settings))
        {
            w.WriteStartDocument();
            w.WriteStartElement("svg", "http://www.w3.org/2000/svg");
            Attr(w, "width", width);
            Attr(w, "height", height);
            w.WriteAttributeString("viewBox", string.Create(Invariant, $"0 0 {width} {height}"));
            w.WriteAttributeString("font-family", "sans-serif");
            w.WriteAttributeString("data-node", picture.Node);
            w.WriteAttributeString("data-bitmap", picture.Bitmap);
            w.WriteElementString("title", $"Dirty bitmap '{picture.Bitmap}' of node '{picture.Node}'");

            Text(w, "title", Margin, 24, 16, $"Dirty bitmap '{picture.Bitmap}' of node '{picture.Node}'", "bold");
            Text(w, "caption", Margin, 46, 12, picture.Caption);
            Text(w, "time", Margin, 64, 12, "Read at " + picture.Time.ToUniversalTime().ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", Invariant));

            w.WriteStartElement("rect");
            w.WriteAttributeString("id", "strip");
            Attr(w, "x", Margin);
            Attr(w, "y", StripTop);
            Attr(w, "width", stripWidth);
            Attr(w, "height", StripHeight);
            w.WriteAttributeString("fill", "#f5f5f5");
            w.WriteAttributeString("stroke", "#616161");
            w.WriteEndElement();

            w.WriteStartElement("g");
            w.WriteAttributeString("id", "cells");
            w.WriteAttributeString("fill", DirtyColor);
            for (int c = 0; c < picture.Cells; c++)
                Cell(w, picture, c, Margin + (c * cellWidth), cellWidth);
            w.WriteEndElement();

            int axisY = StripTop + StripHeight + 16;
            w.WriteStartElement("g");
            w.WriteAttributeString("id", "axis");
            w.WriteAttributeString("font-size", "11");
            AxisLabel(w, Margin, axisY, "start", "0");
            if (picture.Cells >= 8)
                AxisLabel(w, Margin + (picture.Cells / 2 * cellWidth), axisY, "middle", DirtyMapPicture.FormatBytes(picture.CellOffset(picture.Cells / 2)));
            AxisLabel(w, Margin + stripWidth, axisY, "end", DirtyMapPicture.FormatBytes(picture.DiskSize));
            w.WriteEndElement();

            Text(w, "scale", Margin, axisY + 22, 12, picture.Scale);
            Legend(w, axisY + 44);

            w.WriteEndElement();
            w.WriteEndDocument();
        }
        return text.ToString();
    }

    private static void Cell(XmlWriter w, DirtyMapPicture picture, int cell, int x, int cellWidth)
    {
        int level = picture.Level(cell);
        long offset = picture.CellOffset(cell);
        long length = picture.CellLength(cell);
        long dirty = picture.DirtyPerCell[cell];
        w.WriteStartElement("rect");
        w.WriteAttributeString("class", "cell");
        Attr(w, "x", x);
        Attr(w, "y", StripTop);
        Attr(w, "width", cellWidth);
        Attr(w, "height", StripHeight);
        w.WriteAttributeString("fill-opacity", (level / 8.0).ToString("0.###", Invariant));
        w.WriteAttributeString("data-cell", cell.ToString(Invariant));
        w.WriteAttributeString("data-offset", offset.ToString(Invariant));
        w.WriteAttributeString("data-length", length.ToString(Invariant));
        w.WriteAttributeString("data-dirty-clusters", dirty.ToString(Invariant));
        w.WriteAttributeString("data-level", level.ToString(Invariant));
        if (level > 0)
        {
            w.WriteElementString("title", string.Create(Invariant,
                $"{DirtyMapPicture.FormatBytes(offset)} to {DirtyMapPicture.FormatBytes(offset + length)}: {dirty:N0} of {picture.CellBits(cell):N0} clusters dirty"));
        }
        w.WriteEndElement();
    }

    private static void Legend(XmlWriter w, int y)
    {
        w.WriteStartElement("g");
        w.WriteAttributeString("id", "legend");
        w.WriteAttributeString("font-size", "11");
        Text(w, null, Margin, y + 11, 11, "Dirty share of a cell:");
        int x = Margin + 130;
        for (int level = 0; level < DirtyMapPicture.Glyphs.Length; level++)
        {
            w.WriteStartElement("rect");
            w.WriteAttributeString("class", "swatch");
            Attr(w, "x", x);
            Attr(w, "y", y);
            Attr(w, "width", 12);
            Attr(w, "height", 12);
            w.WriteAttributeString("fill", DirtyColor);
            w.WriteAttributeString("fill-opacity", (level / 8.0).ToString("0.###", Invariant));
            w.WriteAttributeString("stroke", "#616161");
            w.WriteAttributeString("data-level", level.ToString(Invariant));
            w.WriteEndElement();
            string meaning = DirtyMapPicture.LevelMeaning(level);
            Text(w, null, x + 16, y + 11, 11, meaning);
            x += 24 + (meaning.Length * 6);
        }
        w.WriteEndElement();
    }

    private static void AxisLabel(XmlWriter w, int x, int y, string anchor, string label)
    {
        w.WriteStartElement("text");
        Attr(w, "x", x);
        Attr(w, "y", y);
        w.WriteAttributeString("text-anchor", anchor);
        w.WriteString(label);
        w.WriteEndElement();
    }

    private static void Text(XmlWriter w, string? id, int x, int y, int size, string content, string? weight = null)
    {
        w.WriteStartElement("text");
        if (id is not null)
            w.WriteAttributeString("id", id);
        Attr(w, "x", x);
        Attr(w, "y", y);
        Attr(w, "font-size", size);
        if (weight is not null)
            w.WriteAttributeString("font-weight", weight);
        w.WriteString(content);
        w.WriteEndElement();
    }

    private static void Attr(XmlWriter w, string name, int value) => w.WriteAttributeString(name, value.ToString(Invariant));

    /// <summary>A StringWriter that declares UTF-8, so the XML declaration says encoding="utf-8".</summary>
    private sealed class StringWriterUtf8(StringBuilder builder) : StringWriter(builder, CultureInfo.InvariantCulture)
    {
        public override Encoding Encoding { get; } = new UTF8Encoding(false);
    }
}
