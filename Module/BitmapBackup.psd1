@{
    RootModule           = 'BitmapBackup.Cmdlets.dll'
    ModuleVersion        = '0.1.0'
    GUID                 = '5d0c7f7e-3b1a-4c55-9a0e-2f7b8d3c6a41'
    Author               = 'BitmapBackup contributors'
    CompanyName          = 'BitmapBackup'
    Copyright            = '(c) BitmapBackup contributors. MIT licence.'
    Description          = 'Dirty bitmaps and incremental backups of disk images (raw, qcow2), with the semantics of QEMU''s block layer.'
    PowerShellVersion    = '7.6'
    CompatiblePSEditions = @('Core')
    FormatsToProcess     = @('BitmapBackup.format.ps1xml')
    CmdletsToExport      = @(
        'New-BlockImage', 'Get-BlockImage', 'Open-BlockNode', 'Get-BlockNode', 'Close-BlockNode', 'Resize-BlockNode',
        'Write-BlockNode', 'Read-BlockNode', 'Sync-BlockNode',
        'New-DirtyBitmap', 'Get-DirtyBitmap', 'Enable-DirtyBitmap', 'Disable-DirtyBitmap', 'Clear-DirtyBitmap',
        'Remove-DirtyBitmap', 'Merge-DirtyBitmap', 'Get-DirtyBitmapRange', 'Update-DirtyBitmap',
        'Start-IncrementalBackup', 'Complete-IncrementalBackup', 'Suspend-IncrementalBackup', 'Resume-IncrementalBackup',
        'Invoke-BitmapTransaction', 'Get-BackupChain', 'Restore-IncrementalBackup', 'Test-IncrementalBackup', 'Merge-BackupChain',
        'Show-DirtyBitmap'
    )
    FunctionsToExport    = @()
    AliasesToExport      = @()
    VariablesToExport    = @()
    PrivateData          = @{
        PSData = @{
            Tags       = @('backup', 'qemu', 'qcow2', 'dirty-bitmap', 'incremental', 'disk-image')
            LicenseUri = 'https://opensource.org/licenses/MIT'
        }
    }
}
