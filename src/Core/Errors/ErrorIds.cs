namespace BitmapBackup.Core.Errors;

/// <summary>Stable error identifiers, one per cause. Scripts and tests match on these; never rename one.</summary>
public static class ErrorIds
{
    // Nodes and images
    public const string NodeNotFound = "NodeNotFound";
    public const string NodeNameInUse = "NodeNameInUse";
    public const string NodeNameInvalid = "NodeNameInvalid";
    public const string NodeReadOnly = "NodeReadOnly";
    public const string NodeBusy = "NodeBusy";
    public const string NodeClosed = "NodeClosed";
    public const string ImageNotFound = "ImageNotFound";
    public const string ImageAlreadyExists = "ImageAlreadyExists";
    public const string ImageInUse = "ImageInUse";
    public const string ImageIsFolder = "ImageIsFolder";
    public const string ImageIsFifo = "ImageIsFifo";
    public const string ImageIsSocket = "ImageIsSocket";
    public const string ImageIsCharacterDevice = "ImageIsCharacterDevice";
    public const string ForceShareRequiresReadOnly = "ForceShareRequiresReadOnly";
    public const string ImageIOFailed = "ImageIOFailed";
    public const string TooManyOpenFiles = "TooManyOpenFiles";
    public const string InvalidImageSize = "InvalidImageSize";
    public const string ImageTooLargeForFileSystem = "ImageTooLargeForFileSystem";
    public const string ShrinkWouldDiscardData = "ShrinkWouldDiscardData";
    public const string OffsetOutOfRange = "OffsetOutOfRange";
    public const string InvalidLength = "InvalidLength";
    public const string UnsupportedFormat = "UnsupportedFormat";
    public const string DeviceSizeFixed = "DeviceSizeFixed";

    // Dirty bitmaps
    public const string BitmapNotFound = "BitmapNotFound";
    public const string BitmapAlreadyExists = "BitmapAlreadyExists";
    public const string BitmapNameEmpty = "BitmapNameEmpty";
    public const string BitmapNameTooLong = "BitmapNameTooLong";
    public const string InvalidGranularity = "InvalidGranularity";
    public const string BitmapBusy = "BitmapBusy";
    public const string BitmapInconsistent = "BitmapInconsistent";
    public const string BitmapReadOnly = "BitmapReadOnly";
    public const string BitmapSizeMismatch = "BitmapSizeMismatch";
    public const string MergeSourceMissing = "MergeSourceMissing";
    public const string InvalidMergeSource = "InvalidMergeSource";
    public const string PersistenceNotSupported = "PersistenceNotSupported";
    public const string BitmapStoreConflict = "BitmapStoreConflict";
    public const string CrashSafeRequiresPersistent = "CrashSafeRequiresPersistent";
    public const string CrashSafeNodeReadOnly = "CrashSafeNodeReadOnly";
    public const string IntentLogUnavailable = "IntentLogUnavailable";

    // qcow2 images and backing chains
    public const string ImageCorrupt = "ImageCorrupt";
    public const string UnsupportedImageFeature = "UnsupportedImageFeature";
    public const string BackingFileChanged = "BackingFileChanged";
    public const string BackingChainLoop = "BackingChainLoop";
    public const string BackingFileNotFound = "BackingFileNotFound";
    public const string BackingFileNameTooLong = "BackingFileNameTooLong";
    public const string InvalidClusterSize = "InvalidClusterSize";
    public const string ImageTooLarge = "ImageTooLarge";

    // Backups
    public const string BitmapRequired = "BitmapRequired";
    public const string BitmapModeInvalid = "BitmapModeInvalid";
    public const string BitmapModeRequired = "BitmapModeRequired";
    public const string BitmapModeWithoutBitmap = "BitmapModeWithoutBitmap";
    public const string BitmapWithSyncNone = "BitmapWithSyncNone";
    public const string BitmapModeNeverMeaningless = "BitmapModeNeverMeaningless";
    public const string SourceIsTarget = "SourceIsTarget";
    public const string TargetSizeMismatch = "TargetSizeMismatch";
    public const string BackingFileRequired = "BackingFileRequired";
    public const string InvalidSpeed = "InvalidSpeed";
    public const string JobStateInvalid = "JobStateInvalid";
    public const string BackupFailed = "BackupFailed";
    public const string BackupCancelled = "BackupCancelled";
    public const string JobStopTimedOut = "JobStopTimedOut";
    public const string JobNotFound = "JobNotFound";

    // Digest manifests
    public const string DigestManifestNotFound = "DigestManifestNotFound";
    public const string DigestManifestMismatch = "DigestManifestMismatch";

    // Backup chain retention (Merge-BackupChain)
    public const string BackupChainBroken = "BackupChainBroken";
    public const string BackupChainShared = "BackupChainShared";
    public const string InvalidKeepCount = "InvalidKeepCount";
    public const string MergeCancelled = "MergeCancelled";

    // Transactions
    public const string TransactionConflict = "TransactionConflict";
    public const string GroupedCompletionNotAllowed = "GroupedCompletionNotAllowed";
    public const string TransactionActionInvalid = "TransactionActionInvalid";

    // NBD exports
    public const string ExportNotFound = "ExportNotFound";
    public const string ExportNameInUse = "ExportNameInUse";
    public const string ExportNameInvalid = "ExportNameInvalid";
    public const string ExportDescriptionTooLong = "ExportDescriptionTooLong";
    public const string ExportAddressInUse = "ExportAddressInUse";
    public const string ExportListenFailed = "ExportListenFailed";
    public const string BitmapEnabledForReadOnlyExport = "BitmapEnabledForReadOnlyExport";
}
