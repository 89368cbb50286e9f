# Writes reach the disk (issue 23, part 1): Sync-BlockNode, -Cache WriteThrough, the write-back window and the sync at a
# backup's start, each proved by kill -9 of a child pwsh at a random instant and qemu-io reading the image afterwards.
# And no dirty bit is lost on the way (issue 15): a write that fails on a full filesystem is marked, and a resize marks
# what it changes.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-io -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE

    function Start-ChildPwsh {
        <#
        Start a script in a fresh pwsh that imports the module (pwsh.dll itself, so that kill -9 kills PowerShell).
        The script goes through a file: Start-Process would strip the quotes of a -Command argument.
        #>
        param([Parameter(Mandatory)] [string] $Script)
        $file = Join-Path (New-TestDirectory) 'child.ps1'
        Set-Content -Path $file -Value "`$ErrorActionPreference = 'Stop'; Import-Module '$env:BITMAPBACKUP_MODULE'`n$Script"
        return Start-Process -FilePath dotnet -ArgumentList @((Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-File', $file) -PassThru
    }

    function Wait-LogLine {
        <# Wait until the child's log has a line matching $Pattern (or the child died); returns the log's lines. #>
        param([string] $Log, [string] $Pattern, $Child, [int] $TimeoutSeconds = 30)
        $deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
        while ([DateTime]::UtcNow -lt $deadline) {
            $lines = @(if (Test-Path $Log) { Get-Content $Log })
            if ($lines -match $Pattern) { return $lines }
            if ($Child.HasExited) { throw "the child pwsh exited ($($Child.ExitCode)) before logging '$Pattern'" }
            Start-Sleep -Milliseconds 50
        }
        throw "the child pwsh did not log '$Pattern' within $TimeoutSeconds s"
    }

    function Stop-ChildHard($Child) {
        & kill -9 $Child.Id 2>$null
        $Child.WaitForExit()
    }

    function Test-Pattern {
        <# Does qemu-io (read-only, the image closed by everyone) read $Pattern over the range? #>
        param([string] $Path, [string] $Format, [long] $Offset, [long] $Length, [int] $Pattern)
        $out = & qemu-io -r -f $Format -c "read -P $Pattern $Offset $Length" $Path 2>&1
        return ($LASTEXITCODE -eq 0 -and -not ($out -match 'fail|Pattern verification'))
    }

    function Get-PatternMismatch {
        <#
        Read every write back with one qemu-io (read-only, the image closed by everyone); returns the indexes i whose
        range (i * 64 KiB, $Length bytes) does not read pattern (i % 250) + 1. Fails if qemu-io could not read at all.
        #>
        param([string] $Path, [string] $Format, [int[]] $Index, [long] $Length)
        if ($Index.Count -eq 0) { return @() }
        $commands = foreach ($i in $Index) { '-c'; "read -P $(($i % 250) + 1) $($i * 64KB) $Length" }
        $out = @(& qemu-io -r -f $Format @commands $Path 2>&1 | ForEach-Object { "$_" })
        $failed = @($out | Where-Object { $_ -match '^Pattern verification failed at offset (\d+)' } | ForEach-Object { [int]([long]$Matches[1] / 64KB) })
        @($out | Where-Object { $_ -match '^read \d+/\d+ bytes' }).Count | Should -Be $Index.Count -Because "qemu-io read every range: $($out -join "`n")"
        return $failed
    }

    # The child's writer: write number i puts pattern (i % 250) + 1 at i * 64 KiB (4 KiB or 64 KiB long), then logs
    # "w <i> <ticks>"; after -SyncAfter writes it syncs and logs "synced <i>"; then it keeps writing until killed.
    $script:WriterScript = @'
param($Path, $Cache, $Length, $SyncAfter, $Log, $Pause)
$null = Open-BlockNode -Path $Path -Name disk -Cache $Cache
for ($i = 0; $i -lt 1000; $i++) {
    Write-BlockNode -Node disk -Offset ($i * 64KB) -Pattern (($i % 250) + 1) -Length $Length
    [IO.File]::AppendAllText($Log, "w $i $([DateTime]::UtcNow.Ticks)`n")
    if ($i + 1 -eq $SyncAfter) { Sync-BlockNode -Node disk; [IO.File]::AppendAllText($Log, "synced $i`n") }
    if ($Pause) { Start-Sleep -Milliseconds $Pause }
}
[IO.File]::AppendAllText($Log, "done`n")
Start-Sleep -Seconds 120
'@
}

Describe 'Durability after kill -9 (<Format>, <Cache>)' -Skip:$NoQemu -ForEach @(
    # Ten runs per format, each killed at its own random instant.
    @{ Format = 'qcow2'; Cache = 'WriteBack'; Runs = 6; Length = 4KB }
    @{ Format = 'qcow2'; Cache = 'WriteThrough'; Runs = 4; Length = 4KB }
    @{ Format = 'raw'; Cache = 'WriteBack'; Runs = 6; Length = 64KB }
    @{ Format = 'raw'; Cache = 'WriteThrough'; Runs = 4; Length = 4KB }
) {
    BeforeAll {
        $dir = New-TestDirectory
        $writerPath = Join-Path $dir 'writer.ps1'
        Set-Content -Path $writerPath -Value $WriterScript
    }

    It 'keeps every write made before Sync-BlockNode (and, write-through, every write that returned): run <_>' -ForEach (1..$Runs) {
        $seed = Get-Random
        $rng = [Random]::new($seed)
        $path = Join-Path $dir "d$_.$Format"
        $log = Join-Path $dir "d$_.log"
        $null = New-BlockImage -Path $path -Size 64MB -Format $Format
        $syncAfter = $rng.Next(5, 60)
        $child = Start-ChildPwsh "& '$writerPath' -Path '$path' -Cache $Cache -Length $Length -SyncAfter $syncAfter -Log '$log' -Pause 2"
        try {
            $null = Wait-LogLine -Log $log -Pattern '^synced' -Child $child
            Start-Sleep -Milliseconds $rng.Next(0, 400)   # a random instant after the sync, writes going on
        }
        finally { Stop-ChildHard $child }
        $lines = @(Get-Content $log)
        $written = @($lines | Where-Object { $_ -match '^w ' } | ForEach-Object { [int]($_ -split ' ')[1] })
        $written.Count | Should -BeGreaterOrEqual $syncAfter
        $mustSurvive = if ($Cache -eq 'WriteThrough') { $written } else { @($written | Where-Object { $_ -lt $syncAfter }) }
        Get-PatternMismatch -Path $path -Format $Format -Index $mustSurvive -Length $Length |
            Should -BeNullOrEmpty -Because "these writes returned before the kill ($Cache, synced after $syncAfter; seed $seed)"
        if ($Format -eq 'qcow2') {
            $c = Get-QemuImageCheck -Path $path
            $c.corruptions | Should -Be 0 -Because "a crash may leak clusters but never corrupts (seed $seed): $($c.Output)"
            $c.'check-errors' | Should -Be 0
            $c.ExitCode | Should -BeIn @(0, 3)
        }
    }
}

Describe 'Durability without an explicit sync' -Skip:$NoQemu {
    BeforeAll { $dir = New-TestDirectory }

    It 'writes back a qcow2 node within its window: writes older than the window plus a second survive kill -9' {
        $path = Join-Path $dir 'w.qcow2'
        $log = Join-Path $dir 'w.log'
        $null = New-BlockImage -Path $path -Size 64MB
        $child = Start-ChildPwsh @"
`$null = Open-BlockNode -Path '$path' -Name disk
for (`$i = 0; `$i -lt 20; `$i++) { Write-BlockNode -Node disk -Offset (`$i * 64KB) -Pattern (`$i + 1) -Length 4KB }
[IO.File]::AppendAllText('$log', "written`n")
Start-Sleep -Seconds 120
"@
        try {
            $null = Wait-LogLine -Log $log -Pattern '^written' -Child $child
            Start-Sleep -Seconds 6.5   # the 5 s window, plus a second and a half
        }
        finally { Stop-ChildHard $child }
        Get-PatternMismatch -Path $path -Format qcow2 -Index (0..19) -Length 4KB | Should -BeNullOrEmpty -Because 'these writes are older than the write-back window'
        (Get-QemuImageCheck -Path $path).ExitCode | Should -Be 0
    }

    It 'syncs the source at a backup''s start: the disk never loses data its backup holds (the issue''s kill -9 after a full backup)' {
        $path = Join-Path $dir 'n.qcow2'
        $full = Join-Path $dir 'n-full.qcow2'
        $log = Join-Path $dir 'n.log'
        $null = New-BlockImage -Path $path -Size 64MB
        $child = Start-ChildPwsh @"
`$null = Open-BlockNode -Path '$path' -Name disk
Write-BlockNode -Node disk -Offset 0 -Pattern 0xab -Length 1MB
`$null = Start-IncrementalBackup -Node disk -Target '$full' -Sync Full -Wait
[IO.File]::AppendAllText('$log', "backed up`n")
Start-Sleep -Seconds 120
"@
        try { $null = Wait-LogLine -Log $log -Pattern '^backed up' -Child $child }   # killed at once: well inside the window
        finally { Stop-ChildHard $child }
        Test-Pattern -Path $path -Format qcow2 -Offset 0 -Length 1MB -Pattern 0xab | Should -BeTrue
        Assert-QemuImageEqual -Path $full -Reference $path
        $c = Get-QemuImageCheck -Path $path
        $c.corruptions | Should -Be 0
    }
}

