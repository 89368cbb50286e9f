using System.Text;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/*
 * Which disk an image is, whatever name it was opened by, for state kept outside the image (the bitmap state
 * folder). A key finds the state; attributes must still match for the state to be trusted.
 *
 * A block device's key, the first of these that it has:
 *   1. a /dev/disk/by-id name (udev's stable names), preferring dm-uuid-* (an LVM volume keeps its uuid through a
 *      rename), wwn-*, nvme-eui.* and nvme-uuid.*, then any other in ordinal order, dm-name-* and lvm-pv-uuid-* last;
 *      "/dev/dm-3" that is "/dev/dm-4" after a reboot has the same by-id name;
 *   2. without udev, what the kernel says: a device-mapper uuid (keyed "by-id/dm-uuid-<uuid>", the name udev would
 *      give it), or a loop device's backing file (file system, inode and offset: the same file on any /dev/loopN);
 *   3. its major:minor with its serial (sysfs serial or wwid), or with the GUID of its GPT partition table.
 * A device with none of these has no identity: its bitmaps could be attached to another device after a reboot,
 * so they cannot be made persistent. A regular file's key is its file system and inode.
 *
 * Attributes that must match: the device-mapper uuid, the serial, a partition's start sector, a loop device's and a
 * file's birth time (an inode number is reused after a delete; the birth time differs). The size is not part of the
 * identity: the state records it, and a device that grew or shrank follows the resize rules.
 *
 * Example: an LVM volume vg0/vm1 is keyed "by-id/dm-uuid-LVM-WJ2...Q9" with attribute dm-uuid=LVM-WJ2...Q9; a loop
 * device on /srv/disk.img (inode 1234 of file system 254:1) is keyed "loop/fe01:1234:0" with its birth time.
 */

/// <summary>
/// The stable identity of an image outside its name: a key that finds state kept for it, and attributes that must
/// still match. Immutable.
/// </summary>
public sealed class ImageIdentity
{
    /// <summary>Where udev keeps the stable names of block devices.</summary>
    public const string ByIdFolder = "/dev/disk/by-id";

    private readonly SortedDictionary<string, string> _attributes;

    public ImageIdentity(string key, string description, IEnumerable<KeyValuePair<string, string>>? attributes = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(key);
        Key = key;
        Description = description;
        _attributes = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach ((string name, string value) in attributes ?? [])
            _attributes[name] = value;
    }

    /// <summary>What finds the state: "by-id/…", "loop/…", "dev/major:minor/serial=…", "file/…".</summary>
    public string Key { get; }

    /// <summary>Attributes that must match for stored state to be trusted, by name.</summary>
    public IReadOnlyDictionary<string, string> Attributes => _attributes;

    /// <summary>What the key is, for messages ("its /dev/disk/by-id name 'wwn-0x5000…'").</summary>
    public string Description { get; }

    /// <summary>
    /// The first difference between this identity and <paramref name="stored"/> (same key), as a sentence fragment,
    /// or null when every attribute matches.
    /// </summary>
    public string? DifferenceFrom(ImageIdentity stored)
    {
        if (!string.Equals(Key, stored.Key, StringComparison.Ordinal))
            return $"it is keyed '{Key}', the stored state '{stored.Key}'";
        foreach (string name in _attributes.Keys.Union(stored._attributes.Keys).Order(StringComparer.Ordinal))
        {
            string now = _attributes.GetValueOrDefault(name) ?? "(none)";
            string then = stored._attributes.GetValueOrDefault(name) ?? "(none)";
            if (!string.Equals(now, then, StringComparison.Ordinal))
                return $"its {name} is '{now}', the stored state's '{then}'";
        }
        return null;
    }

    /// <summary>Lines "key=…", "description=…" and one "attribute.NAME=VALUE" per attribute, in UTF-8.</summary>
    public byte[] Serialize()
    {
        var text = new StringBuilder();
        text.Append("key=").Append(Key).Append('\n');
        text.Append("description=").Append(Description).Append('\n');
        foreach ((string name, string value) in _attributes)
            text.Append("attribute.").Append(name).Append('=').Append(value).Append('\n');
        return Encoding.UTF8.GetBytes(text.ToString());
    }

    /// <summary>Read what <see cref="Serialize"/> wrote; null when it has no key.</summary>
    public static ImageIdentity? Parse(ReadOnlySpan<byte> bytes)
    {
        string? key = null, description = null;
        var attributes = new List<KeyValuePair<string, string>>();
        foreach (string line in Encoding.UTF8.GetString(bytes).Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            int eq = line.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
                continue;
            string name = line[..eq], value = line[(eq + 1)..];
            if (name == "key")
                key = value;
            else if (name == "description")
                description = value;
            else if (name.StartsWith("attribute.", StringComparison.Ordinal))
                attributes.Add(new(name["attribute.".Length..], value));
        }
        return string.IsNullOrEmpty(key) ? null : new ImageIdentity(key, description ?? key, attributes);
    }

    public override string ToString() => Key;

    #region Block devices

