using BitmapBackup.Core.Errors;

namespace BitmapBackup.Core.Jobs;

/// <summary>
/// Backups started by one transaction with grouped completion (QEMU's JobTxn): none finalizes until all
/// have finished copying; if one fails or is cancelled, the others are cancelled, so every bitmap of the
/// group is reclaimed and a retry copies everything again.
///
/// <para>Finalizing has two barriers, as QEMU's .prepare/.commit/.abort: every job first prepares (flushes its
/// target, checks its final name) and waits for all (<see cref="WaitForAll"/>); then every job renames its target
/// and waits again (<see cref="WaitForCommits"/>) before it touches its bitmap. A rename that still fails (a folder
/// put at the final name meanwhile) fails the group at the second barrier: the jobs already renamed give their targets
/// their partial names back and discard them, and every bitmap keeps its bits. So the group completes all or none.</para>
/// </summary>
public sealed class JobGroup
{
    private readonly Lock _lock = new();
    private readonly List<BackupJob> _jobs = new();
    private readonly TaskCompletionSource<bool> _decision = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource<bool> _commitDecision = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _ready;
    private int _committed;
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

    /// <summary>
    /// A job renamed its target: wait until every job has (true: each may now conclude) or one has failed (false: each
    /// renamed target takes its partial name back). Cancelling the waiting job fails the group.
    /// </summary>
    internal bool WaitForCommits(BackupJob job, CancellationToken cancel, out BlockException? why)
    {
        lock (_lock)
        {
            if (++_committed == _jobs.Count)
                _commitDecision.TrySetResult(true);
        }
        try
        {
            bool all = _commitDecision.Task.Wait(Timeout.Infinite, cancel) && _commitDecision.Task.Result;
            why = all ? null : GroupFailure(job);
            return all;
        }
        catch (OperationCanceledException)
        {
            Fail(job);
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
            if (_commitDecision.Task.IsCompletedSuccessfully && _commitDecision.Task.Result)
                return; // every target has its name: the group has completed, whatever happens to one job now
            _failedJob ??= job.Id;
            others = _jobs.Where(j => j != job).ToArray();
        }
        _decision.TrySetResult(false);
        _commitDecision.TrySetResult(false);
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
