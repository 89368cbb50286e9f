using System.Net.Sockets;

namespace BitmapBackup.Core.Export;

/// <summary>
/// Exact-length reads from a stream socket. A client may split one message over many sends or pack many messages
/// into one, so messages are read by length, never "one receive = one message". Small reads (headers) come from a
/// buffer that one receive fills with whatever has arrived, so pipelined requests cost one system call for many;
/// a large read (a WRITE payload) is received straight into its destination. Not thread-safe: one reader loop.
/// </summary>
internal sealed class SocketReader(Socket socket, int bufferSize = 64 << 10)
{
    private readonly byte[] _buffer = new byte[bufferSize];
    private int _start;
    private int _end;

    /// <summary>
    /// Fill <paramref name="destination"/>. Returns false when the peer closed the connection first (before or in
    /// the middle of the message). Throws OperationCanceledException when <paramref name="cancellation"/> fires and
    /// SocketException when the connection fails.
    /// </summary>
    public async ValueTask<bool> ReadExactlyAsync(Memory<byte> destination, CancellationToken cancellation)
    {
        int done = TakeBuffered(destination.Span);
        while (done < destination.Length)
        {
            int remaining = destination.Length - done;
            if (remaining >= _buffer.Length / 2)
            {
                int n = await socket.ReceiveAsync(destination[done..], SocketFlags.None, cancellation).ConfigureAwait(false);
                if (n == 0)
                    return false;
                done += n;
            }
            else
            {
                int n = await socket.ReceiveAsync(_buffer.AsMemory(), SocketFlags.None, cancellation).ConfigureAwait(false);
                if (n == 0)
                    return false;
                _start = 0;
                _end = n;
                done += TakeBuffered(destination.Span[done..]);
            }
        }
        return true;
    }

    /// <summary>Read and drop <paramref name="count"/> bytes (the payload of a refused WRITE) through the buffer, allocating nothing.</summary>
    public async ValueTask<bool> SkipAsync(long count, CancellationToken cancellation)
    {
        while (count > 0)
        {
            int buffered = _end - _start;
            if (buffered == 0)
            {
                int n = await socket.ReceiveAsync(_buffer.AsMemory(), SocketFlags.None, cancellation).ConfigureAwait(false);
                if (n == 0)
                    return false;
                _start = 0;
                _end = n;
                buffered = n;
            }
            int take = (int)Math.Min(buffered, count);
            _start += take;
            count -= take;
        }
        return true;
    }

    private int TakeBuffered(Span<byte> destination)
    {
        int n = Math.Min(_end - _start, destination.Length);
        if (n > 0)
        {
            _buffer.AsSpan(_start, n).CopyTo(destination);
            _start += n;
        }
        return n;
    }
}
