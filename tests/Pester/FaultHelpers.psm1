<#
.SYNOPSIS
    Helpers of the fault campaign (Faults.Tests.ps1): small tmpfs mounts that give real ENOSPC, filled to an exact
    free space; seeds; dirty-range sets; child pwsh processes that can be killed (kill -9); shadow write logs.
.NOTES
    Mounting needs root (CI runs as root). Every mount is recorded and Dismount-FaultTmpfs -All unmounts what is left
    (lazily when a file is still open), so a failing test never leaves a mount behind.
#>
Set-StrictMode -Version Latest

$script:Mounts = [Collections.Generic.List[string]]::new()
$script:PageSize = 4096L

#region Seeds

function Get-FaultSeed {
    <#
    The seeds of this run. $env:BITMAPBACKUP_FAULT_SEED replays exactly one seed (a failing test names it);
    $env:BITMAPBACKUP_FAULT_SEEDS=N runs N seeds from $env:BITMAPBACKUP_FAULT_SEED_BASE (default: a new random base,
    printed); without either, -Default seeds (fixed, so that the standing suite is reproducible).
    #>
    param([int[]] $Default = @(1))
    if ($env:BITMAPBACKUP_FAULT_SEED) { return [int[]]@([int]$env:BITMAPBACKUP_FAULT_SEED) }
    if ($env:BITMAPBACKUP_FAULT_SEEDS) {
        $count = [int]$env:BITMAPBACKUP_FAULT_SEEDS
        $base = if ($env:BITMAPBACKUP_FAULT_SEED_BASE) { [int]$env:BITMAPBACKUP_FAULT_SEED_BASE } else { [Random]::new().Next(1000, 1000000) }
        return [int[]]@(0..($count - 1) | ForEach-Object { $base + $_ })
    }
    return $Default
}

function Test-FaultFullSweep {
    <# True for the long campaign (build.ps1 Faults, or BITMAPBACKUP_FAULT_SWEEP=Full): sweep free space finely. #>
    return $env:BITMAPBACKUP_FAULT_SWEEP -eq 'Full'
}

#endregion

#region tmpfs

function Test-FaultRoot {
    <# Whether this process runs as root (mount needs it). #>
    if (-not $IsLinux) { return $false }
    return ((& id -u) -eq '0')
}

function Mount-FaultTmpfs {
    <#
    Mount a tmpfs of -Size bytes (a multiple of 4 KiB) on a new folder under -Parent; returns the folder, or $null when
    it cannot be mounted (not root, no mount): the caller skips. Recorded for Dismount-FaultTmpfs -All.
    #>
    param([Parameter(Mandatory)] [long] $Size, [Parameter(Mandatory)] [string] $Parent)
    if (-not (Test-FaultRoot)) { return $null }
    $dir = Join-Path $Parent ('tmpfs' + [guid]::NewGuid().ToString('N').Substring(0, 8))
    $null = New-Item -ItemType Directory -Path $dir
    $out = & mount -t tmpfs -o "size=$Size,mode=0755" tmpfs $dir 2>&1
    if ($LASTEXITCODE -ne 0) {
        Write-Warning "mount -t tmpfs failed on '$dir': $out"
        Remove-Item $dir -Force -ErrorAction SilentlyContinue
        return $null
    }
    $script:Mounts.Add($dir)
    return $dir
}

function Dismount-FaultTmpfs {
    <# Unmount one tmpfs (or -All recorded ones); a busy one is detached lazily (umount -l). Never throws. #>
    param([string] $Path, [switch] $All)
    $paths = if ($All) { @($script:Mounts) } else { @($Path) }
    foreach ($p in $paths) {
        if (-not $p) { continue }
        $null = & umount $p 2>&1
        if ($LASTEXITCODE -ne 0) { $null = & umount -l $p 2>&1 }
        $null = $script:Mounts.Remove($p)
        Remove-Item $p -Force -Recurse -ErrorAction SilentlyContinue
    }
}

