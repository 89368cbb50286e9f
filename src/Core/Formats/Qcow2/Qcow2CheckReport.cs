using System.Globalization;
using System.Text;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The result of <see cref="Qcow2Checker.Check"/>: a read-only consistency check of one qcow2 image, in the terms
/// and with the numbers of <c>qemu-img check --output=json</c> (without <c>-r</c>).
///
/// <para><see cref="CorruptionCount"/> counts what qemu-img reports as <c>corruptions</c> (refcount smaller than the
/// references, an OFLAG_COPIED flag that disagrees with the refcount, misaligned or reserved-bit entries, references
/// past the end of the file, refcount blocks outside the image); <see cref="Leaks"/> counts clusters whose refcount
/// is larger than their references (<c>leaks</c>); <see cref="CheckErrorCount"/> counts what kept parts of the image
/// from being checked (<c>check-errors</c>, e.g. the image is locked by a writer, an I/O error, an unsupported
/// feature). The message lists are capped at <see cref="MaxMessages"/> entries; the counts are not.</para>
/// </summary>
public sealed class Qcow2CheckReport
{
    /// <summary>Most messages kept in each list; the counts go on.</summary>
    public const int MaxMessages = 1000;

    /// <summary>Most leaked cluster offsets kept in <see cref="LeakedOffsets"/>.</summary>
    public const int MaxLeakedOffsets = 32;

    private readonly List<string> _corruptions = new();
    private readonly List<string> _checkErrors = new();
    private readonly List<string> _warnings = new();
    private readonly List<long> _leakedOffsets = new();

    internal Qcow2CheckReport(string path) => Path = path;

    /// <summary>Full path of the checked image file.</summary>
    public string Path { get; }

    /// <summary>qcow2 version (2 or 3), or 0 when the header could not be read.</summary>
    public int Version { get; internal set; }

    /// <summary>Cluster size in bytes, or 0 when the header could not be read.</summary>
    public int ClusterSize { get; internal set; }

    /// <summary>Refcount width in bits (1-64), or 0 when the header could not be read.</summary>
    public int RefcountBits { get; internal set; }

    /// <summary>Length of the image file in bytes when it was checked.</summary>
    public long FileLength { get; internal set; }

    /// <summary>Descriptions of the first <see cref="MaxMessages"/> corruptions (a message may stand for several; see <see cref="CorruptionCount"/>).</summary>
    public IReadOnlyList<string> Corruptions => _corruptions;

    /// <summary>Corruptions found, counted as qemu-img counts them (<c>corruptions</c>).</summary>
    public long CorruptionCount { get; private set; }

    /// <summary>Why parts of the image could not be checked (first <see cref="MaxMessages"/>).</summary>
    public IReadOnlyList<string> CheckErrors => _checkErrors;

    /// <summary>Problems that kept the check from completing (<c>check-errors</c>).</summary>
    public long CheckErrorCount { get; private set; }

    /// <summary>Clusters with a refcount above their references (<c>leaks</c>): wasted space, no harm to data.</summary>
    public long Leaks { get; private set; }

    /// <summary>Host offsets of the first <see cref="MaxLeakedOffsets"/> leaked clusters, ascending.</summary>
    public IReadOnlyList<long> LeakedOffsets => _leakedOffsets;

    /// <summary>Things worth knowing that are not errors (dirty bit, ignored bitmaps extension, ...).</summary>
    public IReadOnlyList<string> Warnings => _warnings;

    /// <summary>Guest clusters with data in this image: normal, preallocated zero, and compressed (<c>allocated-clusters</c>).</summary>
    public long AllocatedClusters { get; internal set; }

    /// <summary>Guest clusters of the virtual disk (<c>total-clusters</c>).</summary>
    public long TotalClusters { get; internal set; }

    /// <summary>Compressed guest clusters (<c>compressed-clusters</c>).</summary>
    public long CompressedClusters { get; internal set; }

    /// <summary>Allocated guest clusters not contiguous with the previous one in their L2 table, plus every compressed one (<c>fragmented-clusters</c>).</summary>
    public long FragmentedClusters { get; internal set; }

    /// <summary>End of the last cluster that is referenced or has a refcount (<c>image-end-offset</c>).</summary>
    public long ImageEndOffset { get; internal set; }

    /// <summary>No corruptions, no leaks, and the whole image could be checked.</summary>
    public bool IsClean => CorruptionCount == 0 && Leaks == 0 && CheckErrorCount == 0;

    /// <summary>True when the whole image was examined (no check errors).</summary>
    public bool IsComplete => CheckErrorCount == 0;

    internal void AddCorruption(string message, long count = 1)
    {
        if (count <= 0)
            return;
        CorruptionCount += count;
        if (_corruptions.Count < MaxMessages)
            _corruptions.Add(count == 1 ? message : $"{message} (counted {count} times)");
    }

    /// <summary>True while another corruption message would still be kept (so building it is worth it).</summary>
    internal bool WantsCorruptionMessage => _corruptions.Count < MaxMessages;

    internal void AddCheckError(string message, long count = 1)
    {
        if (count <= 0)
            return;
        CheckErrorCount += count;
        if (_checkErrors.Count < MaxMessages)
            _checkErrors.Add(message);
    }

    internal void AddLeak(long offset)
    {
        Leaks++;
        if (_leakedOffsets.Count < MaxLeakedOffsets)
            _leakedOffsets.Add(offset);
    }

    internal void AddWarning(string message)
    {
        if (_warnings.Count < MaxMessages)
            _warnings.Add(message);
    }

    /// <summary>A summary in the style of <c>qemu-img check</c>'s human output.</summary>
    public override string ToString()
    {
        var sb = new StringBuilder();
        CultureInfo c = CultureInfo.InvariantCulture;
        foreach (string e in _checkErrors)
            sb.Append("Check error: ").AppendLine(e);
        foreach (string e in _corruptions)
            sb.Append("ERROR ").AppendLine(e);
        if (CorruptionCount > 0)
            sb.AppendLine(c, $"{CorruptionCount} errors were found on the image.");
        if (Leaks > 0)
        {
            sb.AppendLine(c, $"{Leaks} leaked clusters were found on the image (first at {string.Join(", ", _leakedOffsets.Select(o => "0x" + o.ToString("x", c)))}).");
        }
        if (CheckErrorCount > 0)
            sb.AppendLine(c, $"{CheckErrorCount} internal errors have occurred during the check.");
        if (IsClean)
            sb.AppendLine("No errors were found on the image.");
        foreach (string w in _warnings)
            sb.Append("Warning: ").AppendLine(w);
        if (TotalClusters > 0)
        {
            sb.AppendLine(c, $"{AllocatedClusters}/{TotalClusters} = {AllocatedClusters * 100.0 / TotalClusters:F2}% allocated, "
                + $"{(AllocatedClusters > 0 ? FragmentedClusters * 100.0 / AllocatedClusters : 0):F2}% fragmented, "
                + $"{(AllocatedClusters > 0 ? CompressedClusters * 100.0 / AllocatedClusters : 0):F2}% compressed clusters");
        }
        if (ImageEndOffset > 0)
            sb.Append(c, $"Image end offset: {ImageEndOffset}");
        return sb.ToString().TrimEnd();
    }
}
