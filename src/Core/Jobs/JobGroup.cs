using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Jobs;

/// <summary>
/// Backups started by one transaction with grouped completion (QEMU's JobTxn): none finalizes until all
/// have finished copying; if one fails or is cancelled, the others are cancelled, so every bitmap of the
/// group is reclaimed and a retry copies everything again.
/// </summary>
public sealed class JobGroup
{
    private readonly Lock _lock = new();
    private readonly List<BackupJob> _jobs = new();
    private readonly TaskCompletionSource<bool> _decision = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _ready;
    private string? _failedJob;

    public IReadOnlyList<BackupJob> Jobs { get { lock (_lock) return _jobs.ToArray(); } }

    internal void Register(BackupJob job)
    {
        lock (_lock)
            _jobs.Add(job);
    }

    /// <summary>
    /// A job finished copying: wait until every job has (true) or one has failed (false). Cancelling the
    /// waiting job fails the group.
    /// </summary>
    internal bool WaitForAll(BackupJob job, CancellationToken cancel, out BlockException? why)
    {
        lock (_lock)
        {
            if (++_ready == _jobs.Count)
                _decision.TrySetResult(true);
        }
        try
        {
            bool all = _decision.Task.Wait(Timeout.Infinite, cancel) && _decision.Task.Result;
            why = all ? null : GroupFailure(job);
            return all;
        }
        catch (OperationCanceledException)
        {
            why = null;
            return false;
        }
    }

    /// <summary>A job of the group failed or was cancelled: cancel the others.</summary>
    internal void Fail(BackupJob job)
    {
        BackupJob[] others;
        lock (_lock)
        {
            _failedJob ??= job.Id;
            others = _jobs.Where(j => j != job).ToArray();
        }
        _decision.TrySetResult(false);
        foreach (BackupJob other in others)
            other.Cancel();
    }

    internal BlockException GroupFailure(BackupJob job)
    {
        lock (_lock)
            return new BlockException(ErrorIds.BackupCancelled, BlockErrorCategory.InvalidOperation,
                $"Backup job '{job.Id}' was cancelled because job '{_failedJob}' of its grouped transaction failed or was stopped.", job.Id);
    }
}
