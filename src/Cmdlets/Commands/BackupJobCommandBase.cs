using System.Management.Automation;
using BitmapBackup.Core.Errors;

namespace BitmapBackup;

/// <summary>
/// Base of the cmdlets that act on backup jobs (Suspend-, Resume-, Complete-IncrementalBackup): the job as an object
/// (-Job, from the pipeline), or by -Name (wildcards) or -Id among the backup jobs of this runspace, as Stop-Job
/// takes them.
/// </summary>
public abstract class BackupJobCommandBase : BitmapBackupCmdlet
{
    private const string JobSet = "Job";
    private const string NameSet = "Name";
    private const string IdSet = "Id";

    #region Parameters

    /// <summary>The backup job.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipeline = true, ParameterSetName = JobSet)]
    [ValidateNotNull]
    public BackupPSJob Job { get; set; } = null!;

    /// <summary>Names of backup jobs of this runspace; wildcards allowed.</summary>
    [Parameter(Mandatory = true, Position = 0, ValueFromPipelineByPropertyName = true, ParameterSetName = NameSet)]
    [SupportsWildcards]
    [ValidateNotNullOrEmpty]
    public string[] Name { get; set; } = null!;

    /// <summary>Session ids (the Id that Get-Job shows) of backup jobs of this runspace.</summary>
    [Parameter(Mandatory = true, ValueFromPipelineByPropertyName = true, ParameterSetName = IdSet)]
    [ValidateNotNullOrEmpty]
    public int[] Id { get; set; } = null!;

    /// <summary>Write the job.</summary>
    [Parameter]
    public SwitchParameter PassThru { get; set; }

    #endregion

    protected override void ProcessRecord()
    {
        foreach (BackupPSJob job in SelectedJobs())
            ProcessJob(job);
    }

    /// <summary>Act on one job; engine errors are reported with <see cref="BitmapBackupCmdlet.TryRun"/>.</summary>
    protected abstract void ProcessJob(BackupPSJob job);

    private IEnumerable<BackupPSJob> SelectedJobs()
    {
        if (ParameterSetName == JobSet)
            return [Job];
        IReadOnlyList<BackupPSJob> jobs = BackupJobSourceAdapter.JobsOf(JobManager);
        var selected = new List<BackupPSJob>();
        if (ParameterSetName == NameSet)
        {
            foreach (string name in Name)
            {
                var pattern = WildcardPattern.Get(name, WildcardOptions.IgnoreCase);
                BackupPSJob[] found = jobs.Where(j => pattern.IsMatch(j.Name)).ToArray();
                if (found.Length == 0 && !WildcardPattern.ContainsWildcardCharacters(name))
                    NotFound($"No backup job named '{name}' was started in this runspace (Get-Job -Name '{name}' lists it if it was).", name);
                selected.AddRange(found);
            }
        }
        else
        {
            foreach (int id in Id)
            {
                BackupPSJob? found = jobs.FirstOrDefault(j => j.Id == id);
                if (found is null)
                    NotFound($"No backup job with Id {id} was started in this runspace.", id);
                else
                    selected.Add(found);
            }
        }
        return selected.Distinct();
    }

    private void NotFound(string message, object target)
        => WriteError(ErrorRecordFactory.From(new BlockException(ErrorIds.JobNotFound, BlockErrorCategory.ObjectNotFound, message, target)));
}
