using System.Management.Automation;

namespace BitmapBackup;

/// <summary>Lets an export parameter take an export name or a BlockExportInfo, and hands the cmdlet the export name.</summary>
[AttributeUsage(AttributeTargets.Property | AttributeTargets.Field)]
internal sealed class BlockExportTransformationAttribute : ArgumentTransformationAttribute
{
    public override object? Transform(EngineIntrinsics engineIntrinsics, object? inputData) => ToName(inputData);

    internal static object? ToName(object? inputData) => (inputData is PSObject pso ? pso.BaseObject : inputData) switch
    {
        BlockExportInfo info => info.Name,
        object[] array => array.Select(ToName).ToArray(),
        var other => other,
    };
}
