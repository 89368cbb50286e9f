using System.Management.Automation;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>Turns engine exceptions into ErrorRecords: the engine's stable id, the matching category, the target.</summary>
internal static class ErrorRecordFactory
{
    public static ErrorRecord From(BlockException e) => new(e, e.ErrorId, Map(e.Category), e.Target);

    public static ErrorRecord Create(string errorId, ErrorCategory category, string message, object? target)
        => new(new PSArgumentException(message), errorId, category, target);

    private static ErrorCategory Map(BlockErrorCategory category) => category switch
    {
        BlockErrorCategory.InvalidArgument => ErrorCategory.InvalidArgument,
        BlockErrorCategory.InvalidOperation => ErrorCategory.InvalidOperation,
        BlockErrorCategory.ObjectNotFound => ErrorCategory.ObjectNotFound,
        BlockErrorCategory.ResourceExists => ErrorCategory.ResourceExists,
        BlockErrorCategory.ResourceBusy => ErrorCategory.ResourceBusy,
        BlockErrorCategory.PermissionDenied => ErrorCategory.PermissionDenied,
        BlockErrorCategory.NotImplemented => ErrorCategory.NotImplemented,
        BlockErrorCategory.ReadError => ErrorCategory.ReadError,
        BlockErrorCategory.WriteError => ErrorCategory.WriteError,
        BlockErrorCategory.InvalidData => ErrorCategory.InvalidData,
        BlockErrorCategory.OperationTimeout => ErrorCategory.OperationTimeout,
        BlockErrorCategory.LimitsExceeded => ErrorCategory.LimitsExceeded,
        _ => ErrorCategory.NotSpecified,
    };
}
