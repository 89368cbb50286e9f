using System.Management.Automation;
using BitmapBackup.Core.Chains;
using BitmapBackup.Core.Digests;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Formats.Qcow2;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>
/// Test-IncrementalBackup: checks a backup chain's images (like qemu-img check) and compares what the chain
/// reads with a node or another image (like qemu-img compare).
/// </summary>
[Cmdlet(VerbsDiagnostic.Test, "IncrementalBackup", DefaultParameterSetName = NodeSet)]
[OutputType(typeof(BackupVerification))]
public sealed class TestIncrementalBackupCommand : BitmapBackupCmdlet
{
    private const string NodeSet = "Node";
    private const string ReferenceSet = "ReferencePath";
    private const string ManifestSet = "Manifest";

    #region Parameters

    /// <summary>The top image of the chain (the backup to check).</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipelineByPropertyName = true)]
    [Alias("FullName", "Target")]
    [ValidateNotNullOrEmpty]
    public string Path { get; set; } = null!;

    /// <summary>An open node to compare with (it should not be written meanwhile).</summary>
    [Parameter(Mandatory = true, ParameterSetName = NodeSet)]
    [BlockNodeTransformation]
    [ArgumentCompleter(typeof(NodeNameCompleter))]
    [ValidateNotNullOrEmpty]
    public string Node { get; set; } = null!;

    /// <summary>An image file (raw or qcow2, with its chain) to compare with.</summary>
    [Parameter(Mandatory = true, ParameterSetName = ReferenceSet)]
    [ValidateNotNullOrEmpty]
    public string ReferencePath { get; set; } = null!;

    /// <summary>The chain's digest manifest to compare with: a check that needs no source ('&lt;Path&gt;.digests' is the one its backup wrote).</summary>
    [Parameter(Mandatory = true, ParameterSetName = ManifestSet)]
    [ValidateNotNullOrEmpty]
    public string Manifest { get; set; } = null!;

    /// <summary>Read the chain (and -ReferencePath) without image locks, even while another process writes them (qemu-img -U).</summary>
    [Parameter]
    public SwitchParameter ForceShare { get; set; }

    #endregion

    #region Overrides

    protected override void ProcessRecord()
    {
        string path = ResolveFilePath(Path);
        try
        {
            BackupVerification result = Verify(path);
            if (ForceShare)
                WriteForceShareWarning(path);
            WriteObject(result);
        }
        catch (BlockException e)
        {
            WriteError(ErrorRecordFactory.From(e));
        }
        WriteEngineWarnings();
    }

    #endregion

    #region Private methods

    private BackupVerification Verify(string path)
    {
        var problems = new List<string>();
        long leaks = 0;
        using IBlockImage top = BlockEngine.OpenImage(path, readOnly: true, ForceShare);
        _ = BlockEngine.StoreFor(top)?.Load(); // the same validation as Open-BlockNode and Get-BlockImage
        foreach (ChainImage layer in BackupChain.Describe(top).Where(l => l.Format == ImageFormat.Qcow2))
        {
            Qcow2CheckReport report = Qcow2Checker.Check(layer.Path, ForceShare);
            problems.AddRange(report.Corruptions.Concat(report.CheckErrors).Select(c => $"{layer.Path}: {c}"));
            leaks += report.Leaks;
        }
        long compared = 0;
        long? difference;
        string reference;
        if (ParameterSetName == ManifestSet)
        {
            using DigestManifest manifest = DigestManifest.Open(ResolveFilePath(Manifest));
            reference = manifest.Path;
            if (manifest.Info.NodeSize != top.Size)
            {
                problems.Add($"{manifest.Path}: it describes a disk of {manifest.Info.NodeSize} bytes, but the chain is {top.Size} bytes");
                return new BackupVerification(path, reference, problems, leaks, null, 0);
            }
            long? firstCluster = null;
            ManifestScanResult scan = ManifestScan.Compare(ManifestScan.Of(top), manifest, c => firstCluster ??= c, n => compared = n);
            difference = firstCluster * manifest.Info.ClusterSize;
            if (difference is { } first)
                WriteVerbose($"'{path}' differs from its manifest in {scan.ClustersDiffering} clusters of {manifest.Info.ClusterSize} bytes, the first at offset {first}.");
            return new BackupVerification(path, reference, problems, leaks, difference, compared, scan.ClustersDiffering);
        }
        if (ParameterSetName == NodeSet)
        {
            BlockNode node = Engine.Get(Node);
            reference = node.Name;
            difference = BackupChain.FirstDifference(ManifestScan.Of(top), ManifestScan.Of(node), n => compared = n);
        }
        else
        {
            string referencePath = ResolveFilePath(ReferencePath);
            reference = referencePath;
            string full = System.IO.Path.GetFullPath(referencePath);
            if (Engine.Nodes.FirstOrDefault(n => n.Path == full) is { } open)
            {
                difference = BackupChain.FirstDifference(ManifestScan.Of(top), ManifestScan.Of(open), n => compared = n);
            }
            else
            {
                using IBlockImage other = BlockEngine.OpenImage(full, readOnly: true, ForceShare);
                difference = BackupChain.FirstDifference(ManifestScan.Of(top), ManifestScan.Of(other), n => compared = n);
            }
        }
        if (difference is { } at)
            WriteVerbose($"'{path}' and '{reference}' differ at offset {at}.");
        return new BackupVerification(path, reference, problems, leaks, difference, compared);
    }

    #endregion
}
