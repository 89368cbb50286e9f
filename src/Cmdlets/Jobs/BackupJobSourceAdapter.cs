using System.Collections.Concurrent;
using System.Management.Automation;
using System.Runtime.CompilerServices;

namespace BitmapBackup;

/// <summary>
/// Keeps one runspace's backup and merge jobs (<see cref="BackupPSJob"/>, <see cref="MergePSJob"/>) so Get-Job, Stop-Job, Remove-Job and friends find them. Follows ThreadJob's
/// adapter: PowerShell gives every runspace its own JobManager, which makes its own instance of each adapter of an
/// imported binary module, so the jobs are kept per instance. A job belongs to the runspace that started it, as
/// PowerShell's own jobs do: a thread job or a ForEach-Object -Parallel runspace neither sees nor removes the jobs of
/// the runspace that started it, and the reverse. (The backups themselves belong to the process: the end of the
/// session stops every one, whatever runspace started it.)
/// </summary>
public sealed class BackupJobSourceAdapter : JobSourceAdapter
{
    /// <summary>Each runspace's adapter, by its JobManager: where -Name and -Id of the backup cmdlets look.</summary>
    private static readonly ConditionalWeakTable<JobManager, BackupJobSourceAdapter> s_byJobManager = new();

    private readonly ConcurrentDictionary<Guid, Job2> _jobs = new();

    /// <summary>The adapter that took the job <see cref="Register"/> is registering (NewJob runs on the caller's thread).</summary>
    [ThreadStatic]
    private static BackupJobSourceAdapter? t_registeredBy;

    public BackupJobSourceAdapter()
    {
        Name = BackupPSJob.TypeName;
    }

    /// <summary>The backup jobs started in the runspace of <paramref name="jobManager"/>, oldest first.</summary>
    internal static IReadOnlyList<BackupPSJob> JobsOf(JobManager jobManager)
        => s_byJobManager.TryGetValue(jobManager, out BackupJobSourceAdapter? adapter)
            ? adapter._jobs.Values.OfType<BackupPSJob>().OrderBy(j => j.Id).ToArray()
            : [];

    /// <summary>Register a new job with the JobManager of the cmdlet's runspace, and so with that runspace's adapter.</summary>
    internal static void Register(PSCmdlet cmdlet, Job2 job, string commandLine)
    {
        t_registeredBy = null;
        var definition = new JobDefinition(typeof(BackupJobSourceAdapter), commandLine, job.Name);
        var parameters = new Dictionary<string, object> { [BackupPSJob.ParameterName] = job };
        Job2 registered = cmdlet.JobManager.NewJob(new JobInvocationInfo(definition, parameters));
        System.Diagnostics.Debug.Assert(registered == job, "The adapter must return the job it was given.");
        s_byJobManager.AddOrUpdate(cmdlet.JobManager, t_registeredBy!);
    }

    public override Job2 NewJob(JobInvocationInfo specification)
    {
        var job = specification.Parameters[0].FirstOrDefault(p => p.Name == BackupPSJob.ParameterName)?.Value as Job2
            ?? throw new PSArgumentException("A backup job is started with Start-IncrementalBackup, a merge job with Merge-BackupChain.");
        if (job is BackupPSJob backup)
            backup.Adapter = this;
        t_registeredBy = this;
        _jobs.TryAdd(job.InstanceId, job);
        return job;
    }

    public override IList<Job2> GetJobs() => _jobs.Values.ToList();

    public override IList<Job2> GetJobsByName(string name, bool recurse)
    {
        var pattern = WildcardPattern.Get(name, WildcardOptions.IgnoreCase);
        return _jobs.Values.Where(j => pattern.IsMatch(j.Name)).ToList();
    }

    public override IList<Job2> GetJobsByCommand(string command, bool recurse)
    {
        var pattern = WildcardPattern.Get(command, WildcardOptions.IgnoreCase);
        return _jobs.Values.Where(j => pattern.IsMatch(j.Command)).ToList();
    }

    public override IList<Job2> GetJobsByState(JobState state, bool recurse) => _jobs.Values.Where(j => j.JobStateInfo.State == state).ToList();

    public override IList<Job2> GetJobsByFilter(Dictionary<string, object> filter, bool recurse) => [];

    public override Job2? GetJobByInstanceId(Guid instanceId, bool recurse) => _jobs.GetValueOrDefault(instanceId);

    public override Job2? GetJobBySessionId(int id, bool recurse) => _jobs.Values.FirstOrDefault(j => j.Id == id);

    public override void RemoveJob(Job2 job)
    {
        if (_jobs.TryGetValue(job.InstanceId, out Job2? known))
        {
            if (known.JobStateInfo.State is not (JobState.Completed or JobState.Failed or JobState.Stopped))
                known.StopJob();
            _jobs.TryRemove(job.InstanceId, out _);
            known.Dispose();
        }
    }
}
