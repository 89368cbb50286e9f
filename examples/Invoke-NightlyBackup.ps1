#Requires -Version 7.6
<#
.SYNOPSIS
    Nightly backup runbook: the disks of one machine backed up at one instant, a retention applied, every chain verified.

.DESCRIPTION
    For each disk image given:
      1. open it as a node and make sure it has the persistent dirty bitmap -Bitmap (a new bitmap, or one that is
         inconsistent after a crash and cannot be repaired from its chain's digest manifest, starts a new chain with a
         full backup);
      2. log how much of the disk is dirty, and where (Show-DirtyBitmap; with -ReportFolder also as an SVG);
    then back up every disk in one grouped transaction (Invoke-BitmapTransaction -CompletionMode Grouped): all the
    backups share one point in time, and if one fails every one is cancelled, every bitmap keeps its bits and the run
    can simply be repeated. Each disk's backups go to <BackupRoot>/<disk>/<disk>-<yyyyMMdd-HHmmss>.qcow2, each an
    incremental on top of the previous one. Then, for each disk: Merge-BackupChain -Keep applies the retention, and
    Test-IncrementalBackup -Manifest checks the chain (qemu-img check of every image, and its content against the
    digest manifest the backup wrote). The nodes are closed at the end, whatever happened, so the bitmaps are stored.

    Every cmdlet runs with -ErrorAction Stop. The output is plain text lines, one per step, each with a UTC time stamp,
    for a job log or a transcript (-TranscriptPath). No progress bars are drawn.

    Exit code: 0 when every disk was backed up, merged and verified; 1 otherwise (the last line says why).

.PARAMETER Disk
    The disk images of the machine (qcow2 or raw); with pwsh -File, one argument with the paths separated by commas. They must not be in use by a running machine: a disk that another
    process holds for writing is refused (ImageInUse), and nothing is backed up.

.PARAMETER BackupRoot
    The folder that holds one sub-folder of backups per disk (created when missing).

.PARAMETER Keep
    The most backups each chain keeps (Merge-BackupChain -Keep); the oldest are merged into one full backup.

.PARAMETER Bitmap
    The name of the persistent dirty bitmap that tracks each disk's writes between runs.

.PARAMETER BytesPerSecond
    Limit the copy and merge rate per disk (0: no limit).

.PARAMETER ReportFolder
    Also write an SVG picture of each disk's dirty map there, before the backup.

.PARAMETER TranscriptPath
    Also write everything to this transcript file (appended).

.EXAMPLE
    pwsh -NoProfile -NonInteractive -File ./Invoke-NightlyBackup.ps1 -Disk /srv/vm/web-os.qcow2,/srv/vm/web-data.qcow2 -BackupRoot /backup/web -Keep 7

    Backs up both disks of the machine 'web' at one instant, keeps 7 backups per disk, verifies them; exit code 0 or 1.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string[]] $Disk,

    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $BackupRoot,

    [ValidateRange(1, 10000)]
    [int] $Keep = 7,

    [ValidateNotNullOrEmpty()]
    [string] $Bitmap = 'nightly',

    [ValidateRange(0, [long]::MaxValue)]
    [long] $BytesPerSecond = 0,

    [string] $ReportFolder,

    [string] $TranscriptPath
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$Disk = @($Disk | ForEach-Object { $_ -split ',' } | Where-Object { $_ })   # pwsh -File passes "a,b" as one string
$ProgressPreference = 'SilentlyContinue'
$ConfirmPreference = 'None'

function Write-Log([string] $Message) {
    Write-Output ('{0} {1}' -f [DateTime]::UtcNow.ToString('yyyy-MM-ddTHH:mm:ssZ'), $Message)
}

function Get-NodeName([string] $Path) {
    # The disk's name for its node, its backup folder and its backups: the file name without extension, in node-name characters.
    $name = [IO.Path]::GetFileNameWithoutExtension($Path) -replace '[^A-Za-z0-9._-]', '_'
    if ($name -notmatch '^[A-Za-z]') { $name = 'disk-' + $name }
    return $name.Substring(0, [Math]::Min($name.Length, 31))
}