    /// <summary>The identity of an open block device, or null when it has none that is stable (see the file's notes).</summary>
    internal static ImageIdentity? OfDevice(SafeFileHandle handle, BlockDevice device, string byIdFolder = ByIdFolder)
    {
        string sys = $"/sys/dev/block/{device.Number}";
        var attributes = new List<KeyValuePair<string, string>>();
        string? dmUuid = ReadSysfs(sys, "dm/uuid");
        if (dmUuid is not null)
            attributes.Add(new("dm-uuid", dmUuid));
        bool partition = File.Exists(System.IO.Path.Combine(sys, "partition"));
        string? serial = partition ? SerialOf(System.IO.Path.Combine(sys, "..")) : SerialOf(sys);
        if (serial is not null)
            attributes.Add(new("serial", serial));
        if (partition && ReadSysfs(sys, "start") is { } start)
            attributes.Add(new("partition-start", start));

        if (ByIdName(byIdFolder, device.Major, device.Minor) is { } byId)
            return new ImageIdentity($"by-id/{byId}", $"its /dev/disk/by-id name '{byId}'", attributes);
        if (dmUuid is not null)
            return new ImageIdentity($"by-id/dm-uuid-{dmUuid}", $"its device-mapper uuid '{dmUuid}'", attributes);
        if (LinuxFile.GetLoopBacking(handle, out ulong fileSystem, out ulong inode, out ulong offset) == 0 && inode != 0)
        {
            if (BackingBirth(sys, inode) is long born)
                attributes.Add(new("backing-born", born.ToString(System.Globalization.CultureInfo.InvariantCulture)));
            return new ImageIdentity($"loop/{fileSystem:x}:{inode}:{offset}",
                $"its backing file (inode {inode}, offset {offset}; '{ReadSysfs(sys, "loop/backing_file")}' when opened)", attributes);
        }
        if (serial is not null)
            return new ImageIdentity($"dev/{device.Number}/serial={serial}", $"its device number {device.Number} and serial '{serial}'", attributes);
        if (GptDiskGuid(handle, device.LogicalSectorSize) is { } guid)
            return new ImageIdentity($"dev/{device.Number}/gpt={guid}", $"its device number {device.Number} and partition table GUID {guid}", attributes);
        return null;
    }

    /// <summary>
    /// The preferred /dev/disk/by-id name of device major:minor, or null when none names it (no udev, or a device udev
    /// gives no id, such as a loop device).
    /// </summary>
    internal static string? ByIdName(string folder, uint major, uint minor)
    {
        string[] names;
        try
        {
            names = Directory.Exists(folder) ? Directory.GetFileSystemEntries(folder).Select(p => System.IO.Path.GetFileName(p)).ToArray() : [];
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
        return PreferredByIdName(names.Where(name =>
            LinuxFile.GetDeviceNumber(System.IO.Path.Combine(folder, name), out FileKind kind, out uint ma, out uint mi) == 0
            && kind == FileKind.BlockDevice && ma == major && mi == minor));
    }

    /// <summary>Of several by-id names of one device, the one to key it by (see the file's notes); null when there is none.</summary>
    public static string? PreferredByIdName(IEnumerable<string> names)
        => names.OrderBy(Rank).ThenBy(n => n, StringComparer.Ordinal).FirstOrDefault();

    private static int Rank(string name) => name switch
    {
        _ when name.StartsWith("dm-uuid-", StringComparison.Ordinal) => 0,
        _ when name.StartsWith("wwn-", StringComparison.Ordinal) => 1,
        _ when name.StartsWith("nvme-eui.", StringComparison.Ordinal) || name.StartsWith("nvme-uuid.", StringComparison.Ordinal) => 2,
        _ when name.StartsWith("dm-name-", StringComparison.Ordinal) => 4,
        _ when name.StartsWith("lvm-pv-uuid-", StringComparison.Ordinal) => 5,
        _ => 3,
    };

    /// <summary>The device's serial number as sysfs gives it (serial, wwid), or null.</summary>
    private static string? SerialOf(string sysFolder)
        => ReadSysfs(sysFolder, "serial") ?? ReadSysfs(sysFolder, "device/serial") ?? ReadSysfs(sysFolder, "wwid") ?? ReadSysfs(sysFolder, "device/wwid");

    /// <summary>The birth time of a loop device's backing file, when its path still names the same inode.</summary>
    private static long? BackingBirth(string sysFolder, ulong inode)
    {
        string? path = ReadSysfs(sysFolder, "loop/backing_file");
        if (path is null || LinuxFile.GetInodeIdentity(null, path, out _, out ulong found, out long born) != 0 || found != inode || born == 0)
            return null;
        return born;
    }

    /// <summary>The disk GUID of a GPT partition table (its header at LBA 1), or null.</summary>
    private static Guid? GptDiskGuid(SafeFileHandle handle, int sectorSize)
    {
        Span<byte> header = stackalloc byte[92];
        try
        {
            if (RandomAccess.Read(handle, header, sectorSize) != header.Length || !header[..8].SequenceEqual("EFI PART"u8))
                return null;
        }
        catch (IOException)
        {
            return null;
        }
        var guid = new Guid(header.Slice(56, 16));
        return guid == Guid.Empty ? null : guid;
    }

    private static string? ReadSysfs(string folder, string name)
    {
        try
        {
            string value = File.ReadAllText(System.IO.Path.Combine(folder, name)).Trim();
            return value.Length == 0 || value.Contains('\n', StringComparison.Ordinal) ? null : value;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    #endregion

    /// <summary>The identity of an open regular file: its file system and inode, with its birth time; null off Linux.</summary>
    internal static ImageIdentity? OfFile(SafeFileHandle handle, string path)
    {
        if (!OperatingSystem.IsLinux() || LinuxFile.GetInodeIdentity(handle, path, out ulong fileSystem, out ulong inode, out long born) != 0 || inode == 0)
            return null;
        KeyValuePair<string, string>[] attributes = born == 0 ? [] : [new("born", born.ToString(System.Globalization.CultureInfo.InvariantCulture))];
        return new ImageIdentity($"file/{fileSystem >> 32}:{fileSystem & 0xFFFFFFFF}:{inode}", $"its file system and inode ('{path}' when opened)", attributes);
    }
}