Describe 'No dirty bit lost on a full filesystem (<Format>)' -Skip:$NoQemu -ForEach @(
    @{ Format = 'raw'; Extension = '.img' }
    @{ Format = 'qcow2'; Extension = '.qcow2' }
) {
    BeforeAll {
        $script:canMount = $false
        $mnt = New-TestDirectory
        if ((& id -u) -eq '0') {
            & mount -t tmpfs -o size=4m tmpfs $mnt 2>$null
            $script:canMount = $LASTEXITCODE -eq 0
        }
    }
    AfterAll {
        Close-TestNode
        if ($canMount) { & umount $mnt 2>$null; if ($LASTEXITCODE -ne 0) { & umount -l $mnt } }
    }

    It 'marks the whole range of a write that failed with ENOSPC; the bitmap stored at close says so in a new process; the incremental equals the node' {
        if (-not $canMount) { Set-ItResult -Skipped -Because 'a tmpfs can only be mounted as root'; return }
        $dir = New-TestDirectory
        $path = Join-Path $mnt "n$Extension"
        $fullBackup = Join-Path $dir 'full.qcow2'
        $null = New-BlockImage -Path $path -Size 8MB -Format $Format
        $null = Open-BlockNode -Path $path -Name fsn
        Write-BlockNode -Node fsn -Offset 0 -Pattern 1 -Length 1MB
        $null = Start-IncrementalBackup -Node fsn -Target $fullBackup -Sync Full -Wait
        $null = New-DirtyBitmap -Node fsn -Name p -Persistent
        $filler = Join-Path $mnt 'filler'
        [IO.File]::WriteAllBytes($filler, [byte[]]::new([IO.DriveInfo]::new($mnt).AvailableFreeSpace - 200KB))
        { Write-BlockNode -Node fsn -Offset 4MB -Pattern 0x2a -Length 1MB -ErrorAction Stop } |
            Should -Throw -ErrorId 'ImageIOFailed,BitmapBackup.WriteBlockNodeCommand' -ExpectedMessage '*No space left on device*'
        Get-RangeText -Node fsn -Name p | Should -Be @('4194304+1048576')
        Remove-Item $filler
        Close-BlockNode fsn
        @(Get-ChildItem $mnt -Filter '*.tmp').Count | Should -Be 0
        if ($Format -eq 'qcow2') { $null = Assert-QemuImageCheck -Path $path }
        $out = & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -Command @"
`$ErrorActionPreference = 'Stop'; Import-Module '$env:BITMAPBACKUP_MODULE'
`$null = Open-BlockNode -Path '$path' -Name fsn
`$b = Get-DirtyBitmap -Node fsn -Name p
"`$(`$b.Inconsistent) `$(`$b.Count)"
`$null = Start-IncrementalBackup -Node fsn -Target '$(Join-Path $dir 'inc.qcow2')' -Sync Incremental -Bitmap p -BackingFile full.qcow2 -Wait
Close-BlockNode fsn
"@ 2>&1
        $LASTEXITCODE | Should -Be 0 -Because "$out"
        $state = ($out | Select-Object -First 1) -split ' '
        $state[0] | Should -Be 'False'
        [long]$state[1] | Should -BeGreaterOrEqual 1MB
        Assert-QemuImageEqual -Path (Join-Path $dir 'inc.qcow2') -Reference $path
        if ($Format -eq 'qcow2') { $null = Assert-QemuImageCheck -Path $path }
    }

    It 'marks what a shrink and a grow change: zeros over the tail, shrink, grow, and the incremental equals the node' {
        $dir = New-TestDirectory
        $path = Join-Path $dir "r$Extension"
        $null = New-BlockImage -Path $path -Size 8MB -Format $Format
        $null = Open-BlockNode -Path $path -Name rsz
        Write-BlockNode -Node rsz -Offset 0 -Pattern 0x5c -Length 8MB
        $null = Start-IncrementalBackup -Node rsz -Target (Join-Path $dir 'full.qcow2') -Sync Full -Wait
        $null = New-DirtyBitmap -Node rsz -Name b
        Write-BlockNode -Node rsz -Offset 4MB -Zero -Length 4MB
        Resize-BlockNode -Node rsz -Size 4MB
        Resize-BlockNode -Node rsz -Size 8MB
        (Get-DirtyBitmap -Node rsz -Name b).Count | Should -Be 4MB
        $r = Start-IncrementalBackup -Node rsz -Target (Join-Path $dir 'inc.qcow2') -Sync Incremental -Bitmap b -BackingFile full.qcow2 -Wait
        $r.Succeeded | Should -BeTrue
        Close-BlockNode rsz
        Assert-QemuImageEqual -Path (Join-Path $dir 'inc.qcow2') -Reference $path
    }
}
