using System.Buffers.Binary;
using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.Digests;

/*
 * Writes the manifest of a backup while the backup copies. Crash order: everything goes to "<manifest>.tmp"; the
 * rename to "<manifest>" happens only once the backup itself has committed (Commit, called after the target's
 * rename), after an fsync; so a crash leaves the previous manifest or the new one, never a torn one, and a manifest
 * never describes a backup that does not exist.
 *
 * A full backup starts from a sparse file (every digest 0: "reads as zeros") and writes the digest of each cluster
 * it copies; an incremental starts from a copy of the previous backup's manifest and rewrites the clusters it copies.
 * The copy skips the holes of the previous manifest (clusters that read as zeros were never written), so a 1 TiB disk
 * holding a few MiB costs a few KiB of digests, not 256 MiB.
 * Either way the source is read once, by the copy itself.
 */

/// <summary>The manifest of a backup being taken.</summary>
public sealed class DigestManifestWriter : IDisposable
{
    private readonly SafeFileHandle _handle;
    private bool _done;

    private DigestManifestWriter(string path, string tempPath, SafeFileHandle handle, DigestManifestInfo info)
    {
        Path = path;
        TempPath = tempPath;
        _handle = handle;
        Info = info;
    }

    /// <summary>Where the manifest goes once the backup commits.</summary>
    public string Path { get; }

    /// <summary>Where it is written meanwhile.</summary>
    public string TempPath { get; }

    public DigestManifestInfo Info { get; }

    /// <summary>
    /// Start the manifest at <paramref name="path"/> for <paramref name="info"/>: every cluster "zeros", or, with
    /// <paramref name="previous"/> (the manifest of the backup this one goes on top of), its digests.
    /// </summary>
    public static DigestManifestWriter Create(string path, DigestManifestInfo info, DigestManifest? previous)
    {
        string full = System.IO.Path.GetFullPath(path);
        string temp = full + ".tmp";
        SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(temp, FileMode.Create, FileAccess.ReadWrite, FileShare.None);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot create digest manifest '{temp}': {e.Message}", temp, e);
        }
        var writer = new DigestManifestWriter(full, temp, handle, info);
        try
        {
            writer.Io(() =>
            {
                RandomAccess.SetLength(handle, DigestManifest.HeaderSize + (info.ClusterCount * DigestManifest.DigestSize)); // a grown disk's new clusters: zeros
                if (previous is not null)
                    previous.CopyDigestsTo(handle, info.ClusterCount);
                RandomAccess.Write(handle, DigestManifest.FormatHeader(info), 0);
            });
            return writer;
        }
        catch
        {
            writer.Dispose();
            throw;
        }
    }

    /// <summary>Record the digest of a cluster as copied (thread-safe: positional writes).</summary>
    public void Write(long cluster, UInt128 digest)
    {
        Span<byte> bytes = stackalloc byte[DigestManifest.DigestSize];
        BinaryPrimitives.WriteUInt128BigEndian(bytes, digest);
        try
        {
            RandomAccess.Write(_handle, bytes, DigestManifest.HeaderSize + (cluster * DigestManifest.DigestSize));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot write digest manifest '{TempPath}': {e.Message}", TempPath, e);
        }
    }

    /// <summary>The backup has committed: stamp its point in time, make the manifest durable and give it its name.</summary>
    public void Commit(DateTimeOffset pointInTime)
    {
        byte[] header = DigestManifest.FormatHeader(Info with { PointInTime = pointInTime });
        Io(() => RandomAccess.Write(_handle, header, 0));
        Io(() => RandomAccess.FlushToDisk(_handle));
        _handle.Dispose();
        Io(() => File.Move(TempPath, Path, overwrite: true));
        _done = true;
        IO.LinuxFile.TrySyncDirectory(System.IO.Path.GetDirectoryName(Path)!);
    }

    /// <summary>The backup did not happen: drop the temporary file.</summary>
    public void Dispose()
    {
        _handle.Dispose();
        if (_done)
            return;
        _done = true;
        try
        {
            File.Delete(TempPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }

    private void Io(Action action)
    {
        try
        {
            action();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, $"Cannot write digest manifest '{TempPath}': {e.Message}", TempPath, e);
        }
    }
}
