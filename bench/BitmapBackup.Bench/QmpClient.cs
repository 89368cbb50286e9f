using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace BitmapBackup.Bench;

/// <summary>A QMP error reply.</summary>
internal sealed class QmpException(string errorClass, string description)
    : Exception($"{errorClass}: {description}")
{
    public string ErrorClass { get; } = errorClass;
}

/// <summary>
/// A minimal QMP client over a unix socket: JSON messages one per line, the greeting, qmp_capabilities, then
/// commands (their replies matched in order) with events queued for <see cref="WaitEvent"/>. Keeps its own line
/// buffer, so a read that times out loses nothing.
/// </summary>
internal sealed class QmpClient : IDisposable
{
    private readonly Socket _socket;
    private readonly List<byte> _pending = [];
    private readonly byte[] _chunk = new byte[1 << 16];
    private readonly LinkedList<JsonObject> _events = new();

    private QmpClient(Socket socket) => _socket = socket;

    public JsonObject? Greeting { get; private set; }

    /// <summary>Connect (retrying until the socket accepts or <paramref name="timeout"/> passes) and negotiate capabilities.</summary>
    public static QmpClient Connect(string socketPath, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                socket.Connect(new UnixDomainSocketEndPoint(socketPath));
                var client = new QmpClient(socket);
                client.Greeting = client.ReadMessage(timeout);
                client.Execute("qmp_capabilities");
                return client;
            }
            catch (SocketException) when (clock.Elapsed < timeout)
            {
                socket.Dispose();
                Thread.Sleep(5);
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        }
    }

    /// <summary>Run a command and return its "return" value; an error reply throws <see cref="QmpException"/>.</summary>
    public JsonNode? Execute(string command, JsonObject? arguments = null, TimeSpan? timeout = null)
    {
        var message = new JsonObject { ["execute"] = command };
        if (arguments is not null)
            message["arguments"] = arguments;
        Send(message);
        while (true)
        {
            JsonObject reply = ReadMessage(timeout ?? TimeSpan.FromMinutes(5));
            if (reply.ContainsKey("event"))
            {
                _events.AddLast(reply);
                continue;
            }
            if (reply["error"] is JsonObject error)
                throw new QmpException((string?)error["class"] ?? "?", (string?)error["desc"] ?? "?");
            return reply["return"];
        }
    }

    /// <summary>The first event named <paramref name="name"/> whose data matches (queued ones first); removed from the queue.</summary>
    public JsonObject WaitEvent(string name, Func<JsonObject, bool>? match = null, TimeSpan? timeout = null)
    {
        for (LinkedListNode<JsonObject>? node = _events.First; node is not null; node = node.Next)
        {
            if (Matches(node.Value, name, match))
            {
                _events.Remove(node);
                return node.Value;
            }
        }
        TimeSpan limit = timeout ?? TimeSpan.FromMinutes(5);
        var clock = Stopwatch.StartNew();
        while (true)
        {
            TimeSpan left = limit - clock.Elapsed;
            if (left <= TimeSpan.Zero)
                throw new TimeoutException($"No QMP event {name} within {limit.TotalSeconds} s.");
            JsonObject message = ReadMessage(left);
            if (!message.ContainsKey("event"))
                continue; // a late reply: nothing waits for it
            if (Matches(message, name, match))
                return message;
            _events.AddLast(message);
        }
    }

    /// <summary>Forget queued events (between steps).</summary>
    public void ClearEvents() => _events.Clear();

    private static bool Matches(JsonObject message, string name, Func<JsonObject, bool>? match)
        => (string?)message["event"] == name && (match is null || (message["data"] is JsonObject data && match(data)));

    private void Send(JsonObject message)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(message.ToJsonString() + "\n");
        int sent = 0;
        while (sent < bytes.Length)
            sent += _socket.Send(bytes, sent, bytes.Length - sent, SocketFlags.None);
    }

    private JsonObject ReadMessage(TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            int newline = _pending.IndexOf((byte)'\n');
            if (newline >= 0)
            {
                string line = Encoding.UTF8.GetString(_pending.GetRange(0, newline).ToArray());
                _pending.RemoveRange(0, newline + 1);
                if (line.Trim().Length == 0)
                    continue;
                return JsonNode.Parse(line) as JsonObject ?? throw new InvalidDataException($"QMP sent a non-object: {line}");
            }
            TimeSpan left = timeout - clock.Elapsed;
            if (left <= TimeSpan.Zero)
                throw new TimeoutException($"No QMP message within {timeout.TotalSeconds} s.");
            if (!_socket.Poll((int)Math.Min(int.MaxValue, left.TotalMilliseconds * 1000), SelectMode.SelectRead))
                continue;
            int n = _socket.Receive(_chunk);
            if (n == 0)
                throw new EndOfStreamException("QMP connection closed.");
            _pending.AddRange(new ArraySegment<byte>(_chunk, 0, n));
        }
    }

    public void Dispose() => _socket.Dispose();
}
