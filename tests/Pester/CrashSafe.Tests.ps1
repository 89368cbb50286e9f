# Crash-safe bitmaps (issue 21): New-DirtyBitmap -Persistent -CrashSafe keeps a write-intent log beside the image, so
# that after kill -9 the bitmaps load consistent, as a superset of what was written, and the chain goes on with an
# incremental. A child pwsh writes at random offsets and journals each write before issuing it; it is killed at a
# random instant; the test then checks the reopened bitmaps against the journal and the backups against the node.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module (Join-Path $PSScriptRoot 'FaultHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE

    # Child processes: Start-FaultChild, Wait-FaultFile and Stop-FaultChild of FaultHelpers.psm1.

    function Test-Covered {
        <# Whether the dirty ranges (maximal runs, sorted) hold all of [Offset, Offset+Length). #>
        param([object[]] $Ranges, [long] $Offset, [long] $Length)
        foreach ($r in $Ranges) {
            if ($r.Offset -le $Offset -and $Offset + $Length -le $r.Offset + $r.Length) { return $true }
            if ($r.Offset -gt $Offset) { return $false }
        }
        return $false
    }

    # The child's writer: opens the node, then writes pattern (i % 250) + 1 at random 512-aligned offsets inside
    # [$From, $From + $Span), each of 512 B to 64 KiB, appending "i offset length pattern" to the journal *before*
    # issuing it. It touches $Ready after the first write and writes until it is killed. Every 25 writes it disables and
# enables bitmap tog: each state change writes a checkpoint and shrinks the intent while the writes go on.
    $script:WriterScript = @'
param($Path, $Journal, $Ready, $From, $Span, $Seed)
$null = Open-BlockNode -Path $Path -Name cs
$rng = [Random]::new($Seed)
for ($i = 0; $i -lt 100000; $i++) {
    $length = $rng.Next(1, 129) * 512
    $offset = $From + [long]$rng.Next(0, [int](($Span - $length) / 512)) * 512
    $pattern = ($i % 250) + 1
    [IO.File]::AppendAllText($Journal, "$i $offset $length $pattern`n")
    Write-BlockNode -Node cs -Offset $offset -Pattern $pattern -Length $length
    if ($i -eq 0) { Set-Content -Path $Ready -Value ready }
    if ($i % 25 -eq 24) { Disable-DirtyBitmap -Node cs -Name tog; Enable-DirtyBitmap -Node cs -Name tog } # state changes: checkpoints while writing
}
Start-Sleep -Seconds 120
'@
}

