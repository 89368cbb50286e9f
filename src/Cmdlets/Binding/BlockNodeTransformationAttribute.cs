using System.Management.Automation;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Lets a node parameter take a node name, a BlockNodeInfo, a DirtyBitmapInfo or a BlockExportInfo (their node)
/// or an engine BlockNode, and hands the cmdlet the node name.
/// </summary>
[AttributeUsage(AttributeTargets.Property | AttributeTargets.Field)]
internal sealed class BlockNodeTransformationAttribute : ArgumentTransformationAttribute
{
    public override object? Transform(EngineIntrinsics engineIntrinsics, object? inputData)
    {
        LastNodeObject = (inputData is PSObject p ? p.BaseObject : inputData) as BlockNodeInfo;
        return ToName(inputData);
    }

    /// <summary>
    /// The node object (BlockNodeInfo) the last transformation on this thread took, or null when it took anything else:
    /// lets a bitmap cmdlet tell that its -Name came by property name from a node object, whose Name is the node's.
    /// Parameter binding and the ProcessRecord that follows run on the pipeline's thread, one record at a time.
    /// </summary>
    [ThreadStatic]
    internal static BlockNodeInfo? LastNodeObject;

    internal static object? ToName(object? inputData) => (inputData is PSObject pso ? pso.BaseObject : inputData) switch
    {
        BlockNodeInfo info => info.Name,
        DirtyBitmapInfo bitmap => bitmap.Node,
        BlockExportInfo export => export.Node,
        BlockNode node => node.Name,
        object[] array => array.Select(ToName).ToArray(),
        var other => other,
    };
}
