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
    public override object? Transform(EngineIntrinsics engineIntrinsics, object? inputData) => ToName(inputData);

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