Describe 'Crash-safe bitmaps after kill -9 (<Format>)' -Skip:$NoQemu -ForEach @(
    @{ Format = 'Raw'; Extension = '.img' }, @{ Format = 'Qcow2'; Extension = '.qcow2' }
) {
    BeforeEach {
        $dir = New-TestDirectory
        $env:BITMAPBACKUP_STATE_HOME = Join-Path $dir 'state'
    }
    AfterEach {
        Close-TestNode
        Remove-Item Env:BITMAPBACKUP_STATE_HOME -ErrorAction SilentlyContinue
    }

    It 'after each of 5 kills at random instants the bitmaps are recovered consistent, cover every journalled write, the disabled one is unchanged, and incrementals equal the node' {
        $size = 32MB
        $path = Join-Path $dir "cs$Extension"
        $null = New-BlockImage -Path $path -Size $size -Format $Format
        $null = Open-BlockNode -Path $path -Name cs
        Write-BlockNode -Node cs -Offset 0 -Pattern 9 -Length $size # all allocated: a full read would read 32 MiB
        $null = New-DirtyBitmap -Node cs -Name a -Persistent -CrashSafe
        $null = New-DirtyBitmap -Node cs -Name f -Granularity 4KB -Persistent -CrashSafe
        $null = New-DirtyBitmap -Node cs -Name off -Granularity 4KB -Persistent -CrashSafe
        $null = New-DirtyBitmap -Node cs -Name tog -Persistent -CrashSafe
        Write-BlockNode -Node cs -Offset 3MB -Pattern 7 -Length 100KB
        Disable-DirtyBitmap -Node cs -Name off
        $offRanges = @(Get-RangeText cs off)
        $offRanges.Count | Should -BeGreaterThan 0
        $last = @{}
        foreach ($b in 'a', 'f') {
            $last[$b] = (Start-IncrementalBackup -Node cs -Target (Join-Path $dir "$b-0.qcow2") -Sync Full -Bitmap $b -BitmapMode OnSuccess -Wait).Target
        }
        Close-BlockNode cs
        Test-Path "$path.intent" | Should -BeTrue

        $seed = Get-Random
        $rng = [Random]::new($seed) # the instants vary from run to run; the seed in a failure's message replays them
        for ($round = 1; $round -le 5; $round++) {
            $journal = Join-Path $dir "journal-$round"
            $ready = Join-Path $dir "ready-$round"
            $from = ($round - 1) * 6MB + 1MB
            $child = Start-FaultChild -Directory $dir -Name "writer-$round" -Script ("& {`n$script:WriterScript`n} -Path '$path' -Journal '$journal' -Ready '$ready' -From $from -Span 4MB -Seed $($rng.Next())")
            try {
                Wait-FaultFile -Path $ready -Process $child | Should -BeTrue -Because "the writer starts ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))"
                Start-Sleep -Milliseconds ($rng.Next(0, 700)) # the random instant: nothing below depends on it
            }
            finally { Stop-FaultChild $child }
            $writes = @(Get-Content $journal | ForEach-Object { $f = $_ -split ' '; [pscustomobject]@{ Offset = [long]$f[1]; Length = [long]$f[2]; Pattern = [byte]$f[3] } })
            $writes.Count | Should -BeGreaterThan 0

            if ($round -eq 3) {
                # The same files copied elsewhere: the log belongs to another image there, so it is ignored.
                $copyDir = New-TestDirectory
                Copy-Item -Path "$path*" -Destination $copyDir
                $null = Open-BlockNode -Path (Join-Path $copyDir "cs$Extension") -Name copy -WarningVariable copyWarnings -WarningAction SilentlyContinue
                foreach ($b in 'a', 'f') { (Get-DirtyBitmap -Node copy -Name $b).Inconsistent | Should -BeTrue -Because "the log of another image is not trusted ($b)" }
                ($copyWarnings -join "`n") | Should -BeLike '*is ignored*'
                Close-BlockNode copy -WarningAction SilentlyContinue
            }

            $null = Open-BlockNode -Path $path -Name cs -WarningVariable openWarnings -WarningAction SilentlyContinue
            foreach ($b in 'a', 'f') {
                $info = Get-DirtyBitmap -Node cs -Name $b
                $info.Inconsistent | Should -BeFalse -Because "round $round, seed $seed"
                $info.Recovered | Should -BeTrue
                $info.Recording | Should -BeTrue
                $ranges = @(Get-DirtyBitmapRange -Node cs -Name $b)
                for ($i = 0; $i -lt $writes.Count; $i++) {
                    $w = $writes[$i]
                    if (Test-Covered -Ranges $ranges -Offset $w.Offset -Length $w.Length) { continue }
                    # Only the write in flight at the kill may be missing, and only if it never reached the image.
                    $i | Should -Be ($writes.Count - 1) -Because "bitmap $b must cover journalled write $i at $($w.Offset)+$($w.Length) (round $round, seed $seed)"
                    $data = Read-BlockNode -Node cs -Offset $w.Offset -Length $w.Length
                    # (Earlier rounds reuse patterns, so only a write that landed whole can be told apart; a part of it that
                    # landed unmarked would make the incremental below differ from the node.)
                    @($data | Where-Object { $_ -ne $w.Pattern }).Count | Should -BeGreaterThan 0 -Because 'an unmarked write must not have reached the image'
                }
            }
            ($openWarnings -join "`n") | Should -BeLike "*recovered from its write-intent log*"
            (Get-DirtyBitmap -Node cs -Name tog).Inconsistent | Should -BeFalse
            $off = Get-DirtyBitmap -Node cs -Name off
            $off.Inconsistent | Should -BeFalse
            $off.Recording | Should -BeFalse
            @(Get-RangeText cs off) | Should -Be $offRanges

            if ($round -eq 2) {
                # Narrowing a recovered bitmap reads only the regions it marks, not the disk.
                $marked = (Get-DirtyBitmap -Node cs -Name f).Count
                $fRanges = @(Get-DirtyBitmapRange -Node cs -Name f)
                $u = Update-DirtyBitmap -Node cs -Name f
                $u.Narrowed | Should -BeTrue
                $u.BytesRead | Should -BeGreaterThan 0
                $c = $u.ClusterSize
                $markedClusters = ($fRanges | ForEach-Object { [Math]::Ceiling(($_.Offset + $_.Length) / $c) * $c - [Math]::Floor($_.Offset / $c) * $c } | Measure-Object -Sum).Sum
                $u.BytesRead | Should -BeLessOrEqual $markedClusters -Because 'only the clusters the recovered bitmap marks are read'
                $u.BytesRead | Should -BeLessOrEqual 12MB -Because 'the writes fell in 4 MiB of a 32 MiB disk'
                (Get-DirtyBitmap -Node cs -Name f).Count | Should -BeLessOrEqual $marked
            }

            foreach ($b in 'a', 'f') {
                $r = Start-IncrementalBackup -Node cs -Target (Join-Path $dir "$b-$round.qcow2") -Sync Incremental -Bitmap $b -BackingFile (Split-Path -Leaf $last[$b]) -Wait
                # The writes fell in 4 regions of 1 MiB; the log marks at most 3x that (a dense group doubles, marking ahead
                # adds at most the run before it: IntentMarking).
                $r.BytesRead | Should -BeLessOrEqual 12MB -Because 'an incremental after a crash reads what may have changed, not the 32 MiB disk'
                $last[$b] = $r.Target
            }
            Close-BlockNode cs
            foreach ($b in 'a', 'f') { Assert-QemuImageEqual -Path $last[$b] -Reference $path }
        }
        if ($Format -eq 'Qcow2') {
            $check = Get-QemuImageCheck -Path $path
            $check.corruptions | Should -Be 0 -Because "qemu-img check said: $($check.Output)"
        }
    }
}

