namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>qcow2 incompatible feature bits (header bytes 72-79): an unknown bit means the image must not be opened.</summary>
[Flags]
public enum Qcow2IncompatibleFeatures : ulong
{
    None = 0,
    /// <summary>Refcounts may be stale (lazy refcounts were in use and the image was not closed cleanly).</summary>
    Dirty = 1UL << 0,
    /// <summary>QEMU found an inconsistency; the image must not be written until repaired.</summary>
    Corrupt = 1UL << 1,
    /// <summary>Guest data lives in an external data file.</summary>
    ExternalDataFile = 1UL << 2,
    /// <summary>Compressed clusters use the compression type in header byte 104 (not deflate).</summary>
    CompressionType = 1UL << 3,
    /// <summary>L2 entries are 128 bits with subcluster bitmaps.</summary>
    ExtendedL2 = 1UL << 4,
}

/// <summary>qcow2 compatible feature bits (header bytes 80-87): unknown bits may be ignored.</summary>
[Flags]
public enum Qcow2CompatibleFeatures : ulong
{
    None = 0,
    LazyRefcounts = 1UL << 0,
}

/// <summary>qcow2 auto-clear feature bits (header bytes 88-95): a writer must clear the bits it does not maintain.</summary>
[Flags]
public enum Qcow2AutoclearFeatures : ulong
{
    None = 0,
    /// <summary>The bitmaps extension is consistent with the image data.</summary>
    Bitmaps = 1UL << 0,
    /// <summary>The external data file is a consistent raw image.</summary>
    RawExternalData = 1UL << 1,
}

/// <summary>Compression of compressed clusters (header byte 104).</summary>
public enum Qcow2CompressionType
{
    /// <summary>Raw deflate (RFC 1951), called "zlib" by QEMU.</summary>
    Deflate = 0,
    Zstd = 1,
}
