namespace BitmapBackup.Core.Errors;

/// <summary>
/// The one exception type the engine throws for a failure a user can cause or fix. It carries a stable
/// <see cref="ErrorId"/> (one per cause, see <see cref="ErrorIds"/>), a category and the object it is about,
/// so the cmdlets turn it into an ErrorRecord without parsing messages.
/// </summary>
public sealed class BlockException : Exception
{
    public BlockException(string errorId, BlockErrorCategory category, string message, object? target = null, Exception? inner = null)
        : base(message, inner)
    {
        ErrorId = errorId;
        Category = category;
        Target = target;
    }

    /// <summary>Stable identifier of the cause, asserted by tests and scripts.</summary>
    public string ErrorId { get; }

    public BlockErrorCategory Category { get; }

    /// <summary>The node name, bitmap name or path the error is about.</summary>
    public object? Target { get; }
}
