using BitmapBackup.Core.Errors;
using Microsoft.Win32.SafeHandles;

namespace BitmapBackup.Core.IO;

/*
 * QEMU's image locks (block/file-posix.c), so that QEMU and this engine refuse each other's conflicting opens.
 * Permission bit i (ImagePermissions) has two bytes in the image file, locked with shared OFD locks:
 * - byte 100+i: "an open holds permission i";
 * - byte 200+i: "an open does not share permission i with other users".
 * An open that wants to hold permission i conflicts with a lock on byte 200+i of another open; an open that does
 * not share permission i conflicts with a lock on byte 100+i. A test (F_OFD_GETLK asking for a write lock) sees
 * the shared locks of every other open file description, not its own. Byte 0 stays libvirt's.
 *
 * Order: test every byte that could conflict first, so a refused open takes nothing; take the shared locks;
 * test again, since another opener may have tested and locked between our test and our locks (QEMU itself
 * locks, then tests). A conflict found the second time releases what was taken before refusing: two racing
 * openers may both be refused, never both admitted.
 *
 * A file system that refuses OFD locks (EINVAL, EOPNOTSUPP, ENOLCK, ENOSYS) gets no locks, as with QEMU's
 * locking=auto, and a warning says so once per file system.
 */
internal static class ImageLocks
{
    /// <summary>Byte 100+i: permission i is held.</summary>
    public const int HeldBase = 100;

    /// <summary>Byte 200+i: permission i is not shared.</summary>
    public const int UnsharedBase = 200;

    private static readonly ImagePermissions[] s_permissions =
        [ImagePermissions.ConsistentRead, ImagePermissions.Write, ImagePermissions.WriteUnchanged, ImagePermissions.Resize];

    private static readonly AsyncLocal<int?> s_simulatedErrno = new();

    /// <summary>
    /// Test hook: an errno every lock call of the current flow of execution fails with (EINVAL: as on a file system
    /// without OFD locks), or null. Async-local, so that tests running in parallel do not see it.
    /// </summary>
    internal static int? SimulatedErrno
    {
        get => s_simulatedErrno.Value;
        set => s_simulatedErrno.Value = value;
    }

