using System.Net.Sockets;
using BitmapBackup.Core.Bitmaps;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Export;
using BitmapBackup.Core.Nodes;
using BitmapBackup.Core.Testing;
using BitmapBackup.Core.Tests.TestSupport;

namespace BitmapBackup.Core.Tests.Export;

/// <summary>
/// An export's lifetime and semantics against a real unix socket: what it claims and releases, what it refuses to
/// start with, that every client write is a node write (bitmaps, failures), and that stopping, disconnecting and slow
/// clients lose nothing acknowledged and stall nobody else.
/// </summary>
public sealed class BlockExportTests
{
    private const int MiB = 1 << 20;

    private static string ErrorId(Action action) => Assert.Throws<BlockException>(action).ErrorId;

    private static byte[] Pattern(int length, byte seed)
    {
        byte[] data = new byte[length];
        for (int i = 0; i < length; i++)
            data[i] = (byte)(seed + (i * 7));
        return data;
    }

    [Fact]
    public void ExportedBitmapIsBusy_NodeCannotBeClosedOrResized_UntilTheExportStops()
    {
        using var f = new ExportFixture(bitmaps: ["bm0"]);
        DirtyBitmap bm0 = f.Node.GetBitmap("bm0");
        Assert.True(bm0.Busy);
        Assert.Equal("NBD export 'disk'", bm0.BusyWith);
        Assert.True(bm0.Recording); // busy for an export, it still records the export's writes
        BlockException clear = Assert.Throws<BlockException>(() => bm0.Clear());
        Assert.Equal(ErrorIds.BitmapBusy, clear.ErrorId);
        Assert.Contains("(NBD export 'disk')", clear.Message, StringComparison.Ordinal);
        Assert.Equal(ErrorIds.BitmapBusy, ErrorId(() => bm0.CreateSuccessor()));
        Assert.Equal(ErrorIds.BitmapBusy, ErrorId(() => f.Node.RemoveBitmap(bm0)));
        BlockException close = Assert.Throws<BlockException>(() => f.Engine.Close(f.Node));
        Assert.Equal(ErrorIds.NodeBusy, close.ErrorId);
        Assert.Contains("NBD export 'disk'", close.Message, StringComparison.Ordinal);
        Assert.Contains("Stop-BlockExport -Name 'disk'", close.Message, StringComparison.Ordinal);
        Assert.Equal(ErrorIds.NodeBusy, ErrorId(() => f.Node.Resize(16 * MiB)));
        Assert.True(File.Exists(f.SocketPath));

        f.Registry.Stop(f.Export);
        Assert.False(bm0.Busy);
        Assert.Null(bm0.BusyWith);
        Assert.False(File.Exists(f.SocketPath));
        Assert.Empty(f.Node.Users);
        Assert.Null(f.Registry.Find("disk"));
        bm0.Clear();
        f.Node.Resize(16 * MiB);
        f.Engine.Close(f.Node);
    }

