namespace BitmapBackup.Core.Errors;

/// <summary>
/// What kind of failure a <see cref="BlockException"/> is. The names match members of PowerShell's
/// ErrorCategory so that the cmdlet layer can map them one to one without Core referencing PowerShell.
/// </summary>
public enum BlockErrorCategory
{
    InvalidArgument,
    InvalidOperation,
    ObjectNotFound,
    ResourceExists,
    ResourceBusy,
    PermissionDenied,
    NotImplemented,
    ReadError,
    WriteError,
    InvalidData,
    OperationTimeout,
    LimitsExceeded,
}
