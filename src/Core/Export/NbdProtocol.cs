namespace BitmapBackup.Core.Export;

/*
 * The numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md, "Values"), as the server side uses them.
 * Everything on the wire is big-endian. Only what this server speaks or must recognise is named here: fixed newstyle
 * negotiation with NO_ZEROES, structured replies, metadata contexts; no TLS, no extended headers.
 */

/// <summary>Magic numbers and fixed sizes of NBD messages.</summary>
public static class NbdMagic
{
    /// <summary>"NBDMAGIC": first 8 bytes of the greeting.</summary>
    public const ulong Greeting = 0x4e42444d41474943;

    /// <summary>"IHAVEOPT": second word of the greeting and the magic of every option the client sends.</summary>
    public const ulong Option = 0x49484156454F5054;

    /// <summary>Magic of every option reply.</summary>
    public const ulong OptionReply = 0x0003e889045565a9;

    public const uint Request = 0x25609513;

    public const uint SimpleReply = 0x67446698;

    public const uint StructuredReply = 0x668e33ef;

    /// <summary>Greeting: magic, IHAVEOPT, u16 handshake flags.</summary>
    public const int GreetingLength = 18;

    /// <summary>Option header: magic, u32 option, u32 data length.</summary>
    public const int OptionHeaderLength = 16;

    /// <summary>Option reply header: magic, u32 option, u32 reply type, u32 data length.</summary>
    public const int OptionReplyHeaderLength = 20;

    /// <summary>Request: magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length.</summary>
    public const int RequestLength = 28;

    /// <summary>Simple reply: magic, u32 error, u64 cookie.</summary>
    public const int SimpleReplyLength = 16;

    /// <summary>Structured reply chunk header: magic, u16 flags, u16 type, u64 cookie, u32 payload length.</summary>
    public const int ChunkHeaderLength = 20;

    /// <summary>Longest name, description or query string the protocol allows (NBD_MAX_STRING_SIZE).</summary>
    public const int MaxStringLength = 4096;
}

/// <summary>Handshake flags (server) and client flags.</summary>
[Flags]
public enum NbdHandshakeFlags : ushort
{
    None = 0,
    FixedNewstyle = 1,
    NoZeroes = 2,
}

/// <summary>Option types.</summary>
public enum NbdOption : uint
{
    ExportName = 1,
    Abort = 2,
    List = 3,
    StartTls = 5,
    Info = 6,
    Go = 7,
    StructuredReply = 8,
    ListMetaContext = 9,
    SetMetaContext = 10,
    ExtendedHeaders = 11,
}

/// <summary>Option reply types; errors have bit 31 set.</summary>
public enum NbdOptionReply : uint
{
    Ack = 1,
    Server = 2,
    Info = 3,
    MetaContext = 4,
    ErrUnsupported = 0x80000001,
    ErrPolicy = 0x80000002,
    ErrInvalid = 0x80000003,
    ErrPlatform = 0x80000004,
    ErrTlsRequired = 0x80000005,
    ErrUnknown = 0x80000006,
    ErrShutdown = 0x80000007,
    ErrBlockSizeRequired = 0x80000008,
    ErrTooBig = 0x80000009,
}

/// <summary>Information types of NBD_OPT_INFO / NBD_OPT_GO.</summary>
public enum NbdInfoType : ushort
{
    Export = 0,
    Name = 1,
    Description = 2,
    BlockSize = 3,
}

/// <summary>Transmission flags, sent with the export's size.</summary>
[Flags]
public enum NbdTransmissionFlags : ushort
{
    None = 0,
    HasFlags = 1 << 0,
    ReadOnly = 1 << 1,
    SendFlush = 1 << 2,
    SendFua = 1 << 3,
    Rotational = 1 << 4,
    SendTrim = 1 << 5,
    SendWriteZeroes = 1 << 6,
    SendDf = 1 << 7,
    CanMultiConn = 1 << 8,
    SendResize = 1 << 9,
    SendCache = 1 << 10,
    SendFastZero = 1 << 11,
}

/// <summary>Request (command) types.</summary>
public enum NbdCommand : ushort
{
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
}

/// <summary>Command flags.</summary>
[Flags]
public enum NbdCommandFlags : ushort
{
    None = 0,
    Fua = 1 << 0,
    NoHole = 1 << 1,
    DontFragment = 1 << 2,
    ReqOne = 1 << 3,
    FastZero = 1 << 4,
}

/// <summary>Error values of replies (the protocol's own numbers, not the host's errno).</summary>
public enum NbdError : uint
{
    None = 0,
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Invalid = 22,
    NoSpace = 28,
    Overflow = 75,
    NotSupported = 95,
    Shutdown = 108,
}

/// <summary>Structured reply chunk types.</summary>
public enum NbdChunkType : ushort
{
    None = 0,
    OffsetData = 1,
    OffsetHole = 2,
    BlockStatus = 5,
    Error = 0x8001,
    ErrorOffset = 0x8002,
}

/// <summary>Status bits of a block-status extent: base:allocation uses Hole and Zero, qemu:dirty-bitmap:NAME uses Dirty.</summary>
public static class NbdState
{
    /// <summary>base:allocation: the range is not allocated (NBD_STATE_HOLE).</summary>
    public const uint Hole = 1;

    /// <summary>base:allocation: the range reads as zeros (NBD_STATE_ZERO).</summary>
    public const uint Zero = 2;

    /// <summary>qemu:dirty-bitmap:NAME: the range is dirty (NBD_STATE_DIRTY).</summary>
    public const uint Dirty = 1;
}