Describe 'Crash-safe bitmaps: bad input' {
    BeforeEach {
        $dir = New-TestDirectory
        $env:BITMAPBACKUP_STATE_HOME = Join-Path $dir 'state'
    }
    AfterEach {
        Close-TestNode
        Remove-Item Env:BITMAPBACKUP_STATE_HOME -ErrorAction SilentlyContinue
    }

    It '-CrashSafe without -Persistent is refused with CrashSafeRequiresPersistent, nothing changed' {
        $path = New-TestImage -Directory $dir -Size 4MB
        $null = Open-BlockNode -Path $path -Name np
        { New-DirtyBitmap -Node np -Name b -CrashSafe -ErrorAction Stop } |
            Should -Throw -ErrorId 'CrashSafeRequiresPersistent,BitmapBackup.NewDirtyBitmapCommand'
        @(Get-DirtyBitmap -Node np).Count | Should -Be 0
        Test-Path "$path.intent" | Should -BeFalse
    }

    It 'a read-only node is refused with CrashSafeNodeReadOnly' {
        $path = New-TestImage -Directory $dir -Size 4MB
        $null = Open-BlockNode -Path $path -Name ro -ReadOnly
        { New-DirtyBitmap -Node ro -Name b -Persistent -CrashSafe -ErrorAction Stop } |
            Should -Throw -ErrorId 'CrashSafeNodeReadOnly,BitmapBackup.NewDirtyBitmapCommand'
        @(Get-DirtyBitmap -Node ro).Count | Should -Be 0
        Test-Path "$path.intent" | Should -BeFalse
    }

    It 'a log that cannot be created is refused with IntentLogUnavailable, nothing changed (<Format>)' -ForEach @(
        @{ Format = 'Raw'; Extension = '.img' }, @{ Format = 'Qcow2'; Extension = '.qcow2' }
    ) {
        # A folder where the log must go: no process, root included, can put a file there.
        $path = Join-Path $dir "nl$Extension"
        $null = New-BlockImage -Path $path -Size 4MB -Format $Format
        $null = New-Item -ItemType Directory -Path "$path.intent"
        Set-Content -Path (Join-Path "$path.intent" 'keep') -Value keep
        $null = Open-BlockNode -Path $path -Name nl
        { New-DirtyBitmap -Node nl -Name b -Persistent -CrashSafe -ErrorAction Stop } |
            Should -Throw -ErrorId 'IntentLogUnavailable,BitmapBackup.NewDirtyBitmapCommand' -ExpectedMessage "*'$path.intent' cannot be written beside the image*"
        @(Get-DirtyBitmap -Node nl).Count | Should -Be 0
        Close-BlockNode nl
        @(Get-DirtyBitmap -Path $path).Count | Should -Be 0 -Because 'the image stores no bitmap'
        Test-Path "$path.intent.tmp" | Should -BeFalse
        Test-Path (Join-Path "$path.intent" 'keep') | Should -BeTrue
    }

    It 'a clean close leaves the log empty and the bitmaps not recovered' {
        $path = New-TestImage -Directory $dir -Size 8MB
        $null = Open-BlockNode -Path $path -Name cc
        $null = New-DirtyBitmap -Node cc -Name b -Persistent -CrashSafe
        Write-BlockNode -Node cc -Offset 1MB -Pattern 3 -Length 64KB
        Close-BlockNode cc
        $null = Open-BlockNode -Path $path -Name cc -WarningVariable w
        $w.Count | Should -Be 0
        $b = Get-DirtyBitmap -Node cc -Name b
        $b.CrashSafe | Should -BeTrue
        $b.Recovered | Should -BeFalse
        $b.Inconsistent | Should -BeFalse
        Get-RangeText cc b | Should -Be @('1048576+65536')
    }
}

