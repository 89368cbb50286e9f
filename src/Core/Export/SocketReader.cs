using System.Net.Sockets;

namespace BitmapBackup.Core.Export;

/// <summary>
/// Exact-length blocking reads from a stream socket, for a connection's reader thread. A client may split one
/// message over many sends or pack many messages into one, so messages are read by length, never "one receive = one
/// message". Small reads (headers) come from a buffer that one receive fills with whatever has arrived, so pipelined
/// requests cost one system call for many; a large read (a WRITE payload) is received straight into its destination.
/// Not thread-safe: one reader thread.
/// </summary>
internal sealed class SocketReader(Socket socket, int bufferSize = 64 << 10)
{
    private readonly byte[] _buffer = new byte[bufferSize];
    private int _start;
    private int _end;

    /// <summary>
    /// Fill <paramref name="destination"/>. Returns false when the peer closed the connection (or its receiving side
    /// was shut down) first, before or in the middle of the message. Throws SocketException when the connection fails
    /// or the socket's receive timeout passes.
    /// </summary>
    public bool ReadExactly(Span<byte> destination)
    {
        int done = TakeBuffered(destination);
        while (done < destination.Length)
        {
            int remaining = destination.Length - done;
            if (remaining >= _buffer.Length / 2)
            {
                int n = socket.Receive(destination[done..], SocketFlags.None);
                if (n == 0)
                    return false;
                done += n;
            }
            else
            {
                if (!Fill())
                    return false;
                done += TakeBuffered(destination[done..]);
            }
        }
        return true;
    }

    /// <summary>Read and drop <paramref name="count"/> bytes (the payload of a refused WRITE) through the buffer, allocating nothing.</summary>
    public bool Skip(long count)
    {
        while (count > 0)
        {
            if (_end == _start && !Fill())
                return false;
            int take = (int)Math.Min(_end - _start, count);
            _start += take;
            count -= take;
        }
        return true;
    }

    private bool Fill()
    {
        int n = socket.Receive(_buffer, SocketFlags.None);
        _start = 0;
        _end = n;
        return n > 0;
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
