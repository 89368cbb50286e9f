using System.Management.Automation;
using BitmapBackup.Core.Errors;
using BitmapBackup.Core.Nodes;

namespace BitmapBackup;

/// <summary>Common plumbing of the module's cmdlets: the engine, node lookup and engine errors as ErrorRecords.</summary>
public abstract class BitmapBackupCmdlet : PSCmdlet
{
    internal static BlockEngine Engine => BlockEngine.Default;

    /// <summary>Run an engine call; an engine error becomes a non-terminating error of this input. Returns success.</summary>
    protected bool TryRun(Action action)
    {
        try
        {
            action();
            return true;
        }
        catch (BlockException e)
        {
            ReportError(ErrorRecordFactory.From(e));
            return false;
        }
        finally
        {
            WriteEngineWarnings();
        }
    }

    /// <summary>Write the engine's pending warnings (<see cref="EngineWarnings"/>), for example image locks a file system refuses.</summary>
    protected void WriteEngineWarnings()
    {
        foreach (string message in EngineWarnings.TakePending())
            WriteWarning(message);
    }

    /// <summary>The warning of a -ForceShare read: the image is read without locks, and a writer may be changing it.</summary>
    protected void WriteForceShareWarning(string path)
        => WriteWarning($"-ForceShare: '{path}' is read without image locks. If another process is writing it, what is read may be changing and may not be consistent.");

    protected override void EndProcessing() => WriteEngineWarnings();

    /// <summary>
    /// Whether this cmdlet queues its action inside Invoke-BitmapTransaction. Its errors there are terminating,
    /// so that the block stops and nothing of the transaction is applied.
    /// </summary>
    internal virtual bool IsTransactional => false;

    /// <summary>A transactional cmdlet in a thread started inside another runspace's open transaction fails (TransactionScope).</summary>
    protected override void BeginProcessing()
    {
        if (IsTransactional)
            TransactionScope.CheckRunspace(this);
    }

    /// <summary>A non-terminating error, or a terminating one for a transactional cmdlet inside a transaction.</summary>
    protected void ReportError(ErrorRecord record)
    {
        if (IsTransactional && TransactionScope.Current is not null)
            ThrowTerminatingError(record);
        WriteError(record);
    }

    /// <summary>Find an open node by name, or write NodeNotFound and return null.</summary>
    protected BlockNode? ResolveNode(string name)
    {
        BlockNode? node = Engine.Find(name);
        if (node is null)
            ReportError(ErrorRecordFactory.From(new BlockException(ErrorIds.NodeNotFound, BlockErrorCategory.ObjectNotFound, $"Node '{name}' not found.", name)));
        return node;
    }

    /// <summary>
    /// A file-system path for a path the user gave, relative to the PowerShell location; a path of another provider
    /// (ReadWriteFileNotFileSystemProvider) or of an unknown drive (DriveNotFound) is a terminating error
    /// (<see cref="FilePaths"/>).
    /// </summary>
    protected string ResolveFilePath(string path)
        => FilePaths.ToFileSystem(this, path, out ErrorRecord? error) ?? throw Terminated(error!);

    /// <summary>
    /// The existing files -Path (wildcards) or -LiteralPath names; a path that cannot be a file (another provider, an
    /// unknown drive) is reported as a non-terminating error and yields nothing.
    /// </summary>
    protected IReadOnlyList<string> ResolveExistingFiles(string path, bool literal)
    {
        IReadOnlyList<string> files = FilePaths.ResolveExisting(this, path, literal, out ErrorRecord? error);
        if (error is not null)
            WriteError(error);
        return files;
    }

    /// <summary>
    /// The one existing file -Path (wildcards) or -LiteralPath names, for a cmdlet that reads one image; a pattern
    /// that matches no file or several is a terminating error (ImageNotFound, PathMatchesSeveralFiles).
    /// </summary>
    protected string ResolveSingleFile(string path, bool literal)
    {
        IReadOnlyList<string> files = FilePaths.ResolveExisting(this, path, literal, out ErrorRecord? error);
        if (error is not null)
            throw Terminated(error);
        return files.Count switch
        {
            1 => files[0],
            0 => throw Terminated(ErrorRecordFactory.From(new BlockException(ErrorIds.ImageNotFound, BlockErrorCategory.ObjectNotFound,
                $"No file matches '{path}'.", path))),
            _ => throw Terminated(ErrorRecordFactory.Create("PathMatchesSeveralFiles", ErrorCategory.InvalidArgument,
                $"'{path}' matches {files.Count} files ('{files[0]}', '{files[1]}'{(files.Count > 2 ? ", ..." : "")}): this cmdlet reads one image; give one path, or -LiteralPath.", path)),
        };
    }

    /// <summary>The -BackingFile name to store (<see cref="FilePaths.BackingFileName"/>); a terminating error when it cannot be a file.</summary>
    protected string ResolveBackingFileName(string name)
        => FilePaths.BackingFileName(this, name, out ErrorRecord? error) ?? throw Terminated(error!);

    private Exception Terminated(ErrorRecord error)
    {
        ThrowTerminatingError(error);
        return new InvalidOperationException("unreachable");
    }
}
