using System.Text;

namespace BitmapBackup.Core.Formats.Qcow2;

/// <summary>
/// The optional feature name table extension (spec "Feature name table"): 48-byte entries of
/// {type, bit, 46-byte name}, so that an error about an unknown feature bit can name it.
/// </summary>
internal sealed class Qcow2FeatureNameTable
{
    public const int EntrySize = 48;
    public const byte IncompatibleType = 0;
    public const byte CompatibleType = 1;
    public const byte AutoclearType = 2;

    private readonly Dictionary<(byte Type, byte Bit), string> _names = new();

    public static Qcow2FeatureNameTable Empty { get; } = new();

    public static Qcow2FeatureNameTable ReadFrom(ReadOnlySpan<byte> data)
    {
        var table = new Qcow2FeatureNameTable();
        for (int i = 0; i + EntrySize <= data.Length; i += EntrySize)
        {
            ReadOnlySpan<byte> name = data.Slice(i + 2, EntrySize - 2);
            int nul = name.IndexOf((byte)0);
            if (nul >= 0)
                name = name[..nul];
            if (data[i + 1] < 64)
                table._names[(data[i], data[i + 1])] = Encoding.ASCII.GetString(name);
        }
        return table;
    }

    /// <summary>The name the image gives to a feature bit, or null.</summary>
    public string? NameOf(byte type, int bit) => _names.GetValueOrDefault((type, (byte)bit));
}