Describe 'Set-DirtyBitmap -CrashSafe (an existing bitmap, its bits kept)' {
    BeforeEach {
        $dir = New-TestDirectory
        $env:BITMAPBACKUP_STATE_HOME = Join-Path $dir 'state'
    }
    AfterEach {
        Close-TestNode
        Remove-Item Env:BITMAPBACKUP_STATE_HOME -ErrorAction SilentlyContinue
    }

    It 'turns a recording persistent bitmap crash-safe and back (<Format>), the bits kept, the log written and removed, -Path says so' -ForEach @(
        @{ Format = 'Raw'; Extension = '.img' }, @{ Format = 'Qcow2'; Extension = '.qcow2' }
    ) {
        $path = Join-Path $dir "sd$Extension"
        $null = New-BlockImage -Path $path -Size 8MB -Format $Format
        $null = Open-BlockNode -Path $path -Name sd
        $null = New-DirtyBitmap -Node sd -Name b -Persistent
        $null = New-DirtyBitmap -Node sd -Name other -Persistent
        Write-BlockNode -Node sd -Offset 1MB -Pattern 3 -Length 64KB
        Test-Path "$path.intent" | Should -BeFalse

        Set-DirtyBitmap -Node sd -Name b -CrashSafe -WhatIf
        (Get-DirtyBitmap -Node sd -Name b).CrashSafe | Should -BeFalse -Because '-WhatIf changes nothing'

        $after = Set-DirtyBitmap -Node sd -Name b -CrashSafe -PassThru
        $after.CrashSafe | Should -BeTrue
        $after.Count | Should -Be 64KB
        Test-Path "$path.intent" | Should -BeTrue
        (Get-DirtyBitmap -Node sd -Name other).CrashSafe | Should -BeFalse
        @(Set-DirtyBitmap -Node sd -Name b -CrashSafe -Verbose 4>&1 | ForEach-Object Message) | Should -Contain "Bitmap 'b' of node 'sd' is already crash-safe: nothing changed." 
        Write-BlockNode -Node sd -Offset 3MB -Pattern 4 -Length 64KB
        Close-BlockNode sd
        $stored = @(Get-DirtyBitmap -Path $path | Sort-Object Name)
        $stored.Name | Should -Be @('b', 'other')
        $stored.CrashSafe | Should -Be @($true, $false)
        $stored.Recoverable | Should -Be @($false, $false)

        $null = Open-BlockNode -Path $path -Name sd
        (Get-DirtyBitmap -Node sd -Name b).CrashSafe | Should -BeTrue -Because 'the clean log names it'
        Get-DirtyBitmap -Node sd -Name b | Set-DirtyBitmap -CrashSafe:$false
        $b = Get-DirtyBitmap -Node sd -Name b
        $b.CrashSafe | Should -BeFalse
        Get-RangeText sd b | Should -Be @('1048576+65536', '3145728+65536')
        Test-Path "$path.intent" | Should -BeFalse -Because 'no crash-safe bitmap is left'
        Close-BlockNode sd
        (Get-DirtyBitmap -Path $path -Name b).CrashSafe | Should -BeFalse
    }

    It 'refuses, nothing changed: <Case>' -ForEach @(
        @{ Case = 'a bitmap that is not persistent (CrashSafeRequiresPersistent)'; Id = 'CrashSafeRequiresPersistent'; Persistent = $false; ReadOnly = $false; Blocked = $false }
        @{ Case = 'a read-only node (CrashSafeNodeReadOnly)'; Id = 'CrashSafeNodeReadOnly'; Persistent = $true; ReadOnly = $true; Blocked = $false }
        @{ Case = 'a log that cannot be created (IntentLogUnavailable)'; Id = 'IntentLogUnavailable'; Persistent = $true; ReadOnly = $false; Blocked = $true }
    ) {
        $path = New-TestImage -Directory $dir -Size 4MB
        if ($ReadOnly) {
            $null = Open-BlockNode -Path $path -Name rf
            $null = New-DirtyBitmap -Node rf -Name b -Persistent
            Close-BlockNode rf
            $null = Open-BlockNode -Path $path -Name rf -ReadOnly
        }
        else {
            $null = Open-BlockNode -Path $path -Name rf
            $null = New-DirtyBitmap -Node rf -Name b -Persistent:$Persistent
            Write-BlockNode -Node rf -Offset 0 -Pattern 1 -Length 64KB
        }
        if ($Blocked) {
            # A folder where the log must go: no process, root included, can put a file there.
            $null = New-Item -ItemType Directory -Path "$path.intent"
            Set-Content -Path (Join-Path "$path.intent" 'keep') -Value keep
        }
        $before = Get-DirtyBitmap -Node rf -Name b
        { Set-DirtyBitmap -Node rf -Name b -CrashSafe -ErrorAction Stop } | Should -Throw -ErrorId "$Id,BitmapBackup.SetDirtyBitmapCommand"
        $b = Get-DirtyBitmap -Node rf -Name b
        $b.CrashSafe | Should -BeFalse
        $b.Count | Should -Be $before.Count
        Test-Path "$path.intent" -PathType Leaf | Should -BeFalse
        if (-not $ReadOnly) {
            Write-BlockNode -Node rf -Offset 1MB -Pattern 2 -Length 64KB
            (Get-DirtyBitmap -Node rf -Name b).Count | Should -Be ($before.Count + 64KB) -Because 'the bitmap goes on recording'
        }
    }

    It 'refuses a busy bitmap (an export uses it) with BitmapBusy' {
        $path = New-TestImage -Directory $dir -Size 4MB
        $null = Open-BlockNode -Path $path -Name bz
        $null = New-DirtyBitmap -Node bz -Name b -Persistent
        $socket = Join-Path $dir 'bz.sock'
        $export = Start-BlockExport -Node bz -Socket $socket -Bitmap b -Writable
        try {
            { Set-DirtyBitmap -Node bz -Name b -CrashSafe -ErrorAction Stop } | Should -Throw -ErrorId 'BitmapBusy,BitmapBackup.SetDirtyBitmapCommand'
        }
        finally { Stop-BlockExport -Name $export.Name -Confirm:$false }
        (Get-DirtyBitmap -Node bz -Name b).CrashSafe | Should -BeFalse
    }
}

