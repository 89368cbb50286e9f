<#
.SYNOPSIS
    The BitmapBackup demo: a full backup and two incrementals of a sample disk, verified and restored.
.DESCRIPTION
    Run by `build.ps1 Demo` in a fresh pwsh, with BITMAPBACKUP_MODULE pointing at the staged module.
    Makes a 256 MiB qcow2 sample disk in a scratch folder, opens it as a block node, adds a persistent dirty
    bitmap, takes a full backup that resets the bitmap on success, writes, takes two incremental backups (the
    second as a background job with its progress), verifies the chain against the node, restores it to a raw
    file and compares, and prints a table of what each backup copied.
#>
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$ConfirmPreference = 'None'
$ProgressPreference = 'SilentlyContinue'   # the background job's progress is printed below instead

$module = if ($env:BITMAPBACKUP_MODULE) { $env:BITMAPBACKUP_MODULE } else { Join-Path $PSScriptRoot '../out/BitmapBackup/BitmapBackup.psd1' }
Import-Module (Resolve-Path $module)

# Tables are wider than the 80 columns of a redirected console: render them at 150.
function Show { param([Parameter(ValueFromPipeline)] $InputObject) end { $input | Format-Table | Out-String -Width 150 | Write-Host } }
function Step([string] $Text) { Write-Host "`n# $Text" -ForegroundColor Cyan }

$work = Join-Path ([IO.Path]::GetTempPath()) "bitmapbackup-demo-$PID"
$null = New-Item -ItemType Directory -Path $work
Push-Location $work
try {
    Step 'A 256 MiB qcow2 disk with 64 MiB of data, opened as node vm1, with a persistent bitmap'
    $null = New-BlockImage -Path vm1.qcow2 -Size 256MB
    $null = Open-BlockNode -Path vm1.qcow2 -Name vm1
    $rng = [Random]::new(42)
    foreach ($i in 0..63) {
        $data = [byte[]]::new(1MB); $rng.NextBytes($data)
        Write-BlockNode -Node vm1 -Offset ($rng.Next(0, 255) * 1MB) -Data $data
    }
    $null = New-DirtyBitmap -Node vm1 -Name daily -Persistent
    Get-DirtyBitmap -Node vm1 | Show

    Step 'Full backup; the bitmap restarts from its point in time (-Sync Full -Bitmap daily -BitmapMode OnSuccess)'
    $results = [Collections.Generic.List[object]]::new()
    $full = Start-IncrementalBackup -Node vm1 -Target full.qcow2 -Sync Full -Bitmap daily -BitmapMode OnSuccess -Wait
    $results.Add($full)

    Step 'The guest writes 3 MiB here and there; the bitmap records it'
    Write-BlockNode -Node vm1 -Offset 10MB -Pattern 0xAB -Length 1MB
    Write-BlockNode -Node vm1 -Offset 100MB -Pattern 0xCD -Length 1MB
    Write-BlockNode -Node vm1 -Offset 200MB -Zero -Length 1MB
    Get-DirtyBitmap -Node vm1 | Show

    Step 'Incremental 1, on top of the full backup'
    $results.Add((Start-IncrementalBackup -Node vm1 -Target inc1.qcow2 -Sync Incremental -Bitmap daily -BackingFile full.qcow2 -Wait))

    Step 'More writes (16 MiB), then incremental 2 as a background job, throttled to show its progress'
    foreach ($i in 0..15) { Write-BlockNode -Node vm1 -Offset ((16 * $i + 3) * 1MB) -Pattern ($i + 1) -Length 1MB }
    $job = Start-IncrementalBackup -Node vm1 -Target inc2.qcow2 -Sync Incremental -Bitmap daily -BackingFile inc1.qcow2 -BytesPerSecond 32MB
    Write-BlockNode -Node vm1 -Offset 3MB -Pattern 0xEE -Length 4KB   # lands during the job: copied before it is overwritten
    while ($job.State -eq 'Running') {
        '  {0,-10} {1,-8} {2,12:N0} of {3:N0} bytes' -f $job.Name, $job.Status, $job.BytesCopied, $job.BytesTotal | Write-Host
        Start-Sleep -Milliseconds 150
    }
    $null = $job | Wait-Job
    $results.Add(($job | Receive-Job))
    $job | Remove-Job
    Get-DirtyBitmap -Node vm1 | Show    # holds the write made during the job: the next incremental's work

    Step 'The backups'
    $results | Show
    Get-BackupChain -Path inc2.qcow2 | Show

    Step 'Verify: the chain against the node (the write made during the job is not in inc2, by design)'
    Write-BlockNode -Node vm1 -Offset 3MB -Pattern 1 -Length 4KB    # put back what inc2 saw, to compare
    Test-IncrementalBackup -Path inc2.qcow2 -Node vm1 | Show

    Step 'Restore the chain to a raw file and compare'
    $null = Restore-IncrementalBackup -Path inc2.qcow2 -Destination restored.raw -Format Raw -Wait
    Test-IncrementalBackup -Path restored.raw -Node vm1 | Show

    Close-BlockNode -Node vm1
    Step 'After closing, the persistent bitmap is stored in the image'
    Get-DirtyBitmap -Path vm1.qcow2 | Show
    if (Get-Command qemu-img -ErrorAction SilentlyContinue) {
        Step 'qemu-img agrees'
        & qemu-img compare vm1.qcow2 inc2.qcow2 | Write-Host
        & qemu-img check inc2.qcow2 | Write-Host
    }
    Write-Host "`nDemo finished." -ForegroundColor Green
}
finally {
    Pop-Location
    Get-Job | Remove-Job -Force
    Get-BlockNode | Close-BlockNode -WarningAction SilentlyContinue
    Remove-Item $work -Recurse -Force
}
