using System.Runtime.InteropServices;

namespace BitmapBackup.Core.Formats.Qcow2;

/*
 * Deflate with QEMU's exact parameters (qcow2_compress in block/qcow2-threads.c: raw deflate, Z_DEFAULT_COMPRESSION,
 * windowBits -12, memLevel 9), which System.IO.Compression cannot be asked for: its DeflateStream always uses a 32 KiB
 * window, which QEMU's 4 KiB inflater cannot read. The zlib that .NET itself ships (zlib-ng, in
 * libSystem.IO.Compression.Native, already loaded by the runtime) takes a window size through the same native entry
 * points DeflateStream calls, so one stream per cluster with QEMU's window is possible: clusters as small as
 * qemu-img's, at zlib-ng's speed. Where that library or entry point is missing (another runtime build), Available is
 * false and the caller keeps its 4 KiB-piece fallback.
 */

/// <summary>One-shot raw deflate of a cluster with a 4 KiB window, through .NET's own native zlib.</summary>
internal static unsafe partial class Qcow2NativeDeflate
{
    private const string Library = "libSystem.IO.Compression.Native";
    private const int DefaultCompression = -1;
    private const int Deflated = 8;
    private const int RawWindowBits = -12; // negative: raw deflate (no zlib header), 2^12-byte window
    private const int MemLevel = 9;
    private const int DefaultStrategy = 0;
    private const int Finish = 4;
    private const int Ok = 0;
    private const int StreamEnd = 1;

    [StructLayout(LayoutKind.Sequential)]
    private struct ZStream
    {
        public byte* NextIn;
        public byte* NextOut;
        public IntPtr Message;
        public IntPtr InternalState;
        public uint AvailIn;
        public uint AvailOut;
    }

    [LibraryImport(Library, EntryPoint = "CompressionNative_DeflateInit2_")]
    private static partial int DeflateInit2(ZStream* stream, int level, int method, int windowBits, int memLevel, int strategy);

    [LibraryImport(Library, EntryPoint = "CompressionNative_Deflate")]
    private static partial int Deflate(ZStream* stream, int flush);

    [LibraryImport(Library, EntryPoint = "CompressionNative_DeflateEnd")]
    private static partial int DeflateEnd(ZStream* stream);

    private static readonly Lazy<bool> s_available = new(Probe);

    /// <summary>Whether the native deflater answers here.</summary>
    public static bool Available => s_available.Value;

    /// <summary>
    /// Deflate <paramref name="input"/> into <paramref name="output"/>; the compressed length, or -1 when it does not fit
    /// in <paramref name="limit"/> bytes (or the native library failed).
    /// </summary>
    public static int Compress(ReadOnlySpan<byte> input, Span<byte> output, int limit)
    {
        limit = Math.Min(limit, output.Length);
        ZStream z = default;
        fixed (byte* pin = input)
        fixed (byte* pout = output)
        {
            if (DeflateInit2(&z, DefaultCompression, Deflated, RawWindowBits, MemLevel, DefaultStrategy) != Ok)
                return -1;
            try
            {
                z.NextIn = pin;
                z.AvailIn = (uint)input.Length;
                z.NextOut = pout;
                z.AvailOut = (uint)limit;
                int ret = Deflate(&z, Finish);
                return ret == StreamEnd ? limit - (int)z.AvailOut : -1; // not done: it did not fit
            }
            finally
            {
                DeflateEnd(&z);
            }
        }
    }

    private static bool Probe()
    {
        try
        {
            Span<byte> input = stackalloc byte[64];
            Span<byte> output = stackalloc byte[128];
            return Compress(input, output, output.Length) > 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException)
        {
            return false;
        }
    }
}