    [Fact]
    public void RefusedStarts_NameTheCause_AndLeaveNothingClaimed()
    {
        using var dir = new TempDirectory();
        var engine = new BlockEngine();
        var registry = new ExportRegistry();
        string path = dir.File("a.img");
        BlockEngine.CreateImage(path, 4 * MiB);
        BlockNode node = engine.Open(path, "a");
        DirtyBitmap enabled = node.AddBitmap("enabled");
        DirtyBitmap disabled = node.AddBitmap("disabled", disabled: true);
        DirtyBitmap broken = node.AddBitmap("broken", disabled: true);
        broken.Inconsistent = true;
        string socket = dir.File("s");
        ExportOptions Options(params string[] bitmaps) => new() { Name = "x", SocketPath = socket, Bitmaps = bitmaps };
        try
        {
            Assert.Equal(ErrorIds.BitmapNotFound, ErrorId(() => registry.Start(node, Options("nosuch"))));
            Assert.Equal(ErrorIds.BitmapInconsistent, ErrorId(() => registry.Start(node, Options("disabled", "broken"))));
            BlockException ro = Assert.Throws<BlockException>(() => registry.Start(node, Options("disabled", "enabled")));
            Assert.Equal(ErrorIds.BitmapEnabledForReadOnlyExport, ro.ErrorId);
            Assert.StartsWith("Enabled bitmap 'enabled' incompatible with readonly export", ro.Message, StringComparison.Ordinal);
            Assert.False(disabled.Busy); // claimed before the refusal, given back
            Assert.Equal(ErrorIds.ExportNameInvalid, ErrorId(() => registry.Start(node, Options() with { Name = new string('n', 4097) })));
            Assert.Equal(ErrorIds.ExportDescriptionTooLong, ErrorId(() => registry.Start(node, Options() with { Description = new string('d', 4097) })));

            File.WriteAllText(socket, "not a socket");
            Assert.Equal(ErrorIds.ExportAddressInUse, ErrorId(() => registry.Start(node, Options("enabled") with { Writable = true })));
            Assert.Equal("not a socket", File.ReadAllText(socket)); // never deleted
            Assert.False(enabled.Busy);
            File.Delete(socket);

            BlockExport first = registry.Start(node, Options("enabled") with { Writable = true });
            Assert.Equal(ErrorIds.ExportNameInUse, ErrorId(() => registry.Start(node, Options() with { SocketPath = dir.File("t") })));
            Assert.Equal(ErrorIds.ExportAddressInUse, ErrorId(() => registry.Start(node, Options() with { Name = "y" })));
            Assert.Equal(ErrorIds.BitmapBusy, ErrorId(() => registry.Start(node, Options("enabled") with { Name = "y", SocketPath = dir.File("t"), Writable = true })));
            BlockExport second = registry.Start(node, Options("disabled") with { Name = "y", SocketPath = dir.File("t") }); // two exports of one node
            Assert.Equal(2, node.Users.Count);
            registry.StopAll();
            Assert.Empty(node.Users);
            Assert.False(enabled.Busy || disabled.Busy);
            Assert.Null(first.UnexpectedError ?? second.UnexpectedError);
        }
        finally
        {
            registry.StopAll();
            engine.CloseAll();
        }
    }

    [Fact]
    public void StaleSocketIsTakenOver_LiveOneIsNot()
    {
        using var dir = new TempDirectory();
        string socket = dir.File("s");
        using (var stale = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            // bound, never listening: what a dead server leaves (renamed, or .NET would delete it on dispose)
            stale.Bind(new UnixDomainSocketEndPoint(dir.File("bound")));
            File.Move(dir.File("bound"), socket);
        }
        Assert.True(File.Exists(socket));
        var engine = new BlockEngine();
        var registry = new ExportRegistry();
        BlockEngine.CreateImage(dir.File("a.img"), MiB);
        BlockNode node = engine.Open(dir.File("a.img"), "a");
        try
        {
            registry.Start(node, new ExportOptions { SocketPath = socket });
            using var client = new NbdTestClient(socket);
            Assert.True(client.Negotiate("a").StillServes()); // the default name is the node's
            using var live = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            string other = dir.File("live");
            live.Bind(new UnixDomainSocketEndPoint(other));
            live.Listen();
            Assert.Equal(ErrorIds.ExportAddressInUse, ErrorId(() => registry.Start(node, new ExportOptions { Name = "b", SocketPath = other })));
        }
        finally
        {
            registry.StopAll();
            engine.CloseAll();
        }
    }

    [Fact]
    public void ReadOnlyNode_GivesAReadOnlyExport_AndRefusesWritable()
    {
        using var f = new ExportFixture(writable: false, readOnlyNode: true);
        using NbdTestClient c = f.Connect();
        Assert.True(c.TransmissionFlags.HasFlag(NbdTransmissionFlags.ReadOnly));
        Assert.False(c.TransmissionFlags.HasFlag(NbdTransmissionFlags.SendTrim));
        ReplyChunk write = Assert.Single(c.Request(NbdCommand.Write, 0, 4, payload: [1, 2, 3, 4]));
        Assert.Equal((uint)NbdError.Perm, write.Error);
        Assert.Equal((uint)NbdError.Perm, Assert.Single(c.Request(NbdCommand.WriteZeroes, 0, 4096)).Error);
        Assert.Equal((uint)NbdError.Perm, Assert.Single(c.Request(NbdCommand.Trim, 0, 4096)).Error);
        Assert.True(c.StillServes());
        Assert.Equal(ErrorIds.NodeReadOnly, ErrorId(() => f.Registry.Start(f.Node, new ExportOptions { Name = "w", Writable = true, SocketPath = Path.Combine(f.Folder, "w") })));
    }