    /// <summary>
    /// Take the locks of <paramref name="role"/> on the open image, or throw ImageInUse naming the permission
    /// that conflicts, in QEMU's words. <paramref name="device"/> identifies the file system for the warning.
    /// </summary>
    /// <returns>True when locked; false when the file system does not support the locks (the open goes on without).</returns>
    public static bool Acquire(SafeFileHandle handle, string path, ImageLockRole role, ulong device)
    {
        int errno = FindConflictSettled(handle, role, out string? conflict);
        if (errno != 0)
            return Unavailable(path, device, errno);
        if (conflict is not null)
            throw InUse(path, conflict);

        var taken = new List<int>();
        try
        {
            foreach (int offset in BytesOf(role))
            {
                errno = SimulatedErrno ?? LinuxFile.LockByteShared(handle, offset);
                if (errno is LinuxFile.EAGAIN or LinuxFile.EACCES)
                    throw InUse(path, $"Failed to lock byte {offset}: another process holds a write lock on it");
                if (errno != 0)
                {
                    Release(handle, taken);
                    if (IsUnsupported(errno))
                        return Unavailable(path, device, errno);
                    throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.PermissionDenied,
                        $"Failed to lock byte {offset} of image '{path}': {LinuxFile.Describe(errno)}", path);
                }
                taken.Add(offset);
            }
            errno = FindConflict(handle, role, out conflict);
            if (errno == 0 && conflict is not null)
                throw InUse(path, conflict);
            return true;
        }
        catch
        {
            Release(handle, taken);
            throw;
        }
    }

    /// <summary>The bytes an open of <paramref name="role"/> locks, in QEMU's order.</summary>
    public static IEnumerable<int> BytesOf(ImageLockRole role)
    {
        for (int i = 0; i < s_permissions.Length; i++)
        {
            if ((role.Held & s_permissions[i]) != 0)
                yield return HeldBase + i;
        }
        for (int i = 0; i < s_permissions.Length; i++)
        {
            if ((role.Unshared & s_permissions[i]) != 0)
                yield return UnsharedBase + i;
        }
    }

    /// <summary>QEMU's name of a permission (bdrv_perm_names).</summary>
    public static string QemuName(ImagePermissions permission) => permission switch
    {
        ImagePermissions.ConsistentRead => "consistent read",
        ImagePermissions.Write => "write",
        ImagePermissions.WriteUnchanged => "write unchanged",
        ImagePermissions.Resize => "resize",
        _ => permission.ToString(),
    };

    /// <summary>How long a conflict may take to go away before it counts (see <see cref="FindConflictSettled"/>).</summary>
    private static readonly TimeSpan SettleTime = TimeSpan.FromMilliseconds(200);

    /// <summary>
    /// <see cref="FindConflict"/>, looking again for a moment before calling a conflict one. An open file description
    /// outlives its last close while a child process forked by any thread of this process (qemu-img started by
    /// Process.Start) still holds a copy of the descriptor, until that child's exec closes it (O_CLOEXEC): so an image
    /// closed here a moment ago can still look locked for that long. A real user of the image is still refused.
    /// </summary>
    private static int FindConflictSettled(SafeFileHandle handle, ImageLockRole role, out string? conflict)
    {
        long deadline = Environment.TickCount64 + (long)SettleTime.TotalMilliseconds;
        while (true)
        {
            int errno = FindConflict(handle, role, out conflict);
            if (errno != 0 || conflict is null || Environment.TickCount64 >= deadline)
                return errno;
            Thread.Sleep(10);
        }
    }

    /// <summary>
    /// QEMU's raw_check_lock_bytes: first each held permission against its "not shared" byte, then each unshared
    /// permission against its "held" byte. <paramref name="conflict"/> is QEMU's message for the first conflict.
    /// </summary>
    private static int FindConflict(SafeFileHandle handle, ImageLockRole role, out string? conflict)
    {
        conflict = null;
        for (int i = 0; i < s_permissions.Length; i++)
        {
            ImagePermissions p = s_permissions[i];
            if ((role.Held & p) == 0)
                continue;
            int errno = Test(handle, UnsharedBase + i, out bool locked);
            if (errno != 0)
                return errno;
            if (locked)
            {
                conflict = $"Failed to get \"{QemuName(p)}\" lock: another process holds the image and does not share \"{QemuName(p)}\"";
                return 0;
            }
        }
        for (int i = 0; i < s_permissions.Length; i++)
        {
            ImagePermissions p = s_permissions[i];
            if ((role.Unshared & p) == 0)
                continue;
            int errno = Test(handle, HeldBase + i, out bool locked);
            if (errno != 0)
                return errno;
            if (locked)
            {
                conflict = $"Failed to get shared \"{QemuName(p)}\" lock: another process holds the image with \"{QemuName(p)}\" permission";
                return 0;
            }
        }
        return 0;
    }

    private static int Test(SafeFileHandle handle, int offset, out bool locked)
    {
        if (SimulatedErrno is { } simulated)
        {
            locked = false;
            return simulated;
        }
        return LinuxFile.TestByte(handle, offset, out locked);
    }

    private static void Release(SafeFileHandle handle, List<int> taken)
    {
        foreach (int offset in taken)
            LinuxFile.UnlockByte(handle, offset); // closing the handle would release them too
        taken.Clear();
    }

    private static bool IsUnsupported(int errno) => errno is LinuxFile.EINVAL or LinuxFile.EOPNOTSUPP or LinuxFile.ENOLCK or LinuxFile.ENOSYS;

    private static bool Unavailable(string path, ulong device, int errno)
    {
        if (!IsUnsupported(errno))
            throw new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.ReadError,
                $"Cannot test the image locks of '{path}': {LinuxFile.Describe(errno)}", path);
        EngineWarnings.PostOnce($"image-locks:{device}",
            $"The file system of '{path}' does not support QEMU's image locks (OFD locks: {LinuxFile.Describe(errno)}). " +
            "Images there are opened without them, as QEMU does: QEMU and other processes cannot see that they are in use, and they are not refused when QEMU uses them.");
        return false;
    }

    private static BlockException InUse(string path, string conflict)
        => ImageHolders.Of(path) is { } holder
            ? new(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Image '{path}' is open as {holder} in this session, which holds its image locks: {conflict.Replace("another process holds", "that node holds", StringComparison.Ordinal)}. Close the node first (Close-BlockNode), or read the image with -ForceShare.", path)
            : new(ErrorIds.ImageInUse, BlockErrorCategory.ResourceBusy,
                $"Image '{path}' is in use: {conflict} (or another open of it in this process does). Is another process using the image [{path}]?", path);
}
