namespace BitmapBackup.Core.Chains;

/// <summary>What a chain merge is doing: Created, then Copying (the merged image is built; Stop-Job is honoured), Switching, CleaningUp, and one of Completed, Failed, Cancelled.</summary>
public enum ChainMergeStatus
{
    Created,
    Copying,
    Switching,
    CleaningUp,
    Completed,
    Failed,
    Cancelled,
}