function Get-FaultMountList {
    <# The tmpfs folders still mounted by this process (a test asserts none is left). #>
    return [string[]]@($script:Mounts)
}

function Get-TmpfsFree {
    <# Bytes free on the file system of -Path (statvfs). #>
    param([Parameter(Mandatory)] [string] $Path)
    return [IO.DriveInfo]::new($Path).AvailableFreeSpace
}

function Get-TmpfsUsed {
    param([Parameter(Mandatory)] [string] $Path)
    $d = [IO.DriveInfo]::new($Path)
    return $d.TotalSize - $d.AvailableFreeSpace
}

function Set-TmpfsFree {
    <#
    Leave exactly -Free bytes (rounded down to 4 KiB pages) free on the tmpfs at -Mount, by (re)allocating its filler
    file (fallocate); -Free larger than what the files other than the filler leave is as much as there is. Returns the
    free bytes.
    #>
    param([Parameter(Mandatory)] [string] $Mount, [Parameter(Mandatory)] [long] $Free)
    $filler = Join-Path $Mount '.filler'
    if (Test-Path -LiteralPath $filler) { Remove-Item -LiteralPath $filler -Force }
    $Free = [Math]::Max(0, $Free - ($Free % $script:PageSize))
    $avail = Get-TmpfsFree $Mount
    $need = $avail - $Free
    if ($need -gt 0) {
        $o = [IO.FileStreamOptions]@{ Mode = 'CreateNew'; Access = 'Write'; PreallocationSize = $need }
        ([IO.FileStream]::new($filler, $o)).Dispose()
    }
    return (Get-TmpfsFree $Mount)
}

function Clear-TmpfsFiller {
    <# Free the space the filler holds. #>
    param([Parameter(Mandatory)] [string] $Mount)
    $filler = Join-Path $Mount '.filler'
    if (Test-Path -LiteralPath $filler) { Remove-Item -LiteralPath $filler -Force }
}

function Clear-TmpfsContent {
    <# Delete everything on the tmpfs (files and folders), filler included. #>
    param([Parameter(Mandatory)] [string] $Mount)
    Get-ChildItem -LiteralPath $Mount -Force | Remove-Item -Recurse -Force
}

#endregion

#region Data and shadows

function New-FaultData {
    <# -Length bytes from -Rng: half of each 4 KiB block random, half one repeated byte (compresses to about half). #>
    param([Parameter(Mandatory)] [Random] $Rng, [Parameter(Mandatory)] [int] $Length)
    $bytes = [byte[]]::new($Length)
    $Rng.NextBytes($bytes)
    $fill = [byte]$Rng.Next(1, 256)
    for ($i = 0; $i -lt $Length; $i += 4096) {
        [Array]::Fill($bytes, $fill, $i, [Math]::Min(2048, $Length - $i))
    }
    return , $bytes
}

function Read-NodeBytes {
    <# Everything a node reads now, as one array. #>
    param([Parameter(Mandatory)] [string] $Node)
    $size = (Get-BlockNode -Name $Node -ErrorAction Stop).Size
    return , [byte[]](Read-BlockNode -Node $Node -Offset 0 -Length $size -ErrorAction Stop)
}

function Get-FirstDifference {
    <# Offset of the first byte where two arrays differ, or -1. #>
    param([Parameter(Mandatory)] [byte[]] $A, [Parameter(Mandatory)] [byte[]] $B)
    if ($A.Length -ne $B.Length) { return [long][Math]::Min($A.Length, $B.Length) }
    if ([Linq.Enumerable]::SequenceEqual($A, $B)) { return -1L }
    foreach ($c in (Get-DifferentCluster -A $A -B $B -Granularity 4KB)) {
        for ($i = $c * 4KB; $i -lt [Math]::Min(($c + 1) * 4KB, $A.Length); $i++) { if ($A[$i] -ne $B[$i]) { return [long]$i } }
    }
    return -1L
}

