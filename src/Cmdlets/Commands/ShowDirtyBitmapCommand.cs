using System.Management.Automation;
using System.Text;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// Show-DirtyBitmap: a picture of where a bitmap is dirty. The disk as a strip of Unicode block characters, one per cell
/// of consecutive clusters, shaded by the cell's dirty share, with the counts, an axis and the scale; or the same as an
/// SVG file for reports (-OutFile). Counted by walking the bitmap's runs, so it is cheap on any disk size.
/// </summary>
[Cmdlet(VerbsCommon.Show, "DirtyBitmap")]
[OutputType(typeof(string))]
public sealed class ShowDirtyBitmapCommand : DirtyBitmapCommandBase
{
    #region Parameters

    /// <summary>Cells of the strip (characters; fewer when the bitmap has fewer clusters).</summary>
    [Parameter]
    [ValidateRange(8, 4096)]
    public int Width { get; set; } = 64;

    /// <summary>Write the picture as an SVG file instead of text.</summary>
    [Parameter]
    [ValidateNotNullOrEmpty]
    public string? OutFile { get; set; }

    /// <summary>With -OutFile, also write the text picture.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        DirtyMapPicture picture = DirtyMapPicture.Of(bitmap, Width, DateTimeOffset.Now);
        if (OutFile is not null)
        {
            string path = ResolveFilePath(OutFile);
            try
            {
                File.WriteAllText(path, picture.ToSvg(), new UTF8Encoding(false));
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                ReportError(ErrorRecordFactory.From(new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError,
                    $"The picture of bitmap '{bitmap.Name}' of node '{bitmap.Node.Name}' could not be written to '{path}': {e.Message}", path, e)));
                return;
            }
            WriteVerbose($"Wrote the picture of bitmap '{bitmap.Name}' of node '{bitmap.Node.Name}' to '{path}'.");
            if (!PassThru)
                return;
        }
        foreach (string line in picture.ToText())
            WriteObject(line);
    }

    #endregion
}
