namespace BitmapBackup.Core.Nodes;

/// <summary>
/// Something that serves a node to the outside while it lives (an NBD export): the node cannot be closed or resized
/// under it, as QEMU's blockdev-del refuses a node a block export still uses. Registered with
/// <see cref="BlockNode.AddUser"/>, released with <see cref="BlockNode.RemoveUser"/>.
/// </summary>
public interface INodeUser
{
    /// <summary>What the user is, for the refusal's message: "NBD export 'disk'".</summary>
    string Description { get; }

    /// <summary>How to end it, for the refusal's message: "stop it first with Stop-BlockExport -Name 'disk'".</summary>
    string ReleaseHint { get; }
}