function Read-ShadowLog {
    <#
    The writes a child logged (lines 'W <k> <offset> <length> <data|zero> <dataSeed>' before a write and 'E <k>' after
    it returned, 'F <k>' when it failed): objects with K, Offset, Length, Zero, Seed, Ended, Failed, Line (log line).
    #>
    param([Parameter(Mandatory)] [string] $Path)
    $writes = [ordered]@{}
    $n = 0
    foreach ($line in (Get-Content -LiteralPath $Path -ErrorAction SilentlyContinue)) {
        $n++
        $f = $line -split ' '
        switch ($f[0]) {
            'W' { $writes[$f[1]] = [pscustomobject]@{ K = [int]$f[1]; Offset = [long]$f[2]; Length = [int]$f[3]; Zero = ($f[4] -eq 'zero'); Seed = [int]$f[5]; Ended = $false; Failed = $false; Line = $n } }
            'E' { if ($writes.Contains($f[1])) { $writes[$f[1]].Ended = $true } }
            'F' { if ($writes.Contains($f[1])) { $writes[$f[1]].Failed = $true } }
        }
    }
    return @($writes.Values)
}

function Get-ShadowBytes {
    <#
    What a node of -Size bytes (zeros at first) must read after the logged writes: every write that returned applied in
    order; the range of a write that failed or was cut short (Unknown ranges, returned too) may hold anything.
    #>
    param([Parameter(Mandatory)] [long] $Size, [Parameter(Mandatory)] [AllowEmptyCollection()] [object[]] $Writes)
    $bytes = [byte[]]::new($Size)
    $unknown = [Collections.Generic.List[long[]]]::new()
    foreach ($w in $Writes) {
        if ($w.Ended -and -not $w.Failed) {
            if ($w.Zero) { [Array]::Clear($bytes, $w.Offset, $w.Length) }
            else { [Array]::Copy((New-FaultData -Rng ([Random]::new($w.Seed)) -Length $w.Length), 0, $bytes, $w.Offset, $w.Length) }
        }
        else { $unknown.Add([long[]]@($w.Offset, $w.Length)) }
    }
    return [pscustomobject]@{ Bytes = $bytes; Unknown = $unknown }
}

function Assert-ShadowContent {
    <#
    -Actual reads as -Shadow (Get-ShadowBytes) outside its unknown ranges; returns $null, or a text naming the first
    offset that differs.
    #>
    param([Parameter(Mandatory)] [byte[]] $Actual, [Parameter(Mandatory)] $Shadow)
    $expected = [byte[]]$Shadow.Bytes.Clone()
    foreach ($u in $Shadow.Unknown) {
        $len = [Math]::Min($u[1], $Actual.Length - $u[0])
        if ($len -gt 0) { [Array]::Copy($Actual, $u[0], $expected, $u[0], $len) }
    }
    $at = Get-FirstDifference -A $Actual -B $expected
    if ($at -lt 0) { return $null }
    return "offset $at reads $($Actual[$at]), the shadow says $($expected[$at])"
}

#endregion

#region Dirty ranges as cluster sets

function Get-DirtyClusterSet {
    <# The dirty clusters of a bitmap (indices at -Granularity) as a sorted set. #>
    param([Parameter(Mandatory)] [string] $Node, [Parameter(Mandatory)] [string] $Name, [long] $Granularity = 64KB)
    $set = [Collections.Generic.SortedSet[long]]::new()
    foreach ($r in Get-DirtyBitmapRange -Node $Node -Name $Name -ErrorAction Stop) {
        $first = [long][Math]::Floor($r.Offset / $Granularity)
        $last = [long][Math]::Floor(($r.Offset + $r.Length - 1) / $Granularity)
        for ($c = $first; $c -le $last; $c++) { $null = $set.Add($c) }
    }
    return , $set
}