Describe 'Crash-safe bitmaps: where the log goes, and Set-DirtyBitmap in a transaction' {
    BeforeEach {
        $dir = New-TestDirectory
        $env:BITMAPBACKUP_STATE_HOME = Join-Path $dir 'state'
    }
    AfterEach {
        Close-TestNode
        Remove-Item Env:BITMAPBACKUP_STATE_HOME -ErrorAction SilentlyContinue
    }

    It 'keeps the log of a raw file whose bitmaps are in a -BitmapStore folder beside them there, not beside the image' {
        $path = New-TestImage -Directory $dir -Size 4MB
        $store = Join-Path $dir 'store'
        $null = Open-BlockNode -Path $path -Name st -BitmapStore $store
        $null = New-DirtyBitmap -Node st -Name b -Persistent -CrashSafe
        Test-Path "$path.intent" | Should -BeFalse
        $logs = @(Get-ChildItem -Recurse -Path $store -Filter '*.intent')
        $logs.Count | Should -Be 1
        $logs[0].FullName | Should -Be "$((Get-BlockNode st).BitmapStore).intent"
        Close-BlockNode st
        (Get-DirtyBitmap -Path $path -BitmapStore $store).CrashSafe | Should -BeTrue -Because 'the reader looks where the writer wrote'
    }

    It 'a log that cannot be created in a -BitmapStore folder is refused with IntentLogUnavailable naming that folder, nothing changed' {
        $path = New-TestImage -Directory $dir -Size 4MB
        $store = Join-Path $dir 'store-nl'
        $null = Open-BlockNode -Path $path -Name snl -BitmapStore $store
        $log = "$((Get-BlockNode snl).BitmapStore).intent"
        $null = New-Item -ItemType Directory -Force -Path $log # a folder where the log must go
        Set-Content -Path (Join-Path $log 'keep') -Value keep
        { New-DirtyBitmap -Node snl -Name b -Persistent -CrashSafe -ErrorAction Stop } |
            Should -Throw -ErrorId 'IntentLogUnavailable,BitmapBackup.NewDirtyBitmapCommand' -ExpectedMessage "*'$log' cannot be written in the bitmap state folder*"
        @(Get-DirtyBitmap -Node snl).Count | Should -Be 0
        Test-Path "$path.intent" | Should -BeFalse -Because 'nothing is written beside the image either'
        Close-BlockNode snl
        @(Get-DirtyBitmap -Path $path -BitmapStore $store).Count | Should -Be 0
        Test-Path (Join-Path $log 'keep') | Should -BeTrue
    }

    It 'acts at once inside Invoke-BitmapTransaction (it is not one of its actions)' {
        $path = New-TestImage -Directory $dir -Size 4MB
        $null = Open-BlockNode -Path $path -Name tx
        $null = New-DirtyBitmap -Node tx -Name b -Persistent
        Invoke-BitmapTransaction -Confirm:$false {
            Set-DirtyBitmap -Node tx -Name b -CrashSafe -Confirm:$false
            (Get-DirtyBitmap -Node tx -Name b).CrashSafe | Should -BeTrue -Because 'the change is made before the block goes on'
        }
        (Get-DirtyBitmap -Node tx -Name b).CrashSafe | Should -BeTrue
        Test-Path "$path.intent" | Should -BeTrue
    }
}
