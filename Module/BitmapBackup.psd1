@{
    # The root module defines the class-based DSC resources; the cmdlets are the binary nested module, loaded first.
    RootModule           = 'BitmapBackup.psm1'
    NestedModules        = @('BitmapBackup.Cmdlets.dll')
    ModuleVersion        = '0.1.0'
    GUID                 = '5d0c7f7e-3b1a-4c55-9a0e-2f7b8d3c6a41'
    Author               = 'BitmapBackup contributors'
    CompanyName          = 'BitmapBackup'
    Copyright            = '(c) BitmapBackup contributors. MIT licence.'
    Description          = 'Dirty bitmaps and incremental backups of disk images (raw, qcow2), with the semantics of QEMU''s block layer: bitmaps that record which clusters were written, incremental qcow2 backup chains that qemu-img reads, chain retention and synthetic fulls, digest manifests, QEMU-compatible image locks, and DSC resources (class-based and DSC v3) for bitmaps and chain retention.'
    PowerShellVersion    = '7.6'
    CompatiblePSEditions = @('Core')
    FormatsToProcess     = @('BitmapBackup.format.ps1xml')
    CmdletsToExport      = @(
        'New-BlockImage', 'Get-BlockImage', 'Open-BlockNode', 'Get-BlockNode', 'Close-BlockNode', 'Resize-BlockNode',
        'Write-BlockNode', 'Read-BlockNode', 'Sync-BlockNode',
        'New-DirtyBitmap', 'Get-DirtyBitmap', 'Set-DirtyBitmap', 'Enable-DirtyBitmap', 'Disable-DirtyBitmap', 'Clear-DirtyBitmap',
        'Remove-DirtyBitmap', 'Merge-DirtyBitmap', 'Get-DirtyBitmapRange', 'Update-DirtyBitmap',
        'Start-IncrementalBackup', 'Complete-IncrementalBackup', 'Suspend-IncrementalBackup', 'Resume-IncrementalBackup',
        'Invoke-BitmapTransaction', 'Get-BackupChain', 'Restore-IncrementalBackup', 'Test-IncrementalBackup', 'Merge-BackupChain',
        'Show-DirtyBitmap', 'Start-BlockExport', 'Stop-BlockExport', 'Get-BlockExport'
    )
    FunctionsToExport    = @()
    AliasesToExport      = @()
    VariablesToExport    = @()
    DscResourcesToExport = @('DirtyBitmap', 'BackupChainRetention')
    PrivateData          = @{
        PSData = @{
            Tags         = @('backup', 'qemu', 'qcow2', 'dirty-bitmap', 'incremental', 'disk-image', 'retention', 'DSC', 'DSCResource', 'Linux', 'PSEdition_Core')
            ProjectUri   = 'https://github.com/BitmapBackup/BitmapBackup'
            LicenseUri   = 'https://opensource.org/licenses/MIT'
            ReleaseNotes = @'
0.1.0
- Dirty bitmaps with QEMU's semantics (recording, disabled, busy, inconsistent, read-only), persistent in qcow2 images or a raw image's sidecar.
- Incremental backups into qcow2 chains (Start-IncrementalBackup), as jobs or with -Wait; transactions across disks; restore and verification.
- Digest manifests beside each backup: Update-DirtyBitmap after a crash, Test-IncrementalBackup -Manifest without the source.
- QEMU-compatible image locks.
- Merge-BackupChain: chain retention (-Keep) and synthetic fulls (-Into), restorable at every instant.
- Show-DirtyBitmap: the dirty map as a strip of Unicode blocks, or an SVG.
- DSC resources DirtyBitmap and BackupChainRetention: class-based, and DSC v3 command resources (*.dsc.resource.json).
'@
        }
    }
}