function Add-RangeCluster {
    <# Add the clusters of [Offset, Offset+Length) at -Granularity to -Set. #>
    param([Parameter(Mandatory)] [AllowEmptyCollection()] [Collections.Generic.SortedSet[long]] $Set, [long] $Offset, [long] $Length, [long] $Granularity = 64KB)
    if ($Length -le 0) { return }
    $first = [long][Math]::Floor($Offset / $Granularity)
    $last = [long][Math]::Floor(($Offset + $Length - 1) / $Granularity)
    for ($c = $first; $c -le $last; $c++) { $null = $Set.Add($c) }
}

function Get-MissingCluster {
    <# The clusters of -Expected that -Actual lacks, as text ("none" when Actual is a superset). #>
    param([Collections.Generic.SortedSet[long]] $Expected, [Collections.Generic.SortedSet[long]] $Actual)
    $missing = @($Expected | Where-Object { -not $Actual.Contains($_) })
    if ($missing.Count -eq 0) { return 'none' }
    return ($missing -join ',')
}

function Format-ClusterSet {
    param([Collections.Generic.SortedSet[long]] $Set)
    if ($null -eq $Set -or $Set.Count -eq 0) { return '' }
    return (@($Set) -join ',')
}

#endregion

#region Images and contents

function Get-FaultImageFormat {
    <# 'qcow2' when the file starts with the qcow2 magic, else 'raw'. #>
    param([Parameter(Mandatory)] [string] $Path)
    $fs = [IO.File]::Open($Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
    try {
        $b = [byte[]]::new(4)
        $n = $fs.Read($b, 0, 4)
        if ($n -eq 4 -and $b[0] -eq 0x51 -and $b[1] -eq 0x46 -and $b[2] -eq 0x49 -and $b[3] -eq 0xfb) { return 'qcow2' }
        return 'raw'
    }
    finally { $fs.Dispose() }
}

function Get-QemuCheckU {
    <# qemu-img check -U (the image may be open by a node) of a qcow2 image: ExitCode, Output, corruptions, leaks. #>
    param([Parameter(Mandatory)] [string] $Path)
    $all = @(& qemu-img check -U --output=json -f qcow2 $Path 2>&1)
    $code = $LASTEXITCODE
    $text = (($all | ForEach-Object { "$_" }) -join "`n").Trim()
    $json = (($all | Where-Object { $_ -isnot [Management.Automation.ErrorRecord] } | ForEach-Object { "$_" }) -join "`n").Trim()
    $info = @{}
    try { $info = $json | ConvertFrom-Json -AsHashtable } catch { $info = @{} }
    if ($null -eq $info) { $info = @{} }
    foreach ($key in 'corruptions', 'leaks', 'check-errors') { if (-not $info.ContainsKey($key)) { $info[$key] = 0 } }
    return [pscustomobject]@{ ExitCode = $code; Output = $text; Corruptions = $info['corruptions']; Leaks = $info['leaks']; Errors = $info['check-errors'] }
}

function Invoke-QemuBatch {
    <#
    Run many qemu-img commands in one shell (a PowerShell native call costs more than qemu-img itself): each item is
    @{ Arguments = [string[]]; What = 'text' }; returns one object per item with What, ExitCode and Output.
    #>
    param([Parameter(Mandatory)] [AllowEmptyCollection()] [object[]] $Items, [Parameter(Mandatory)] [string] $TempDirectory)
    if ($Items.Count -eq 0) { return @() }
    $lines = [Collections.Generic.List[string]]::new()
    for ($i = 0; $i -lt $Items.Count; $i++) {
        $quoted = @($Items[$i].Arguments | ForEach-Object { "'" + ($_ -replace "'", "'\''") + "'" }) -join ' '
        $lines.Add("echo '@@begin $i'; qemu-img $quoted 2>&1; echo `"@@end $i `$?`"")
    }
    $file = Join-Path $TempDirectory ('qemu' + [guid]::NewGuid().ToString('N').Substring(0, 8) + '.sh')
    Set-Content -Path $file -Value ($lines -join "`n")
    $out = & bash $file 2>&1 | ForEach-Object { "$_" }
    Remove-Item $file -Force
    $results = @(for ($i = 0; $i -lt $Items.Count; $i++) { [pscustomobject]@{ What = $Items[$i].What; ExitCode = -1; Output = [Collections.Generic.List[string]]::new() } })
    $current = $null
    foreach ($line in $out) {
        if ($line -match '^@@begin (\d+)$') { $current = $results[[int]$Matches[1]]; continue }
        if ($line -match '^@@end (\d+) (\d+)$') { $results[[int]$Matches[1]].ExitCode = [int]$Matches[2]; $current = $null; continue }
        if ($current) { $current.Output.Add($line) }
    }
    foreach ($r in $results) { $r.Output = ($r.Output -join "`n").Trim() }
    return $results
}

function Read-ImageBytes {
    <# What an image (with its chain) reads as, through qemu-img convert to a raw temp file; returns the bytes. #>
    param([Parameter(Mandatory)] [string] $Path, [Parameter(Mandatory)] [string] $TempDirectory)
    $raw = Join-Path $TempDirectory ('read' + [guid]::NewGuid().ToString('N').Substring(0, 8) + '.raw')
    $fmt = Get-FaultImageFormat $Path
    $out = & qemu-img convert -U -f $fmt -O raw $Path $raw 2>&1
    if ($LASTEXITCODE -ne 0) { throw "qemu-img convert '$Path' failed: $out" }
    try { return , [IO.File]::ReadAllBytes($raw) } finally { Remove-Item $raw -Force }
}

function Get-DifferentCluster {
    <# The clusters (at -Granularity) where two byte arrays of the same length differ, as a sorted set. #>
    param([Parameter(Mandatory)] [byte[]] $A, [Parameter(Mandatory)] [byte[]] $B, [long] $Granularity = 64KB)
    if ($A.Length -ne $B.Length) { throw "Lengths differ: $($A.Length) and $($B.Length)." }
    $set = [Collections.Generic.SortedSet[long]]::new()
    if ([Linq.Enumerable]::SequenceEqual($A, $B)) { return , $set }
    $ca = [byte[]]::new($Granularity); $cb = [byte[]]::new($Granularity)
    for ($off = 0L; $off -lt $A.Length; $off += $Granularity) {
        $len = [int][Math]::Min($Granularity, $A.Length - $off)
        if ($len -ne $ca.Length) { $ca = [byte[]]::new($len); $cb = [byte[]]::new($len) }
        [Array]::Copy($A, $off, $ca, 0, $len); [Array]::Copy($B, $off, $cb, 0, $len)
        if (-not [Linq.Enumerable]::SequenceEqual($ca, $cb)) { $null = $set.Add($off / $Granularity) }
    }
    return , $set
}

#endregion

#region Child processes

function Get-ChildPwshArgument {
    <# The arguments that start a child pwsh running -File (under 'dotnet pwsh' the process is dotnet: start pwsh.dll). #>
    param([Parameter(Mandatory)] [string] $File)
    return @((Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-File', $File)
}

function Start-FaultChild {
    <#
    Start a child pwsh on -Script (written to a file in -Directory; the module is imported first, errors stop it), with
    its output and errors in files; returns the Process with .Out and .Err note properties.
    #>
    param([Parameter(Mandatory)] [string] $Script, [Parameter(Mandatory)] [string] $Directory, [string] $Name = 'child')
    $file = Join-Path $Directory "$Name.ps1"
    $head = "`$ErrorActionPreference = 'Stop'; `$ProgressPreference = 'SilentlyContinue'; Import-Module '$env:BITMAPBACKUP_MODULE'`n"
    Set-Content -Path $file -Value ($head + $Script)
    $out = Join-Path $Directory "$Name.out"
    $err = Join-Path $Directory "$Name.err"
    $p = Start-Process -FilePath dotnet -ArgumentList (Get-ChildPwshArgument $file) -PassThru -RedirectStandardOutput $out -RedirectStandardError $err
    $p | Add-Member -NotePropertyName Out -NotePropertyValue $out
    $p | Add-Member -NotePropertyName Err -NotePropertyValue $err
    return $p
}

function Wait-FaultChild {
    <# Wait for a child to exit (bounded); kills it (-9) and throws when it does not. Returns its exit code. #>
    param([Parameter(Mandatory)] $Process, [int] $TimeoutSeconds = 60)
    if (-not $Process.WaitForExit($TimeoutSeconds * 1000)) {
        & kill -9 $Process.Id 2>$null
        $Process.WaitForExit()
        throw "Child pwsh $($Process.Id) did not exit within $TimeoutSeconds s. Output: $(Get-Content -Raw $Process.Out -ErrorAction SilentlyContinue) Errors: $(Get-Content -Raw $Process.Err -ErrorAction SilentlyContinue)"
    }
    $Process.WaitForExit()
    return $Process.ExitCode
}

function Stop-FaultChild {
    <# kill -9 a child (by its id) and wait until it is gone. #>
    param([Parameter(Mandatory)] $Process)
    if (-not $Process.HasExited) { & kill -9 $Process.Id 2>$null }
    $Process.WaitForExit()
}

function Invoke-FaultChild {
    <# Run -Script in a child pwsh to its end (bounded); returns its output lines; throws when it fails. #>
    param([Parameter(Mandatory)] [string] $Script, [Parameter(Mandatory)] [string] $Directory, [string] $Name = 'child', [int] $TimeoutSeconds = 60)
    $p = Start-FaultChild -Script $Script -Directory $Directory -Name $Name
    $code = Wait-FaultChild -Process $p -TimeoutSeconds $TimeoutSeconds
    $out = @(Get-Content -Path $p.Out -ErrorAction SilentlyContinue)
    if ($code -ne 0) { throw "Child pwsh '$Name' failed ($code): $($out -join "`n") $(Get-Content -Raw $p.Err -ErrorAction SilentlyContinue)" }
    return [string[]]$out
}

function Wait-FaultFile {
    <# Wait until -Path exists and holds a line matching -Pattern (bounded), or the process exits. #>
    param([Parameter(Mandatory)] [string] $Path, [string] $Pattern = '.', $Process, [int] $TimeoutSeconds = 60)
    $deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
    while ([DateTime]::UtcNow -lt $deadline) {
        if (Test-Path -LiteralPath $Path) {
            $text = Get-Content -LiteralPath $Path -ErrorAction SilentlyContinue
            if ($text -match $Pattern) { return $true }
        }
        if ($Process -and $Process.HasExited) { return $false }
        Start-Sleep -Milliseconds 20
    }
    return $false
}

#endregion

Export-ModuleMember -Function Get-FaultSeed, Test-FaultFullSweep, New-FaultData, Read-NodeBytes, Get-FirstDifference, Read-ShadowLog,
    Get-ShadowBytes, Assert-ShadowContent, Test-FaultRoot, Mount-FaultTmpfs, Dismount-FaultTmpfs, Get-FaultMountList,
    Get-TmpfsFree, Get-TmpfsUsed, Set-TmpfsFree, Clear-TmpfsFiller, Clear-TmpfsContent,
    Get-DirtyClusterSet, Add-RangeCluster, Get-MissingCluster, Format-ClusterSet,
    Get-FaultImageFormat, Get-QemuCheckU, Invoke-QemuBatch, Read-ImageBytes, Get-DifferentCluster,
    Get-ChildPwshArgument, Start-FaultChild, Wait-FaultChild, Stop-FaultChild, Invoke-FaultChild, Wait-FaultFile