    [Fact]
    public void ClientWritesAreNodeWrites_TrackedByEveryRecordingBitmap()
    {
        using var f = new ExportFixture(bitmaps: ["bm0"]);
        DirtyBitmap other = f.Node.AddBitmap("other", granularity: 4096);
        using NbdTestClient c = f.Connect();
        byte[] data = Pattern(10000, 3);
        Assert.Equal(0u, Assert.Single(c.Request(NbdCommand.Write, MiB + 100, (uint)data.Length, NbdCommandFlags.Fua, data)).Error);
        byte[] back = new byte[data.Length];
        f.Node.Read(MiB + 100, back);
        Assert.Equal(data, back);
        Assert.Equal([(MiB, 65536L)], f.Node.GetBitmap("bm0").GetDirtyRanges());
        Assert.Equal([(MiB, 3 * 4096L)], other.GetDirtyRanges());

        Assert.Equal(0u, Assert.Single(c.Request(NbdCommand.WriteZeroes, MiB, 4096, NbdCommandFlags.NoHole)).Error);
        Assert.Equal(0u, Assert.Single(c.Request(NbdCommand.Trim, 2 * MiB, 8192)).Error);
        Assert.Equal([(MiB, 65536L), (2 * MiB, 65536L)], f.Node.GetBitmap("bm0").GetDirtyRanges());
        f.Node.Read(MiB, back);
        Assert.All(back.AsSpan(0, 4096 - 100).ToArray(), b => Assert.Equal(0, b));
        Assert.Equal(data[4096 - 100], back[4096]);

        Assert.Equal(10000L, f.Export.Statistics.BytesWritten);
        Assert.True(f.Export.Statistics.Requests >= 3);
    }

    [Theory]
    [InlineData("No space left on device", NbdError.NoSpace)]
    [InlineData("Input/output error (injected)", NbdError.Io)]
    public void FailedWrite_IsAnsweredWithItsError_MarkedDirty_AndTheConnectionGoesOn(string fault, NbdError expected)
    {
        using var f = new ExportFixture(bitmaps: ["bm0"]);
        using NbdTestClient c = f.Connect();
        FaultRule rule = FaultInjection.Add(f.Node.Path, FaultOperation.FileWrite, offset: 3 * MiB, length: 1, times: 1, message: fault);
        try
        {
            ReplyChunk r = Assert.Single(c.Request(NbdCommand.Write, 3 * MiB, 65536, payload: Pattern(65536, 1)));
            Assert.Equal((uint)expected, r.Error);
            Assert.Contains(fault, r.Message, StringComparison.Ordinal);
            Assert.Equal(1, rule.Hits);
        }
        finally
        {
            FaultInjection.Remove(rule);
        }
        Assert.Equal([(3L * MiB, 65536L)], f.Node.GetBitmap("bm0").GetDirtyRanges()); // a failed write may have changed its range
        Assert.Equal(0u, Assert.Single(c.Request(NbdCommand.Write, 3 * MiB, 65536, payload: Pattern(65536, 1))).Error);
        Assert.True(c.StillServes());
    }

    [Fact]
    public void PipelinedWritesThenDisconnect_AllLand()
    {
        using var f = new ExportFixture(bitmaps: ["bm0"]);
        using (NbdTestClient c = f.Connect())
        {
            for (int i = 0; i < 8; i++)
                c.SendRequest(NbdCommand.Write, (ulong)i * MiB, MiB, cookie: (ulong)i, payload: Pattern(MiB, (byte)i));
            c.SendRequest(NbdCommand.Disconnect); // without waiting for any reply
            Assert.Equal(8, c.ReadRepliesUntilClosed()); // every request in flight was answered before the close
        }
        Wait.Until(() => f.Export.Statistics.Clients == 0, "the connection ended");
        byte[] back = new byte[MiB];
        for (int i = 0; i < 8; i++)
        {
            f.Node.Read((long)i * MiB, back);
            Assert.Equal(Pattern(MiB, (byte)i), back);
        }
        Assert.Equal([(0L, 8L * MiB)], f.Node.GetBitmap("bm0").GetDirtyRanges());
    }

