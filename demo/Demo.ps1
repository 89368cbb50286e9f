<#
.SYNOPSIS
    The BitmapBackup demo: tracks writes to a sample disk image with dirty bitmaps.
.DESCRIPTION
    Run by `build.ps1 Demo` in a fresh pwsh, with BITMAPBACKUP_MODULE pointing at the staged module.
    Makes a sample raw image in a scratch folder, opens it as a block node, adds dirty bitmaps, writes
    to the disk, and shows what the bitmaps recorded and what enable/disable/merge/clear do.
#>
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$ConfirmPreference = 'None'

$module = if ($env:BITMAPBACKUP_MODULE) { $env:BITMAPBACKUP_MODULE } else { Join-Path $PSScriptRoot '../out/BitmapBackup/BitmapBackup.psd1' }
Import-Module (Resolve-Path $module)

# Tables are wider than the 80 columns of a redirected console: render them at 150.
function Show { param([Parameter(ValueFromPipeline)] $InputObject) end { $input | Format-Table | Out-String -Width 150 | Write-Host } }

$work = Join-Path ([IO.Path]::GetTempPath()) "bitmapbackup-demo-$PID"
$null = New-Item -ItemType Directory -Path $work
try {
    Write-Host "`n# A 256 MiB sample disk, opened as node 'vm1'" -ForegroundColor Cyan
    $image = New-BlockImage -Path (Join-Path $work 'vm1.img') -Size 256MB
    $node = Open-BlockNode -Path $image.Path -Name vm1
    $node | Show

    Write-Host "# Two bitmaps: 'daily' at the default 64 KiB, 'fine' at 4 KiB" -ForegroundColor Cyan
    $node | New-DirtyBitmap -Name daily | Out-Null
    New-DirtyBitmap -Node vm1 -Name fine -Granularity 4KB | Out-Null
    Get-DirtyBitmap -Node vm1 | Show

    Write-Host "# The guest writes: 1 MiB at 10 MiB, 3 bytes at 100 MiB, zeros over 64 KiB at 200 MiB" -ForegroundColor Cyan
    Write-BlockNode -Node vm1 -Offset 10MB -Pattern 0xAB -Length 1MB
    Write-BlockNode -Node vm1 -Offset 100MB -Data ([byte[]](1, 2, 3))
    Write-BlockNode -Node vm1 -Offset 200MB -Zero -Length 64KB
    Get-DirtyBitmap -Node vm1 | Show
    Get-DirtyBitmapRange -Node vm1 -Name daily | Show

    Write-Host "# 'fine' stops recording; a new write lands in 'daily' only" -ForegroundColor Cyan
    Disable-DirtyBitmap -Node vm1 -Name fine
    Write-BlockNode -Node vm1 -Offset 50MB -Pattern 0x11 -Length 4KB
    Get-DirtyBitmap -Node vm1 | Show

    Write-Host "# A third bitmap made as a copy of 'daily' by merging, then 'daily' cleared" -ForegroundColor Cyan
    New-DirtyBitmap -Node vm1 -Name weekly -Disabled | Out-Null
    Merge-DirtyBitmap -Node vm1 -Name weekly -Source daily
    Clear-DirtyBitmap -Node vm1 -Name daily
    Get-DirtyBitmap -Node vm1 | Show

    Write-Host "# The data reads back" -ForegroundColor Cyan
    $bytes = Read-BlockNode -Node vm1 -Offset 100MB -Length 3
    "Read-BlockNode vm1 at 100 MiB: $($bytes -join ', ')"

    Write-Host "`n# Bad input gets a clear error with a stable id" -ForegroundColor Cyan
    try { New-DirtyBitmap -Node vm1 -Name odd -Granularity 1000 -ErrorAction Stop } catch { "$($_.FullyQualifiedErrorId): $($_.Exception.Message)" }
    try { Write-BlockNode -Node vm1 -Offset 256MB -Pattern 1 -Length 1 -ErrorAction Stop } catch { "$($_.FullyQualifiedErrorId): $($_.Exception.Message)" }

    Get-DirtyBitmap -Node vm1 | Remove-DirtyBitmap
    Close-BlockNode -Node vm1
    Write-Host "`nDemo finished." -ForegroundColor Green
}
finally {
    Get-BlockNode | Close-BlockNode -WarningAction SilentlyContinue
    Remove-Item $work -Recurse -Force
}