$stamp = [DateTime]::UtcNow.ToString('yyyyMMdd-HHmmss')
$opened = [System.Collections.Generic.List[string]]::new()
$exitCode = 1
if ($TranscriptPath) { $null = Start-Transcript -Path $TranscriptPath -Append }
try {
    Import-Module BitmapBackup -ErrorAction Stop
    Write-Log "Nightly backup $stamp of $($Disk.Count) disk(s) to '$BackupRoot', keeping $Keep backup(s) per disk."

    # 1-2. Open every disk, make sure of its bitmap, and plan its backup.
    $plans = [System.Collections.Generic.List[object]]::new()
    foreach ($path in $Disk) {
        $name = Get-NodeName $path
        $null = Open-BlockNode -Path $path -Name $name -ErrorAction Stop
        $opened.Add($name)
        $folder = Join-Path $BackupRoot $name
        $null = New-Item -ItemType Directory -Path $folder -Force -ErrorAction Stop
        $latest = Get-ChildItem -Path $folder -Filter "$name-*.qcow2" -File -ErrorAction Stop | Sort-Object Name | Select-Object -Last 1
        $state = Get-DirtyBitmap -Node $name -ErrorAction Stop | Where-Object Name -CEQ $Bitmap
        $full = $false
        if (-not $state) {
            $null = New-DirtyBitmap -Node $name -Name $Bitmap -Persistent -ErrorAction Stop
            Write-Log "[$name] new persistent bitmap '$Bitmap': this run takes a full backup."
            $full = $true
        }
        elseif ($state.Inconsistent) {
            $repaired = $false
            if ($latest -and (Test-Path "$($latest.FullName).digests")) {
                try {
                    $update = Update-DirtyBitmap -Node $name -Name $Bitmap -Manifest "$($latest.FullName).digests" -ErrorAction Stop
                    Write-Log "[$name] bitmap '$Bitmap' was inconsistent (a crash); rebuilt from '$($latest.Name).digests': $($update.ClustersDiffering) cluster(s) changed since that backup."
                    $repaired = $true
                }
                catch { Write-Log "[$name] bitmap '$Bitmap' is inconsistent and cannot be rebuilt ($($_.Exception.Message))." }
            }
            if (-not $repaired) {
                Remove-DirtyBitmap -Node $name -Name $Bitmap -ErrorAction Stop
                $null = New-DirtyBitmap -Node $name -Name $Bitmap -Persistent -ErrorAction Stop
                Write-Log "[$name] bitmap '$Bitmap' made anew: this run takes a full backup."
                $full = $true
            }
        }
        if (-not $latest) { $full = $true }
        foreach ($line in Show-DirtyBitmap -Node $name -Name $Bitmap -Width 64 -ErrorAction Stop) { Write-Log "[$name] $line" }
        if ($ReportFolder) {
            $null = New-Item -ItemType Directory -Path $ReportFolder -Force -ErrorAction Stop
            Show-DirtyBitmap -Node $name -Name $Bitmap -Width 256 -OutFile (Join-Path $ReportFolder "$name-$stamp.svg") -ErrorAction Stop
        }
        $plans.Add([pscustomobject]@{
                Node    = $name
                Target  = Join-Path $folder "$name-$stamp.qcow2"
                Full    = $full
                Backing = if ($full) { $null } else { $latest.Name }
            })
    }

    # 3. One grouped transaction: one point in time for every disk, all or nothing.
    $started = @(Invoke-BitmapTransaction -CompletionMode Grouped -ErrorAction Stop {
            foreach ($p in $plans) {
                $arguments = @{ Node = $p.Node; Target = $p.Target; Bitmap = $Bitmap; BytesPerSecond = $BytesPerSecond }
                if ($p.Full) { Start-IncrementalBackup @arguments -Sync Full -BitmapMode OnSuccess }
                else { Start-IncrementalBackup @arguments -Sync Incremental -BackingFile $p.Backing }
            }
        })
    $jobs = @($started | Where-Object PSJobTypeName -EQ 'BitmapBackupJob')
    Write-Log "Started $($jobs.Count) backup(s) at one point in time."
    $results = @($jobs | Wait-Job | Receive-Job -ErrorAction SilentlyContinue)
    $jobs | Remove-Job -Force
    foreach ($r in $results) {
        $what = if ($r.Sync -eq 'Full') { 'full backup' } else { 'incremental backup' }
        Write-Log ("[{0}] {1} '{2}': {3}, {4:N0} bytes in {5:N1} s" -f $r.Node, $what, $r.Target, $(if ($r.Succeeded) { 'succeeded' } else { "failed ($($r.ErrorId): $($r.Error))" }), $r.BytesCopied, $r.Duration.TotalSeconds)
    }
    $failed = @($results | Where-Object { -not $_.Succeeded })
    if ($results.Count -ne $plans.Count -or $failed.Count -gt 0) {
        throw "$($failed.Count + $plans.Count - $results.Count) backup(s) failed; every bitmap kept its bits, so the run can be repeated."
    }

    # 4-5. Retention, then verification, per disk.
    foreach ($r in $results) {
        $merge = Merge-BackupChain -Path $r.Target -Keep $Keep -BytesPerSecond $BytesPerSecond -Wait -ErrorAction Stop
        if ($merge.MergedImage) {
            Write-Log ("[{0}] retention: {1} -> {2} backups; '{3}' now holds the merged ones; {4} file(s) deleted." -f $r.Node, $merge.ImagesBefore, $merge.ImagesAfter, (Split-Path -Leaf $merge.MergedImage), $merge.Removed.Count)
        }
        else {
            Write-Log ("[{0}] retention: {1} backup(s), nothing to merge." -f $r.Node, $merge.ImagesAfter)
        }
        $check = Test-IncrementalBackup -Path $r.Target -Manifest "$($r.Target).digests" -ErrorAction Stop
        if (-not $check.Passed) {
            throw "The chain of '$($r.Target)' did not pass its verification: $(@($check.Problems) -join '; ') $(if ($null -ne $check.FirstDifference) { "it differs from its manifest at offset $($check.FirstDifference)" })"
        }
        Write-Log ("[{0}] verified: the chain of {1} image(s) is sound and reads what the backup copied." -f $r.Node, $merge.ImagesAfter)
    }
    Write-Log "Nightly backup $stamp done: $($results.Count) disk(s) backed up, merged and verified."
    $exitCode = 0
}
catch {
    $id = if ($_.FullyQualifiedErrorId) { " ($($_.FullyQualifiedErrorId -replace ',.*$', ''))" } else { '' }
    Write-Log "FAILED: $($_.Exception.Message)$id"
}
finally {
    foreach ($name in $opened) {
        try { Close-BlockNode -Node $name -ErrorAction Stop -WarningAction SilentlyContinue }
        catch { Write-Log "[$name] could not be closed: $($_.Exception.Message)" }
    }
    if ($TranscriptPath) { $null = Stop-Transcript }
}
exit $exitCode
