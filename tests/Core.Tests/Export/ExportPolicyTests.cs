using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Export;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests.Export;

/// <summary>
/// The export policy as pure decisions: transmission flags (qemu-nbd's values), the metadata-context query table,
/// every request check with its error, the bitmap rules at start, and engine errors mapped to NBD errors.
/// </summary>
public sealed class ExportPolicyTests
{
    private const long Size = 64 << 20;

    private static ExportPolicy Policy(bool writable = true, bool multiConnection = true, params string[] bitmaps)
        => new("disk", null, Size, writable, multiConnection, bitmaps);

    [Theory]
    [InlineData(true, true, true, 0x0ded)]   // qemu-nbd -e 8, writable, structured replies
    [InlineData(true, true, false, 0x0d6d)]  // the same without structured replies (EXPORT_NAME before SR)
    [InlineData(true, false, true, 0x0ced)]  // qemu-nbd -e 1: no CAN_MULTI_CONN
    [InlineData(false, true, true, 0x058f)]  // read-only: READ_ONLY, no TRIM, WRITE_ZEROES, FAST_ZERO
    public void TransmissionFlags_AreQemuNbds(bool writable, bool multi, bool structured, int expected)
        => Assert.Equal((NbdTransmissionFlags)expected, Policy(writable, multi).TransmissionFlags(structured));

    [Theory]
    [InlineData("disk", true)]
    [InlineData("", true)]
    [InlineData("Disk", false)]
    [InlineData("disk ", false)]
    public void ExportNames_MatchExactly_OrTheDefault(string requested, bool matches) => Assert.Equal(matches, Policy().Matches(requested));

    [Theory]
    [InlineData(true, new string[0], "0 base:allocation|2 qemu:dirty-bitmap:a|3 qemu:dirty-bitmap:b")]
    [InlineData(false, new string[0], "")]
    [InlineData(true, new[] { "base:" }, "0 base:allocation")]
    [InlineData(false, new[] { "base:" }, "")]
    [InlineData(true, new[] { "qemu:" }, "2 qemu:dirty-bitmap:a|3 qemu:dirty-bitmap:b")]
    [InlineData(false, new[] { "qemu:" }, "")]
    [InlineData(true, new[] { "qemu:dirty-bitmap:" }, "2 qemu:dirty-bitmap:a|3 qemu:dirty-bitmap:b")]
    [InlineData(false, new[] { "qemu:dirty-bitmap:" }, "")]
    [InlineData(false, new[] { "qemu:dirty-bitmap:b", "base:allocation", "qemu:dirty-bitmap:b" }, "0 base:allocation|3 qemu:dirty-bitmap:b")]
    [InlineData(false, new[] { "qemu:dirty-bitmap:c", "qemu:allocation-depth", "base:allocation:x", "BASE:allocation" }, "")]
    [InlineData(true, new[] { "foo:bar", "nocolon", "qemu:dirty-bitmap:A" }, "")]
    public void MetaContextQueries_FollowQemusTable(bool list, string[] queries, string expected)
    {
        IReadOnlyList<MetaContext> selected = Policy(bitmaps: ["a", "b"]).Resolve(queries, list);
        Assert.Equal(expected, string.Join('|', selected.Select(c => $"{c.Id} {c.Name}")));
    }

    [Fact]
    public void AQueryTooLongToRead_SelectsNothing() => Assert.Empty(Policy().Resolve([null], list: false));

