using System.Management.Automation;
using BitmapBackup.Core.Bitmaps;

namespace BitmapBackup;

/// <summary>Get-DirtyBitmapRange: the dirty extents of a bitmap, maximal runs of dirty clusters in node bytes, in order.</summary>
[Cmdlet(VerbsCommon.Get, "DirtyBitmapRange")]
[OutputType(typeof(DirtyRange))]
public sealed class GetDirtyBitmapRangeCommand : DirtyBitmapCommandBase
{
    #region Overrides

    protected override void ProcessBitmap(DirtyBitmap bitmap)
    {
        foreach ((long offset, long length) in bitmap.GetDirtyRanges())
            WriteObject(new DirtyRange(bitmap.Node.Name, bitmap.Name!, offset, length));
    }

    #endregion
}