    [Fact]
    public void Stop_LetsTheRequestInFlightFinishAndReply_ThenDisconnects()
    {
        using var f = new ExportFixture();
        using NbdTestClient c = f.Connect();
        Task<int> stop;
        using (f.Node.Quiesce()) // the write below waits at the node's write gate
        {
            c.SendRequest(NbdCommand.Write, 0, 4096, cookie: 42, payload: Pattern(4096, 9));
            Wait.Until(() => f.Export.Statistics.Requests == 1, "the write is in flight");
            stop = Task.Run(() => f.Registry.Stop(f.Export));
            Wait.Until(() => !File.Exists(f.SocketPath), "the export stopped listening");
            Assert.Throws<SocketException>(() => new NbdTestClient(f.SocketPath).Dispose()); // no new client
        }
        ReplyChunk reply = Assert.Single(c.ReadReply()); // drained: the write was answered...
        Assert.Equal((42UL, 0u), (reply.Cookie, reply.Error));
        Assert.True(c.ServerClosed()); // ...then the connection closed
        Assert.True(stop.Result == 1, $"stop counted {stop.Result}; connections {f.Export.Statistics.Connections}, clients {f.Export.Statistics.Clients}, requests {f.Export.Statistics.Requests}");
        byte[] back = new byte[4096];
        f.Node.Read(0, back);
        Assert.Equal(Pattern(4096, 9), back);
    }

    [Fact]
    public void ClientThatStopsReadingReplies_StallsNobodyElse_AndStopStillEnds()
    {
        using var f = new ExportFixture(16 * MiB);
        f.Node.Write(0, Pattern(MiB, 1)); // data, so the replies are not holes
        using NbdTestClient hog = f.Connect();
        for (ulong i = 0; i < 64; i++)
            hog.SendRequest(NbdCommand.Read, 0, MiB, cookie: i); // 64 MiB of replies it never reads
        Wait.Until(() => f.Export.Statistics.Requests >= 8, "the hog's requests are in flight");
        using (NbdTestClient other = f.Connect())
        {
            List<ReplyChunk> read = other.Request(NbdCommand.Read, 0, 4096);
            Assert.Equal(Pattern(MiB, 1).AsSpan(0, 4096).ToArray(), NbdTestClient.DataOf(read, 0, 4096));
            Assert.True(other.StillServes());
        }
        Wait.Until(() => f.Export.Statistics.Clients == 1, "the other client's connection ended");
        Assert.Equal(1, f.Registry.Stop(f.Export, TimeSpan.FromMilliseconds(200))); // the hog, closed after the drain timeout
        Assert.Equal(0, f.Export.Statistics.Clients);
    }

    [Fact]
    public void WithOneConnectionAllowed_NoMultiConn_AndTheNextClientWaitsForTheFirst()
    {
        using var f = new ExportFixture(configure: o => o with { MaxConnections = 1 });
        var first = new NbdTestClient(f.SocketPath);
        first.Negotiate("disk");
        Assert.False(first.TransmissionFlags.HasFlag(NbdTransmissionFlags.CanMultiConn));
        Task<NbdTestClient> second = Task.Run(() => new NbdTestClient(f.SocketPath)); // connects; the greeting waits
        Thread.Sleep(200);
        Assert.Equal(1, f.Export.Statistics.Connections);
        Assert.False(second.IsCompleted);
        first.Dispose();
        using NbdTestClient next = second.Result;
        Assert.True(next.Negotiate("disk").StillServes());
        Assert.Equal(2, f.Export.Statistics.Connections);
    }