    public static TheoryData<NbdRequest, bool, bool, NbdError, bool> Requests => new()
    {
        // request, structured replies, contexts selected, expected error, disconnect
        { new(NbdCommandFlags.None, NbdCommand.Read, 1, 0, 0), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.Read, 1, 1, 3), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.Read, 1, Size - 512, 1024), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, NbdCommand.Read, 1, ulong.MaxValue, 1), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, NbdCommand.Read, 1, 0, 64 << 20), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, NbdCommand.Read, 1, 0, 32 << 20), true, false, NbdError.None, false },
        { new(NbdCommandFlags.DontFragment, NbdCommand.Read, 1, 0, 512), true, false, NbdError.None, false },
        { new(NbdCommandFlags.DontFragment, NbdCommand.Read, 1, 0, 512), false, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.ReqOne, NbdCommand.Read, 1, 0, 512), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.Fua, NbdCommand.Read, 1, 0, 512), true, false, NbdError.None, false },
        { new(NbdCommandFlags.Fua, NbdCommand.Write, 1, 0, 512), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.Write, 1, Size - 512, 1024), true, false, NbdError.NoSpace, false },
        { new(NbdCommandFlags.None, NbdCommand.Write, 1, 0, 64 << 20), true, false, NbdError.Invalid, true },
        { new(NbdCommandFlags.NoHole, NbdCommand.Write, 1, 0, 512), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.NoHole | NbdCommandFlags.FastZero | NbdCommandFlags.Fua, NbdCommand.WriteZeroes, 1, 0, 512), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.WriteZeroes, 1, Size - 512, 1024), true, false, NbdError.NoSpace, false },
        { new(NbdCommandFlags.None, NbdCommand.WriteZeroes, 1, 0, uint.MaxValue), true, false, NbdError.NoSpace, false },
        { new(NbdCommandFlags.None, NbdCommand.Trim, 1, Size - 512, 1024), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.FastZero, NbdCommand.Trim, 1, 0, 512), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, NbdCommand.Flush, 1, 4096, 4096), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.Flush, 1, ulong.MaxValue, uint.MaxValue), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.Cache, 1, 0, 65536), true, false, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.BlockStatus, 1, 0, 65536), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, NbdCommand.BlockStatus, 1, 0, 65536), false, true, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, NbdCommand.BlockStatus, 1, 0, 0), true, true, NbdError.Invalid, false },
        { new(NbdCommandFlags.ReqOne, NbdCommand.BlockStatus, 1, 0, 1), true, true, NbdError.None, false },
        { new(NbdCommandFlags.None, NbdCommand.BlockStatus, 1, Size - 512, 1024), true, true, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, (NbdCommand)99, 1, 0, 512), true, false, NbdError.Invalid, false },
        { new(NbdCommandFlags.None, (NbdCommand)99, 1, 0, 64 << 20), true, false, NbdError.Invalid, false },
    };

    [Theory]
    [MemberData(nameof(Requests))]
    public void EveryRequestCheck_GivesItsError(NbdRequest request, bool structured, bool contexts, NbdError error, bool disconnect)
    {
        RequestVerdict verdict = Policy().Validate(request, structured, contexts);
        Assert.Equal((error, disconnect), (verdict.Error, verdict.Disconnect));
        Assert.Equal(error == NbdError.None, verdict.Message is null);
    }

    [Theory]
    [InlineData(NbdCommand.Write)]
    [InlineData(NbdCommand.WriteZeroes)]
    [InlineData(NbdCommand.Trim)]
    public void ChangesToAReadOnlyExport_EPerm(NbdCommand command)
    {
        RequestVerdict verdict = Policy(writable: false).Validate(new NbdRequest(NbdCommandFlags.None, command, 1, 0, 512), true, false);
        Assert.Equal(NbdError.Perm, verdict.Error);
        Assert.False(verdict.Disconnect);
    }

    [Fact]
    public void BitmapRules_BusyAndInconsistentRefused_EnabledRefusedOnlyReadOnlyFromAWritableNode()
    {
        using var f = new RawNodeFixture();
        DirtyBitmap enabled = f.Node.AddBitmap("enabled");
        DirtyBitmap disabled = f.Node.AddBitmap("disabled", disabled: true);
        ExportPolicy.CheckBitmap(enabled, exportWritable: true);
        ExportPolicy.CheckBitmap(disabled, exportWritable: false);
        BlockException e = Assert.Throws<BlockException>(() => ExportPolicy.CheckBitmap(enabled, exportWritable: false));
        Assert.Equal(ErrorIds.BitmapEnabledForReadOnlyExport, e.ErrorId);
        Assert.StartsWith("Enabled bitmap 'enabled' incompatible with readonly export", e.Message, StringComparison.Ordinal);

        disabled.Claim("NBD export 'x'");
        Assert.Equal(ErrorIds.BitmapBusy, Assert.Throws<BlockException>(() => ExportPolicy.CheckBitmap(disabled, true)).ErrorId);
        disabled.Release();
        disabled.Inconsistent = true;
        Assert.Equal(ErrorIds.BitmapInconsistent, Assert.Throws<BlockException>(() => ExportPolicy.CheckBitmap(disabled, true)).ErrorId);

        string path = Path.Combine(f.Folder, "ro.img");
        BlockEngine.CreateImage(path, 1 << 20);
        BlockNode readOnly = f.Engine.Open(path, "ro", readOnly: true);
        DirtyBitmap recording = readOnly.AddBitmap("r");
        ExportPolicy.CheckBitmap(recording, exportWritable: false); // a read-only node never changes it
    }

    [Theory]
    [InlineData(28, NbdError.NoSpace)]   // ENOSPC
    [InlineData(122, NbdError.NoSpace)]  // EDQUOT
    [InlineData(27, NbdError.NoSpace)]   // EFBIG
    [InlineData(5, NbdError.Io)]         // EIO
    [InlineData(30, NbdError.Io)]        // EROFS
    public void EngineErrors_MapToNbdErrors_ByTheirErrno(int errno, NbdError expected)
    {
        var e = new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, "I/O error on image 'x'", "x", new IOException("failed", errno));
        Assert.Equal(expected, ExportPolicy.ErrorFor(e));
    }

    [Fact]
    public void EngineErrors_ReadOnlyIsEPerm_AMessageNamingAFullDiskIsENoSpc()
    {
        Assert.Equal(NbdError.Perm, ExportPolicy.ErrorFor(new BlockException(ErrorIds.NodeReadOnly, BlockErrorCategory.PermissionDenied, "ro")));
        Assert.Equal(NbdError.NoSpace, ExportPolicy.ErrorFor(new BlockException(ErrorIds.ImageIOFailed, BlockErrorCategory.WriteError, "I/O error on image 'x' during write: No space left on device")));
        Assert.Equal(NbdError.Shutdown, ExportPolicy.ErrorFor(new BlockException(ErrorIds.NodeClosed, BlockErrorCategory.InvalidOperation, "closed")));
    }

    [Fact]
    public void NamesTheProtocolCannotCarry_AreRefused()
    {
        ExportPolicy.CheckNames(new string('n', 4096), new string('d', 4096));
        Assert.Equal(ErrorIds.ExportNameInvalid, Assert.Throws<BlockException>(() => ExportPolicy.CheckNames(new string('é', 2049), null)).ErrorId);
        Assert.Equal(ErrorIds.ExportDescriptionTooLong, Assert.Throws<BlockException>(() => ExportPolicy.CheckNames("n", new string('d', 4097))).ErrorId);
    }
}
