using System.Collections.Concurrent;
using System.Management.Automation;

namespace BitmapBackup;

/// <summary>
/// Keeps the session's backup and merge jobs (<see cref="BackupPSJob"/>, <see cref="MergePSJob"/>) so Get-Job,
/// Stop-Job, Remove-Job and friends find them (PowerShell registers every public adapter of an imported binary
/// module). Follows ThreadJob's adapter.
/// </summary>
public sealed class BackupJobSourceAdapter : JobSourceAdapter
{
    private static readonly ConcurrentDictionary<Guid, Job2> s_jobs = new();

    public BackupJobSourceAdapter()
    {
        Name = BackupPSJob.TypeName;
    }

    public override Job2 NewJob(JobInvocationInfo specification)
    {
        var job = specification.Parameters[0].FirstOrDefault(p => p.Name == BackupPSJob.ParameterName)?.Value as Job2
            ?? throw new PSArgumentException("A backup job is started with Start-IncrementalBackup, a merge job with Merge-BackupChain.");
        s_jobs.TryAdd(job.InstanceId, job);
        return job;
    }

    public override IList<Job2> GetJobs() => s_jobs.Values.ToList();

    public override IList<Job2> GetJobsByName(string name, bool recurse)
    {
        var pattern = WildcardPattern.Get(name, WildcardOptions.IgnoreCase);
        return s_jobs.Values.Where(j => pattern.IsMatch(j.Name)).ToList();
    }

    public override IList<Job2> GetJobsByCommand(string command, bool recurse)
    {
        var pattern = WildcardPattern.Get(command, WildcardOptions.IgnoreCase);
        return s_jobs.Values.Where(j => pattern.IsMatch(j.Command)).ToList();
    }

    public override IList<Job2> GetJobsByState(JobState state, bool recurse) => s_jobs.Values.Where(j => j.JobStateInfo.State == state).ToList();

    public override IList<Job2> GetJobsByFilter(Dictionary<string, object> filter, bool recurse) => [];

    public override Job2? GetJobByInstanceId(Guid instanceId, bool recurse) => s_jobs.GetValueOrDefault(instanceId);

    public override Job2? GetJobBySessionId(int id, bool recurse) => s_jobs.Values.FirstOrDefault(j => j.Id == id);

    public override void RemoveJob(Job2 job)
    {
        if (s_jobs.TryGetValue(job.InstanceId, out Job2? known))
        {
            if (known.JobStateInfo.State is not (JobState.Completed or JobState.Failed or JobState.Stopped))
                known.StopJob();
            s_jobs.TryRemove(job.InstanceId, out _);
            known.Dispose();
        }
    }
}