    [Fact]
    public void MultiConnIsAdvertisedWhenConnectionsShareTheNode_AndFlushOnOneCoversWritesOfAnother()
    {
        using var f = new ExportFixture(bitmaps: ["bm0"]);
        using NbdTestClient a = f.Connect();
        using NbdTestClient b = f.Connect();
        Assert.True(a.TransmissionFlags.HasFlag(NbdTransmissionFlags.CanMultiConn));
        Assert.Equal(0u, Assert.Single(a.Request(NbdCommand.Write, 0, 4096, payload: Pattern(4096, 5))).Error);
        Assert.True(f.Node.HasUnsyncedWrites);
        Assert.Equal(0u, Assert.Single(b.Request(NbdCommand.Flush)).Error);
        Assert.False(f.Node.HasUnsyncedWrites); // one node: b's FLUSH synced a's write
    }

    [Fact]
    public void TwoClientsWritingConcurrently_EveryWriteLandsAndIsTracked()
    {
        using var f = new ExportFixture(16 * MiB, bitmaps: ["bm0"]);
        var random = new Random(20261207);
        long[][] offsets = [.. Enumerable.Range(0, 2).Select(k => Enumerable.Range(0, 200).Select(_ => (k * 8L * MiB) + (random.Next(0, (8 * MiB) / 4096) * 4096L)).Distinct().ToArray())];
        Parallel.For(0, 2, k =>
        {
            using NbdTestClient c = f.Connect();
            foreach (long offset in offsets[k])
                c.SendRequest(NbdCommand.Write, (ulong)offset, 4096, cookie: (ulong)offset, payload: Pattern(4096, (byte)(offset >> 12)));
            for (int i = 0; i < offsets[k].Length; i++)
                Assert.Equal(0u, Assert.Single(c.ReadReply()).Error);
        });
        byte[] back = new byte[4096];
        var expected = new HierarchicalBitmap(16 * MiB / 65536);
        foreach (long offset in offsets.SelectMany(o => o))
        {
            f.Node.Read(offset, back);
            Assert.Equal(Pattern(4096, (byte)(offset >> 12)), back);
            expected.Set(offset / 65536, 1);
        }
        Assert.Equal(expected.Runs().Select(r => (r.Start * 65536, r.Count * 65536)), f.Node.GetBitmap("bm0").GetDirtyRanges());
    }

    [Fact]
    public void BaseAllocation_DescribesTheWholeBackingChain()
    {
        QemuImg.Require();
        using var dir = new TempDirectory();
        string basePath = dir.File("base.qcow2");
        string top = dir.File("top.qcow2");
        BlockEngine.CreateImage(basePath, 4 * MiB, ImageFormat.Qcow2);
        QemuImg.IoOk(basePath, "write -P 1 1M 64k", "write -P 1 3M 64k");
        BlockEngine.CreateImage(top, 0, ImageFormat.Qcow2, backingFile: "base.qcow2");
        QemuImg.IoOk(top, "write -P 2 2M 64k", "write -z 1M 64k");
        var engine = new BlockEngine();
        var registry = new ExportRegistry();
        BlockNode node = engine.Open(top, "top");
        try
        {
            string socket = dir.File("s");
            registry.Start(node, new ExportOptions { SocketPath = socket });
            using NbdTestClient c = new NbdTestClient(socket).Negotiate("top", true, "base:allocation");
            (uint, uint)[] extents = Assert.Single(c.Request(NbdCommand.BlockStatus, 0, 4 * MiB)).Extents;
            // [1M, +64K) is zeroed over the base's data, [2M, +64K) is the top's data, [3M, +64K) shows the base's
            Assert.Equal([(2u * MiB, 3u), (65536u, 0u), (MiB - 65536u, 3u), (65536u, 0u), (MiB - 65536u, 3u)], extents);
            var fromEngine = node.GetChainAllocation().Select(e => ((uint)e.Length, e.State == AllocationState.Data ? 0u : 3u)).Aggregate(new List<(uint, uint)>(), Merge);
            Assert.Equal(fromEngine, extents);
        }
        finally
        {
            registry.StopAll();
            engine.CloseAll();
        }

        static List<(uint, uint)> Merge(List<(uint Length, uint Flags)> list, (uint Length, uint Flags) e)
        {
            if (list.Count > 0 && list[^1].Flags == e.Flags)
                list[^1] = (list[^1].Length + e.Length, e.Flags);
            else
                list.Add(e);
            return list;
        }
    }
}
