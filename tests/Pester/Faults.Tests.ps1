# The standing fault campaign (issues 9 and 15): real faults on real file systems and real process deaths.
#
# - ENOSPC from small tmpfs mounts at every stage of a backup (target creation, data clusters, the commit's metadata
#   write-back, the rename), raw and qcow2 targets, compressed or not, single and grouped jobs, -OnTargetError
#   Report/Stop/Ignore, -BitmapMode OnSuccess/Always: the free space is swept from 0 to what the backup needs.
# - ENOSPC while persistent bitmaps are stored at close (raw sidecar, qcow2 bitmaps extension), and the process
#   dying (kill -9, or a normal exit) while the close keeps failing.
# - A commit that fails: a folder at the final name (while copying, while Pending), an injected sync failure; a
#   target whose storage hangs (fsfreeze of an ext4 loop mount): Stop-Job and Remove-Job -Force stay bounded.
# - Stop-Job and Remove-Job -Force at random instants of a running backup.
# - kill -9 of a child pwsh at random instants of a backup, a persistent-bitmap store and a transaction commit; a
#   normal exit and Remove-Module while a backup runs.
# - Issue 15's shadow model: random writes and zero writes on nodes whose tmpfs is filled to random levels.
#
# Every random choice comes from a seed printed in the test name: BITMAPBACKUP_FAULT_SEED=<n> replays one seed,
# BITMAPBACKUP_FAULT_SEEDS=<count> runs more (build.ps1 Faults), BITMAPBACKUP_FAULT_SWEEP=Full sweeps free space
# page by page. Mounting a tmpfs needs root: without it the tmpfs cases are skipped with a reason.
BeforeDiscovery {
    Import-Module (Join-Path $PSScriptRoot 'FaultHelpers.psm1') -Force
    $script:NoQemuImg = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
    if ($script:NoQemuImg) {
        Write-Warning 'qemu-img is not on PATH: the fault campaign (Faults.Tests.ps1) is skipped (install qemu-utils; CI has it).'
    }
    $script:Seeds = Get-FaultSeed -Default @(1)

    # The ENOSPC sweep scenarios: Kind (Qcow2 incremental on the previous backup, Qcow2Full or Raw full backups
    # that re-anchor the bitmap), Compress, Group (two nodes in one grouped transaction), Policy (-OnTargetError),
    # BitmapMode.
    $scenarios = @(
        @{ Scenario = 'qcow2 incremental'; Kind = 'Qcow2'; Compress = $false; Group = $false; Policy = 'Report'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 incremental, compressed'; Kind = 'Qcow2'; Compress = $true; Group = $false; Policy = 'Report'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'raw full'; Kind = 'Raw'; Compress = $false; Group = $false; Policy = 'Report'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 full, compressed'; Kind = 'Qcow2Full'; Compress = $true; Group = $false; Policy = 'Report'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 incremental, grouped'; Kind = 'Qcow2'; Compress = $false; Group = $true; Policy = 'Report'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'raw full, grouped'; Kind = 'Raw'; Compress = $false; Group = $true; Policy = 'Report'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 incremental, -OnTargetError Stop'; Kind = 'Qcow2'; Compress = $false; Group = $false; Policy = 'Stop'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'raw full, -OnTargetError Stop'; Kind = 'Raw'; Compress = $false; Group = $false; Policy = 'Stop'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 incremental, compressed, -OnTargetError Ignore'; Kind = 'Qcow2'; Compress = $true; Group = $false; Policy = 'Ignore'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 incremental, grouped, -OnTargetError Stop'; Kind = 'Qcow2'; Compress = $false; Group = $true; Policy = 'Stop'; BitmapMode = 'OnSuccess' }
        @{ Scenario = 'qcow2 bitmap sync, -BitmapMode Always'; Kind = 'Qcow2'; Compress = $false; Group = $false; Policy = 'Report'; BitmapMode = 'Always' }
    )
    $script:SweepCases = @(foreach ($s in $scenarios) { foreach ($seed in $Seeds) { $s + @{ Seed = $seed } } })
    $script:SeedCases = @(foreach ($seed in $Seeds) { @{ Seed = $seed } })
    $script:ShadowCases = @(foreach ($seed in $Seeds) {
            foreach ($format in 'Raw', 'Qcow2') { foreach ($persistent in $true, $false) { @{ Format = $format; Persistent = $persistent; Kind = ($persistent ? 'persistent' : 'non-persistent'); Seed = $seed } } }
        })
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module (Join-Path $PSScriptRoot 'FaultHelpers.psm1') -Force
    Import-BitmapBackupModule
    $ProgressPreference = 'SilentlyContinue'

    $script:Terminal = @('Completed', 'Failed', 'Stopped')
    $script:Bound = 20          # seconds: every job reaches a terminal state within this
    $script:RemoveBound = 5     # seconds: Remove-Job -Force of a concluded job returns within this
    $script:Log = [Collections.Generic.List[string]]::new()

    function Write-FaultLog {
        <# One line of campaign output (what stage failed at which free space), shown under the test. #>
        param([string] $Text)
        $script:Log.Add($Text)
        Write-Host "      $Text"
    }

    function New-WriteSet {
        <# -Count writes @(offset, length) inside a node of -Size bytes, 512-aligned, up to 160 KiB each. #>
        param([Random] $Rng, [long] $Size, [int] $Count = 5)
        $writes = [Collections.Generic.List[object]]::new()
        for ($i = 0; $i -lt $Count; $i++) {
            $len = 512 * $Rng.Next(1, 321)
            $off = 512 * [long]$Rng.Next(0, [int](($Size - $len) / 512) + 1)
            $writes.Add(@($off, $len))
        }
        return , $writes
    }

    function Write-Set {
        <# Write each write of -Writes with new data; returns the clusters they touch. #>
        param([string] $Node, $Writes, [Random] $Rng)
        $set = [Collections.Generic.SortedSet[long]]::new()
        foreach ($w in $Writes) {
            Write-BlockNode -Node $Node -Offset $w[0] -Data (New-FaultData -Rng $Rng -Length $w[1]) -Confirm:$false
            Add-RangeCluster -Set $set -Offset $w[0] -Length $w[1]
        }
        return , $set
    }

    function Add-CompareCheck {
        <# Queue a qemu-img compare of -Path (with its chain) and -Reference for Assert-QueuedCheck. #>
        param([Collections.Generic.List[object]] $Queue, [string] $Path, [string] $Reference, [string] $Because)
        $Queue.Add(@{ Arguments = @('compare', '-U', '-f', (Get-FaultImageFormat $Path), '-F', (Get-FaultImageFormat $Reference), $Path, $Reference)
                Allowed = @(0); What = "qemu-img compare '$Path' '$Reference' ($Because)" })
    }

    function Add-ImageCheck {
        <# Queue a qemu-img check of a qcow2 image: exit 0 (no corruption, no leak), or 0/3 with -AllowLeaks. #>
        param([Collections.Generic.List[object]] $Queue, [string] $Path, [string] $Because, [switch] $AllowLeaks)
        $Queue.Add(@{ Arguments = @('check', '-U', '-f', 'qcow2', $Path); Allowed = ($AllowLeaks ? @(0, 3) : @(0)); What = "qemu-img check '$Path' ($Because)" })
    }

    function Assert-QueuedCheck {
        <# Run the queued qemu-img commands (one shell) and assert each exit code; empties the queue. #>
        param([Collections.Generic.List[object]] $Queue, [string] $Directory)
        $items = @($Queue)
        $Queue.Clear()
        $results = @(Invoke-QemuBatch -Items $items -TempDirectory $Directory)
        for ($i = 0; $i -lt $items.Count; $i++) {
            $results[$i].ExitCode | Should -BeIn $items[$i].Allowed -Because "$($items[$i].What) said: $($results[$i].Output)"
        }
    }

    function New-FaultNode {
        <#
        A node of -Size bytes of half-compressible data in -Dir (qcow2 or raw), with bitmap b (persistent with
        -Persistent) and an anchor full backup (Top: where the next incremental goes on). Returns Name, Path, Top, Dir.
        #>
        param([string] $Dir, [Random] $Rng, [long] $Size = 2MB, [string] $Format = 'Qcow2', [switch] $Persistent)
        $name = New-TestName 'f'
        $path = Join-Path $Dir ($name + ($Format -eq 'Raw' ? '.img' : '.qcow2'))
        $null = New-BlockImage -Path $path -Size $Size -Format $Format -Confirm:$false
        $null = Open-BlockNode -Path $path -Name $name
        Write-BlockNode -Node $name -Offset 0 -Data (New-FaultData -Rng $Rng -Length $Size) -Confirm:$false
        $null = New-DirtyBitmap -Node $name -Name b -Persistent:$Persistent
        $full = Join-Path $Dir "$name.full.qcow2"
        $r = Start-IncrementalBackup -Node $name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        $r.Succeeded | Should -BeTrue
        return [pscustomobject]@{ Name = $name; Path = $path; Top = $full; Dir = $Dir }
    }

    function Wait-JobEnd {
        <# The job reaches a terminal state within the bound, its engine job concluded. #>
        param([Parameter(Mandatory)] $Job)
        $null = Wait-Job -Job $Job -Timeout $Bound
        $Job.State | Should -BeIn $Terminal -Because "job '$($Job.Name)' must end within $Bound s (status $($Job.Status))"
        $Job.Status | Should -Be 'Concluded'
    }

    function Remove-JobAtOnce {
        <# Remove-Job -Force returns within the bound and the job is gone. #>
        param([Parameter(Mandatory)] $Job)
        $sw = [Diagnostics.Stopwatch]::StartNew()
        Remove-Job -Job $Job -Force
        $sw.Elapsed.TotalSeconds | Should -BeLessThan $RemoveBound -Because 'Remove-Job -Force returns at once'
        Get-Job -Id $Job.Id -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
    }

    function Assert-BitmapKept {
        <# The bitmap is not busy and still has every dirty cluster of -Before (a set of 64 KiB clusters). #>
        param([string] $Node, $Before, [string] $Because, [string] $Name = 'b')
        (Get-DirtyBitmap -Node $Node -Name $Name).Busy | Should -BeFalse
        Get-MissingCluster -Expected $Before -Actual (Get-DirtyClusterSet -Node $Node -Name $Name) | Should -Be 'none' -Because "the bitmap keeps every dirty bit ($Because)"
    }

    function Assert-NextBackup {
        <#
        The next incremental of the node (on its Top, to a good target in its folder) succeeds and its chain reads as
        the node: checked now, or queued on -Queue. The chain goes on from it.
        #>
        param($Node, [string] $Tag, [Collections.Generic.List[object]] $Queue)
        $good = Join-Path $Node.Dir "next-$Tag-$($Node.Name).qcow2"
        $r = Start-IncrementalBackup -Node $Node.Name -Target $good -Sync Incremental -Bitmap b -BackingFile $Node.Top -Wait
        $r.Succeeded | Should -BeTrue -Because "the next backup to a good target succeeds ($($r.Error))"
        $now = Save-NodeSnapshot -Node $Node.Name -Path (Join-Path $Node.Dir "now-$Tag-$($Node.Name).raw")
        if ($Queue) {
            Add-CompareCheck -Queue $Queue -Path $good -Reference $now -Because "the next backup after $Tag"
            Add-ImageCheck -Queue $Queue -Path $good -Because "the next backup after $Tag"
        }
        else {
            Assert-QemuImageEqual -Path $good -Reference $now
            $null = Assert-QemuImageCheck -Path $good
        }
        $Node.Top = $good
    }

    function Assert-NoTargetFile {
        <# Nothing that passes for a backup at -Target: no file there (a folder put there by a test is not a file). #>
        param([string] $Target, [string] $Because)
        Test-Path -LiteralPath $Target -PathType Leaf | Should -BeFalse -Because $Because
    }
}

Describe 'ENOSPC at every stage of a backup: <Scenario> (seed <Seed>)' -ForEach $SweepCases -Skip:$NoQemuImg {
    BeforeAll {
        function New-SweepEnvironment {
            <#
            The scenario: 1 or 2 nodes (qcow2, 2 MiB of half-compressible data) in TestDrive, each with bitmap b and an
            anchor full backup (the chain's base); the backups under test go to a 6 MiB tmpfs (two raw full targets and
            their manifests take more than 4 MiB).
            #>
            param([hashtable] $Scenario, [int] $Seed, [string] $Mount, [string] $Dir)
            $rng = [Random]::new($Seed)
            $nodes = foreach ($i in 1..($Scenario.Group ? 2 : 1)) {
                $name = New-TestName 'f'
                $path = Join-Path $Dir "$name.qcow2"
                $null = New-BlockImage -Path $path -Size 2MB -Confirm:$false
                $null = Open-BlockNode -Path $path -Name $name
                Write-BlockNode -Node $name -Offset 0 -Data (New-FaultData -Rng $rng -Length 2MB) -Confirm:$false
                $null = New-DirtyBitmap -Node $name -Name b
                $full = Join-Path $Dir "$name.full.qcow2"
                $r = Start-IncrementalBackup -Node $name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
                $r.Succeeded | Should -BeTrue
                [pscustomobject]@{ Name = $name; Path = $path; Top = $full; Writes = (New-WriteSet -Rng $rng -Size 2MB) }
            }
            return [pscustomobject]@{ Case = $Scenario; Rng = $rng; Mount = $Mount; Dir = $Dir; Nodes = @($nodes); Round = 0
                Stages = [Collections.Generic.List[string]]::new(); Checks = [Collections.Generic.List[object]]::new() }
        }

        function Get-BackupParameter {
            <# The Start-IncrementalBackup parameters of the backup under test of one node, to -Target. #>
            param($Ctx, $Node, [string] $Target)
            $c = $Ctx.Case
            $p = @{ Node = $Node.Name; Target = $Target; OnTargetError = $c.Policy }
            switch ($c.Kind) {
                'Qcow2' {
                    if ($c.BitmapMode -eq 'OnSuccess') { $p += @{ Sync = 'Incremental'; Bitmap = 'b'; BackingFile = $Node.Top } }
                    else { $p += @{ Sync = 'Bitmap'; Bitmap = 'b'; BitmapMode = $c.BitmapMode; BackingFile = $Node.Top } }
                }
                'Qcow2Full' { $p += @{ Sync = 'Full'; Bitmap = 'b'; BitmapMode = $c.BitmapMode } }
                'Raw' { $p += @{ Sync = 'Full'; Bitmap = 'b'; BitmapMode = $c.BitmapMode; TargetFormat = 'Raw' } }
            }
            if ($c.Compress) { $p.Compress = $true }
            return $p
        }

        function Start-BackupUnderTest {
            <# Start the scenario's backups to the tmpfs (grouped in one transaction, or one job); returns Jobs and StartError. #>
            param($Ctx)
            $specs = @(foreach ($n in $Ctx.Nodes) {
                $ext = $Ctx.Case.Kind -eq 'Raw' ? '.img' : '.qcow2'
                @{ Command = 'Start-IncrementalBackup'; Parameters = (Get-BackupParameter -Ctx $Ctx -Node $n -Target (Join-Path $Ctx.Mount "$($n.Name)$ext")) }
            })
            $jobs = @(); $err = $null
            try {
                if ($Ctx.Case.Group) { $jobs = @(Invoke-BitmapTransaction -CompletionMode Grouped -Action @($specs) -ErrorAction Stop) }
                else { $jobs = @(foreach ($s in $specs) { $p = $s.Parameters; Start-IncrementalBackup @p -ErrorAction Stop }) }
            }
            catch { $err = $_ }
            return [pscustomobject]@{ Jobs = $jobs; StartError = $err; Targets = @($specs | ForEach-Object { $_.Parameters.Target }) }
        }

        function Wait-BackupUnderTest {
            <#
            Wait (bounded) until every job is terminal. -OnTargetError Stop: a job paused by ENOSPC gets its space back and
            is resumed; Ignore: once a job has met ENOSPC, space is freed and it retries by itself. Returns where the job
            paused or retried (copy:<op>@<offset> or commit:<op>@<offset>), or $null.
            #>
            param($Ctx, [object[]] $Jobs)
            $deadline = [DateTime]::UtcNow.AddSeconds($Bound)
            $recovered = $null
            while (@($Jobs | Where-Object { $_.State -notin $Terminal }).Count -gt 0 -and [DateTime]::UtcNow -lt $deadline) {
                foreach ($j in $Jobs) {
                    $transient = $j.Backup.LastTransientError
                    if ($null -eq $transient -or ($Ctx.Case.Policy -eq 'Stop' -and -not $j.Backup.PausedByError) -or ($Ctx.Case.Policy -eq 'Ignore' -and $recovered)) { continue }
                    $transient.Message | Should -Match 'No space left on device'
                    $transient.Message -match 'during (\w+)(?: at offset (\d+))?' | Should -BeTrue
                    $recovered = ($j.Backup.BytesDone -lt $j.Backup.BytesTotal ? 'copy:' : 'commit:') + ($Matches[2] ? "$($Matches[1])@$($Matches[2])" : $Matches[1])
                    Clear-TmpfsFiller -Mount $Ctx.Mount
                    if ($Ctx.Case.Policy -eq 'Stop') { Resume-IncrementalBackup -Job $j -Confirm:$false -ErrorAction SilentlyContinue }
                }
                Start-Sleep -Milliseconds 10
            }
            foreach ($j in $Jobs) {
                $j.State | Should -BeIn $Terminal -Because "job '$($j.Name)' must end within $Bound s (status $($j.Status))"
            }
            return $recovered
        }

        function Get-Stage {
            <#
            Which stage failed: create, copy:<op>@<offset>, commit:<op>@<offset>, or ok; a job that paused or retried
            after ENOSPC (-OnTargetError Stop/Ignore) and then completed is <stage>><outcome>, e.g. copy:write@655360>ok.
            #>
            param($Started, [string] $Recovered)
            if ($Started.StartError) { return 'create' }
            $resumed = $Recovered ? "$Recovered>" : ''
            $stages = foreach ($j in $Started.Jobs) {
                $e = $j.Backup.Error
                if ($null -eq $e) { continue }
                if ($e.ErrorId -eq 'BackupCancelled') { continue }
                $op = if ($e.Message -match 'during (\w+)(?: at offset (\d+))?') { $Matches[1] + ($Matches[2] ? "@$($Matches[2])" : '') } else { $e.ErrorId }
                ($j.Backup.BytesDone -lt $j.Backup.BytesTotal ? 'copy:' : 'commit:') + $op
            }
            $stages = @($stages)
            if ($stages.Count -eq 0) { return $resumed + 'ok' }
            return $resumed + ($stages -join '+')
        }

        function Invoke-SweepLevel {
            <# One backup (or group) with -Free bytes free on the tmpfs, every invariant asserted; then the next backup to a good target. #>
            param($Ctx, [long] $Free)
            $Ctx.Round++
            $k = $Ctx.Round
            $c = $Ctx.Case
            Clear-TmpfsContent -Mount $Ctx.Mount
            $free = Set-TmpfsFree -Mount $Ctx.Mount -Free $Free
            $before = @{}; $ref = @{}
            foreach ($n in $Ctx.Nodes) {
                $before[$n.Name] = Get-DirtyClusterSet -Node $n.Name -Name b
                $ref[$n.Name] = Save-NodeSnapshot -Node $n.Name -Path (Join-Path $Ctx.Dir "ref$k-$($n.Name).raw")
            }
            $jobsBefore = @(Get-Job).Count
            $started = Start-BackupUnderTest -Ctx $Ctx
            $recovered = $null
            if ($started.StartError) {
                # The target could not even be created: a terminating error naming ENOSPC and the target, and no job.
                $started.StartError.FullyQualifiedErrorId | Should -BeLike 'ImageIOFailed,*'
                $started.StartError.Exception.Message | Should -Match 'No space left on device'
                @(Get-Job).Count | Should -Be $jobsBefore
                foreach ($t in $started.Targets) {
                    Test-Path -LiteralPath $t | Should -BeFalse
                    Test-Path -LiteralPath "$t.partial" | Should -BeFalse -Because 'a target that could not be created is deleted (a grouped transaction deletes the targets it had created)'
                }
            }
            else {
                $recovered = Wait-BackupUnderTest -Ctx $Ctx -Jobs $started.Jobs
            }
            $stage = Get-Stage -Started $started -Recovered $recovered
            $states = ($started.Jobs | ForEach-Object { "$($_.State)" }) -join ','
            Write-FaultLog ("free {0,8}: {1} [{2}]" -f $free, $stage, $states)
            $Ctx.Stages.Add(($stage -replace '@\d+', '' -replace '\+.*', ''))

            # Each job: concluded, its outcome consistent with what is on disk.
            $completed = 0
            for ($i = 0; $i -lt $started.Jobs.Count; $i++) {
                $j = $started.Jobs[$i]; $target = $started.Targets[$i]
                $j.Status | Should -Be 'Concluded'
                if ($j.State -eq 'Completed') {
                    $completed++
                    Test-Path -LiteralPath $target -PathType Leaf | Should -BeTrue
                    Test-Path -LiteralPath "$target.partial" | Should -BeFalse
                }
                else {
                    if ($j.State -eq 'Failed') {
                        $j.Backup.Error.Message | Should -Match 'No space left on device'
                        $j.Backup.Error.Message | Should -Match ([regex]::Escape($target))
                    }
                    Assert-NoTargetFile -Target $target -Because "job '$($j.Name)' ended $($j.State)"
                    if ($j.Backup.KeptPartialTarget) {
                        $c.BitmapMode | Should -Be 'Always' -Because 'only a failed -BitmapMode Always backup keeps its partial image'
                    }
                    else {
                        Test-Path -LiteralPath "$target.partial" | Should -BeFalse -Because "a failed backup leaves no partial image (job '$($j.Name)', $($j.State))"
                    }
                }
                $sw = [Diagnostics.Stopwatch]::StartNew()
                Remove-Job -Job $j -Force
                $sw.Elapsed.TotalSeconds | Should -BeLessThan $RemoveBound -Because 'Remove-Job -Force of a concluded job returns at once'
                Get-Job -Id $j.Id -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
            }
            if ($c.Group -and $started.Jobs.Count -gt 0) {
                $completed | Should -BeIn @(0, $started.Jobs.Count) -Because "a grouped transaction completes all its backups or none (stage $stage)"
            }
            if ($c.Policy -ne 'Report') {
                $completed | Should -Be $started.Jobs.Count -Because "under -OnTargetError $($c.Policy) a backup that meets ENOSPC (copying, or writing back its metadata at the end) pauses or retries, and completes once space is freed (stage $stage)"
            }

            # Each node: its bitmap not busy, no dirty bit lost; the next backup to a good target succeeds and verifies.
            for ($i = 0; $i -lt $Ctx.Nodes.Count; $i++) {
                $n = $Ctx.Nodes[$i]
                $j = if ($started.Jobs.Count -gt $i) { $started.Jobs[$i] } else { $null }
                $target = $started.Targets[$i]
                $b = Get-DirtyBitmap -Node $n.Name -Name b
                $b.Busy | Should -BeFalse
                $after = Get-DirtyClusterSet -Node $n.Name -Name b
                $keptPartial = $j -and $j.Backup.KeptPartialTarget
                if (-not ($j -and $j.State -eq 'Completed') -and -not $keptPartial) {
                    Get-MissingCluster -Expected $before[$n.Name] -Actual $after | Should -Be 'none' -Because "the bitmap keeps every dirty bit (stage $stage, free $free)"
                }
                # What survives on the tmpfs moves to TestDrive (the next level empties the tmpfs), checked later.
                if ($j -and $j.State -eq 'Completed') {
                    $kept = Join-Path $Ctx.Dir ("done$k-$($n.Name)" + [IO.Path]::GetExtension($target))
                    Move-Item -LiteralPath $target -Destination $kept
                    Add-CompareCheck -Queue $Ctx.Checks -Path $kept -Reference $ref[$n.Name] -Because "backup completed with $free bytes free, stage $stage"
                    if ($kept -like '*.qcow2') { Add-ImageCheck -Queue $Ctx.Checks -Path $kept -Because "backup completed with $free bytes free" }
                    if ($c.Kind -ne 'Raw') { $n.Top = $kept }
                }
                elseif ($keptPartial) {
                    $n.Top = Join-Path $Ctx.Dir "partial$k-$($n.Name).qcow2"
                    Move-Item -LiteralPath "$target.partial" -Destination $n.Top
                    Add-ImageCheck -Queue $Ctx.Checks -Path $n.Top -Because "partial image kept by a failed -BitmapMode Always backup, $free bytes free"
                }
                $good = Join-Path $Ctx.Dir ("good$k-$($n.Name)" + ($c.Kind -eq 'Raw' ? '.img' : '.qcow2'))
                $r = if ($c.Kind -eq 'Raw') { Start-IncrementalBackup -Node $n.Name -Target $good -Sync Full -Bitmap b -BitmapMode OnSuccess -TargetFormat Raw -Wait }
                elseif ($c.Kind -eq 'Qcow2Full') { Start-IncrementalBackup -Node $n.Name -Target $good -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait }
                else { Start-IncrementalBackup -Node $n.Name -Target $good -Sync Incremental -Bitmap b -BackingFile $n.Top -Wait }
                $r.Succeeded | Should -BeTrue -Because "the next backup to a good target succeeds ($($r.Error))"
                $now = Save-NodeSnapshot -Node $n.Name -Path (Join-Path $Ctx.Dir "now$k-$($n.Name).raw")
                Add-CompareCheck -Queue $Ctx.Checks -Path $good -Reference $now -Because "the next backup after the level with $free bytes free (stage $stage)"
                if ($good -like '*.qcow2') { Add-ImageCheck -Queue $Ctx.Checks -Path $good -Because "the next backup after the level with $free bytes free" }
                if ($c.Kind -ne 'Raw') { $n.Top = $good }
                if ($c.Kind -eq 'Qcow2' -and $k % 16 -eq 0) {
                    # A new anchor now and then keeps each check of the chain short (a deep chain costs a read through every image).
                    $n.Top = Join-Path $Ctx.Dir "anchor$k-$($n.Name).qcow2"
                    (Start-IncrementalBackup -Node $n.Name -Target $n.Top -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait).Succeeded | Should -BeTrue
                }
                # Dirty the same clusters again, with new data, for the next level.
                $null = Write-Set -Node $n.Name -Writes $n.Writes -Rng $Ctx.Rng
            }
        }
    }

    BeforeEach {
        $dir = New-TestDirectory
        $mount = Mount-FaultTmpfs -Size 6MB -Parent $dir
    }
    AfterEach {
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
        Dismount-FaultTmpfs -All
    }

    It 'every level of free space ends the backup cleanly, keeps every dirty bit, and the next backup verifies' {
        if (-not $mount) { Set-ItResult -Skipped -Because 'mounting a tmpfs needs root (mount -t tmpfs); CI runs as root'; return }
        $sc = @{ Scenario = $Scenario; Kind = $Kind; Compress = $Compress; Group = $Group; Policy = $Policy; BitmapMode = $BitmapMode }
        $ctx = New-SweepEnvironment -Scenario $sc -Seed $Seed -Mount $mount -Dir $dir
        foreach ($n in $ctx.Nodes) { $null = Write-Set -Node $n.Name -Writes $n.Writes -Rng $ctx.Rng }

        # Measure what a successful backup of the scenario takes on the tmpfs (then the chain goes on from it).
        Clear-TmpfsContent -Mount $mount
        $started = Start-BackupUnderTest -Ctx $ctx
        $started.StartError | Should -BeNullOrEmpty
        $null = Wait-BackupUnderTest -Ctx $ctx -Jobs $started.Jobs
        foreach ($j in $started.Jobs) { $j.State | Should -Be 'Completed'; Remove-Job -Job $j -Force }
        $need = Get-TmpfsUsed -Path $mount
        for ($i = 0; $i -lt $ctx.Nodes.Count; $i++) {
            $n = $ctx.Nodes[$i]
            if ($sc.Kind -ne 'Raw') { $n.Top = Join-Path $dir "measured-$($n.Name).qcow2"; Move-Item -LiteralPath $started.Targets[$i] -Destination $n.Top }
            $null = Write-Set -Node $n.Name -Writes $n.Writes -Rng $ctx.Rng
        }
        Write-FaultLog "a successful backup takes $need bytes on the tmpfs"

        # Levels: nothing free; one level in each of -Steps equal slices of the need (where in the slice: this seed's
        # choice); pages inside the last 64 KiB before the need (the commit writes back a 64 KiB L2 table there, and
        # the need of one run may differ from the measured one by a page or two: its manifest, its refcount block);
        # the need and beyond. The long campaign (BITMAPBACKUP_FAULT_SWEEP=Full) takes 32 slices and every page of the
        # last 64 KiB.
        $page = 4KB
        $full = Test-FaultFullSweep
        $steps = $full ? 32 : 4
        $levels = [Collections.Generic.SortedSet[long]]::new()
        foreach ($l in @(0, ($need - 10 * $page), ($need - 6 * $page), ($need - 2 * $page), ($need - $page), $need, ($need + 256KB))) { $null = $levels.Add([Math]::Max(0, $l)) }
        for ($s = 0; $s -lt $steps; $s++) { $null = $levels.Add([long](($need * ($s + $ctx.Rng.NextDouble()) / $steps) / $page) * $page) }
        if ($full) { for ($p = 3; $p -le 16; $p++) { $null = $levels.Add([Math]::Max(0, $need - $p * $page)) } }
        foreach ($level in $levels) { Invoke-SweepLevel -Ctx $ctx -Free $level }
        Assert-QueuedCheck -Queue $ctx.Checks -Directory $dir

        # The sweep reached every stage it is meant to (so a change in the engine's layout cannot make it hollow).
        $ctx.Stages | Should -Contain 'ok'
        @($ctx.Stages | Where-Object { $_ -like 'copy:*' }).Count | Should -BeGreaterThan 0 -Because 'ENOSPC while copying data'
        if ($sc.Policy -ne 'Report') {
            @($ctx.Stages | Where-Object { $_ -like 'copy:*>ok' }).Count | Should -BeGreaterThan 0 -Because 'a backup paused or retried at ENOSPC while copying completes once space is freed'
            if ($sc.Kind -ne 'Raw') {   # a raw target has no metadata to write back
                @($ctx.Stages | Where-Object { $_ -like 'commit:*>ok' }).Count | Should -BeGreaterThan 0 -Because 'a backup paused or retried at ENOSPC while writing back its metadata completes once space is freed'
            }
        }
        if ($sc.Kind -ne 'Raw') {
            $ctx.Stages | Should -Contain 'create' -Because 'ENOSPC while creating a qcow2 target'
            if ($sc.Policy -eq 'Report') {
                @($ctx.Stages | Where-Object { $_ -like 'commit:*' }).Count | Should -BeGreaterThan 0 -Because 'ENOSPC while the L2 tables and refcount blocks allocated for the copy are written back'
            }
        }
    }
}

Describe 'The commit fails: a folder at the final name, a sync that fails' -Skip:$NoQemuImg {
    BeforeEach { $dir = New-TestDirectory; $rng = [Random]::new(9) }
    AfterEach {
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
        [BitmapBackup.Core.Testing.FaultInjection]::Clear()
    }

    It 'a folder created at the final name while a throttled <Format> backup runs (grouped: <Group>) fails every backup of the group, keeps every bit' -ForEach @(
        @{ Format = 'Qcow2'; Group = $false }
        @{ Format = 'Raw'; Group = $false }
        @{ Format = 'Qcow2'; Group = $true }
        @{ Format = 'Raw'; Group = $true }
    ) {
        $nodes = @(foreach ($i in 1..($Group ? 2 : 1)) { New-FaultNode -Dir $dir -Rng $rng })
        $before = @{}
        $specs = @(foreach ($n in $nodes) {
            $null = Write-Set -Node $n.Name -Writes (New-WriteSet -Rng $rng -Size 2MB) -Rng $rng
            $before[$n.Name] = Get-DirtyClusterSet -Node $n.Name -Name b
            $p = @{ Node = $n.Name; BytesPerSecond = 512KB }   # the limit paces after each copy: slow enough to still run at 100 ms
            if ($Format -eq 'Raw') { $p += @{ Target = (Join-Path $dir "$($n.Name).t.img"); Sync = 'Full'; Bitmap = 'b'; BitmapMode = 'OnSuccess'; TargetFormat = 'Raw' } }
            else { $p += @{ Target = (Join-Path $dir "$($n.Name).t.qcow2"); Sync = 'Incremental'; Bitmap = 'b'; BackingFile = $n.Top } }
            @{ Command = 'Start-IncrementalBackup'; Parameters = $p }
        })
        $jobs = @(if ($Group) { Invoke-BitmapTransaction -CompletionMode Grouped -Action @($specs) } else { foreach ($sp in $specs) { $p = $sp.Parameters; Start-IncrementalBackup @p } })
        $blocked = $specs[-1].Parameters.Target
        Start-Sleep -Milliseconds 100
        $jobs[-1].State | Should -Be 'Running' -Because 'the folder appears while the backup runs'
        $null = New-Item -ItemType Directory -Path $blocked
        for ($i = 0; $i -lt $jobs.Count; $i++) {
            $j = $jobs[$i]; $target = $specs[$i].Parameters.Target
            Wait-JobEnd -Job $j
            $j.State | Should -BeIn @('Failed', 'Stopped') -Because 'a grouped transaction completes all its backups or none'
            if ($target -eq $blocked) {
                $j.State | Should -Be 'Failed'
                $j.Backup.Error.Message | Should -Match ([regex]::Escape($target))
                Test-Path -LiteralPath $target -PathType Container | Should -BeTrue
            }
            Assert-NoTargetFile -Target $target -Because 'the backup failed'
            Test-Path -LiteralPath "$target.partial" | Should -BeFalse
            Remove-JobAtOnce -Job $j
        }
        Remove-Item -LiteralPath $blocked
        foreach ($n in $nodes) {
            Assert-BitmapKept -Node $n.Name -Before $before[$n.Name] -Because 'the commit failed'
            Assert-NextBackup -Node $n -Tag 'folder'
        }
    }

    It 'a folder created while a <Format> backup is Pending makes Complete-IncrementalBackup''s rename fail; every bit kept' -ForEach @(
        @{ Format = 'Qcow2' }
        @{ Format = 'Raw' }
    ) {
        $n = New-FaultNode -Dir $dir -Rng $rng
        $null = Write-Set -Node $n.Name -Writes (New-WriteSet -Rng $rng -Size 2MB) -Rng $rng
        $before = Get-DirtyClusterSet -Node $n.Name -Name b
        $target = Join-Path $dir ("pending" + ($Format -eq 'Raw' ? '.img' : '.qcow2'))
        $job = if ($Format -eq 'Raw') { Start-IncrementalBackup -Node $n.Name -Target $target -Sync Full -Bitmap b -BitmapMode OnSuccess -TargetFormat Raw -AutoFinalize $false }
        else { Start-IncrementalBackup -Node $n.Name -Target $target -Sync Incremental -Bitmap b -BackingFile $n.Top -AutoFinalize $false }
        Wait-BackupStatus -Job $job -Status Pending -TimeoutSeconds $Bound
        $null = New-Item -ItemType Directory -Path $target
        Complete-IncrementalBackup -Job $job -Confirm:$false -ErrorAction SilentlyContinue
        Wait-JobEnd -Job $job
        $job.State | Should -Be 'Failed'
        $job.Backup.Error.Message | Should -Match ([regex]::Escape($target))
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        Assert-NoTargetFile -Target $target -Because 'the rename failed'
        Remove-JobAtOnce -Job $job
        Assert-BitmapKept -Node $n.Name -Before $before -Because 'the rename failed'
        Remove-Item -LiteralPath $target
        Assert-NextBackup -Node $n -Tag 'rename'
    }

    # After the group's decision each backup renames its own target, and then waits for the others' renames before it
    # touches its bitmap: a rename that fails gives the renamed ones their partial names back (JobGroup's second barrier).
    It 'a folder created at one final name while a grouped transaction is Pending: Complete-IncrementalBackup completes all the backups or none' {
        $nodes = @((New-FaultNode -Dir $dir -Rng $rng), (New-FaultNode -Dir $dir -Rng $rng))
        $before = @{}
        $specs = @(foreach ($n in $nodes) {
                $null = Write-Set -Node $n.Name -Writes (New-WriteSet -Rng $rng -Size 2MB) -Rng $rng
                $before[$n.Name] = Get-DirtyClusterSet -Node $n.Name -Name b
                @{ Command = 'Start-IncrementalBackup'; Parameters = @{ Node = $n.Name; Target = (Join-Path $dir "$($n.Name).p.qcow2"); Sync = 'Incremental'; Bitmap = 'b'; BackingFile = $n.Top; AutoFinalize = $false } }
            })
        $jobs = @(Invoke-BitmapTransaction -CompletionMode Grouped -Action $specs)
        foreach ($j in $jobs) { Wait-BackupStatus -Job $j -Status Pending -TimeoutSeconds $Bound }
        $blocked = $specs[1].Parameters.Target
        $null = New-Item -ItemType Directory -Path $blocked
        Complete-IncrementalBackup -Job $jobs[0] -Confirm:$false -ErrorAction SilentlyContinue
        foreach ($j in $jobs) { Wait-JobEnd -Job $j }
        @($jobs | Where-Object State -EQ 'Completed').Count | Should -BeIn @(0, 2) -Because 'a grouped transaction completes all its backups or none'
        for ($i = 0; $i -lt 2; $i++) {
            Assert-NoTargetFile -Target $specs[$i].Parameters.Target -Because 'the group failed'
            Assert-BitmapKept -Node $nodes[$i].Name -Before $before[$nodes[$i].Name] -Because 'the group failed at a rename'
            Remove-JobAtOnce -Job $jobs[$i]
        }
    }

    It 'a target whose sync fails (injected: tmpfs never fails fsync) fails every backup of a grouped transaction, keeps every bit' {
        $nodes = @(New-FaultNode -Dir $dir -Rng $rng; New-FaultNode -Dir $dir -Rng $rng)
        $before = @{}
        $specs = foreach ($n in $nodes) {
            $null = Write-Set -Node $n.Name -Writes (New-WriteSet -Rng $rng -Size 2MB) -Rng $rng
            $before[$n.Name] = Get-DirtyClusterSet -Node $n.Name -Name b
            @{ Command = 'Start-IncrementalBackup'; Parameters = @{ Node = $n.Name; Target = (Join-Path $dir "$($n.Name).s.qcow2"); Sync = 'Incremental'; Bitmap = 'b'; BackingFile = $n.Top; BytesPerSecond = 4MB } }
        }
        $jobs = @(Invoke-BitmapTransaction -CompletionMode Grouped -Action @($specs))
        # The target is created (and synced) already: from now on every sync of the second one fails.
        $rule = [BitmapBackup.Core.Testing.FaultInjection]::Add("$($specs[1].Parameters.Target).partial", 'FileSync', 0, [long]::MaxValue, -1)
        try { foreach ($j in $jobs) { Wait-JobEnd -Job $j } }
        finally { [BitmapBackup.Core.Testing.FaultInjection]::Remove($rule) }
        $rule.Hits | Should -BeGreaterThan 0
        $jobs[1].State | Should -Be 'Failed'
        $jobs[1].Backup.Error.Message | Should -Match 'flush'
        $jobs[0].State | Should -Be 'Stopped' -Because 'a grouped transaction completes all its backups or none'
        for ($i = 0; $i -lt 2; $i++) {
            $t = $specs[$i].Parameters.Target
            Assert-NoTargetFile -Target $t -Because 'the group failed'
            Test-Path -LiteralPath "$t.partial" | Should -BeFalse
            Remove-JobAtOnce -Job $jobs[$i]
            Assert-BitmapKept -Node $nodes[$i].Name -Before $before[$nodes[$i].Name] -Because 'the group failed at its sync'
            Assert-NextBackup -Node $nodes[$i] -Tag 'sync'
        }
    }
}

Describe 'A target whose storage hangs (fsfreeze of an ext4 loop mount): Stop-Job and Remove-Job -Force are bounded' -Skip:$NoQemuImg {
    BeforeAll {
        $script:DefaultStopTimeout = [BitmapBackup.BackupPSJob]::StopTimeout
        function Mount-FrozenCapable {
            <# An ext4 file system in a loop-mounted file under -Dir (fsfreeze works on it, not on tmpfs); $null when it cannot be made. #>
            param([string] $Dir)
            if (-not (Test-FaultRoot) -or -not (Get-Command mkfs.ext4, fsfreeze -ErrorAction SilentlyContinue)) { return $null }
            $file = Join-Path $Dir 'ext4.img'
            $mnt = Join-Path $Dir 'ext4'
            $null = New-Item -ItemType Directory -Path $mnt
            $null = & truncate -s 64M $file 2>&1
            $null = & mkfs.ext4 -q $file 2>&1
            if ($LASTEXITCODE -ne 0) { return $null }
            $out = & mount -o loop $file $mnt 2>&1
            if ($LASTEXITCODE -ne 0) { Write-Warning "mount -o loop failed: $out"; return $null }
            return $mnt
        }
    }
    BeforeEach {
        $dir = New-TestDirectory
        $mnt = Mount-FrozenCapable -Dir $dir
    }
    AfterEach {
        [BitmapBackup.BackupPSJob]::StopTimeout = $DefaultStopTimeout
        if ($mnt) { $null = & fsfreeze --unfreeze $mnt 2>&1 }
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
        if ($mnt) { $null = & umount $mnt 2>&1; if ($LASTEXITCODE -ne 0) { $null = & umount -l $mnt 2>&1 } }
    }

    It '<Verb> of a backup whose target is frozen returns within the bound (JobStopTimedOut), the job is removable, and the bitmap gets every bit back when the storage answers' -ForEach @(
        @{ Verb = 'Stop-Job' }
        @{ Verb = 'Remove-Job -Force' }
    ) {
        if (-not $mnt) { Set-ItResult -Skipped -Because 'needs root, mkfs.ext4, fsfreeze and a loop device (mount -o loop); CI has them'; return }
        [BitmapBackup.BackupPSJob]::StopTimeout = [TimeSpan]::FromSeconds(2)
        $rng = [Random]::new(77)
        $n = New-FaultNode -Dir $dir -Rng $rng
        Write-BlockNode -Node $n.Name -Offset 0 -Data (New-FaultData -Rng $rng -Length 2MB) -Confirm:$false
        $before = Get-DirtyClusterSet -Node $n.Name -Name b
        $target = Join-Path $mnt 'inc.qcow2'
        $job = Start-IncrementalBackup -Node $n.Name -Target $target -Sync Incremental -Bitmap b -BackingFile $n.Top -BytesPerSecond 1MB
        Start-Sleep -Milliseconds 300
        $job.State | Should -Be 'Running'
        $null = & fsfreeze --freeze $mnt 2>&1
        $LASTEXITCODE | Should -Be 0
        try {
            Start-Sleep -Milliseconds 1500   # the next write of the copy blocks in the kernel
            $sw = [Diagnostics.Stopwatch]::StartNew()
            if ($Verb -eq 'Stop-Job') { Stop-Job -Job $job } else { Remove-Job -Job $job -Force }
            $sw.Elapsed.TotalSeconds | Should -BeLessThan 10 -Because "$Verb waits at most StopTimeout (2 s) for a backup that cannot clean up"
            $sw.Elapsed.TotalSeconds | Should -BeGreaterOrEqual 1.5 -Because 'it did wait for the bound: the storage hangs'
            if ($Verb -eq 'Stop-Job') {
                $job.State | Should -Be 'Failed'
                $e = $job.JobStateInfo.Reason
                $e.ErrorId | Should -BeExactly 'JobStopTimedOut'
                $e.Message | Should -Match 'did not finish cleaning up'
                Remove-JobAtOnce -Job $job
            }
            Get-Job -Id $job.Id -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
            (Get-DirtyBitmap -Node $n.Name -Name b).Busy | Should -BeTrue -Because 'the engine still owns the bitmap while its target hangs'
        }
        finally { $null = & fsfreeze --unfreeze $mnt 2>&1 }
        # The storage answers: the engine concludes the cancelled backup and gives the bitmap its bits back.
        $job.Backup.Completion.Wait([TimeSpan]::FromSeconds($Bound)) | Should -BeTrue
        $job.Backup.Error.ErrorId | Should -Be 'BackupCancelled'
        Assert-BitmapKept -Node $n.Name -Before $before -Because 'the stopped backup concluded once its storage answered'
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        Assert-NextBackup -Node $n -Tag 'frozen'
    }
}

Describe 'ENOSPC while persistent bitmaps are stored at close (<Format>)' -ForEach @(
    @{ Format = 'Raw' }
    @{ Format = 'Qcow2' }
) -Skip:$NoQemuImg {
    BeforeAll {
        $script:Granularities = @(512, 1KB, 2KB, 4KB, 8KB, 16KB, 32KB, 64KB, 512, 4KB, 64KB, 512)

        function Initialize-BitmapImage {
            <#
            In an open node of 256 MiB (sparse): persistent bitmaps p0..p11 of 512 B to 64 KiB granularity (big enough that
            their store needs new space: 64 KiB each at 512 B), an anchor full backup with p0 (to -Dir), then -Count writes
            of 4 to 64 KiB spread over the node. Returns the node's Top and each bitmap's expected dirty ranges.
            #>
            param([string] $Node, [string] $Dir, [Random] $Rng, [int] $Count = 24, [string] $Log)
            for ($i = 0; $i -lt $Granularities.Count; $i++) { $null = New-DirtyBitmap -Node $Node -Name "p$i" -Granularity $Granularities[$i] -Persistent }
            $full = Join-Path $Dir 'anchor.qcow2'
            (Start-IncrementalBackup -Node $Node -Target $full -Sync Full -Bitmap p0 -BitmapMode OnSuccess -Wait).Succeeded | Should -BeTrue
            $shadow = @{}
            for ($i = 0; $i -lt $Granularities.Count; $i++) { $shadow["p$i"] = [Collections.Generic.SortedSet[long]]::new() }
            for ($k = 0; $k -lt $Count; $k++) {
                $len = 4KB * $Rng.Next(1, 17)
                $off = 4KB * [long]$Rng.Next(0, [int]((256MB - $len) / 4KB))
                Write-BlockNode -Node $Node -Offset $off -Data (New-FaultData -Rng ([Random]::new($k)) -Length $len) -Confirm:$false
                for ($i = 0; $i -lt $Granularities.Count; $i++) { Add-RangeCluster -Set $shadow["p$i"] -Offset $off -Length $len -Granularity $Granularities[$i] }
            }
            return [pscustomobject]@{ Top = $full; Shadow = $shadow }
        }

        function Assert-StoredBitmap {
            <# Each bitmap of the node is inconsistent, or (with -Exact) holds exactly its shadow: never clean with bits missing. Returns how many were inconsistent. #>
            param([string] $Node, [hashtable] $Shadow, [switch] $Exact)
            $inconsistent = 0
            for ($i = 0; $i -lt $Granularities.Count; $i++) {
                $b = Get-DirtyBitmap -Node $Node -Name "p$i"
                if ($b.Inconsistent -and -not $Exact) { $inconsistent++; continue }
                $b.Inconsistent | Should -BeFalse
                Format-ClusterSet (Get-DirtyClusterSet -Node $Node -Name "p$i" -Granularity $Granularities[$i]) | Should -Be (Format-ClusterSet $Shadow["p$i"]) -Because "bitmap p$i is clean, so it must hold exactly the writes made"
            }
            return $inconsistent
        }

        function Assert-NoTempFile {
            param([string] $Path)
            @(Get-ChildItem -LiteralPath $Path -Recurse -Force -Filter '*.tmp' | ForEach-Object Name) | Should -BeNullOrEmpty -Because 'a failed bitmap store leaves no temporary file'
        }
    }
    BeforeEach {
        $dir = New-TestDirectory
        $mount = Mount-FaultTmpfs -Size 8MB -Parent $dir
        if ($mount) {
            $path = Join-Path $mount ('disk' + ($Format -eq 'Raw' ? '.img' : '.qcow2'))
            $null = New-BlockImage -Path $path -Size 256MB -Format $Format -Confirm:$false
        }
    }
    AfterEach {
        Get-Job | Remove-Job -Force
        if ($mount) { Clear-TmpfsFiller -Mount $mount }
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
        Dismount-FaultTmpfs -All
    }

    It 'ENOSPC at the close''s <Stage>: Close-BlockNode fails with ImageIOFailed and the node stays open and usable, no *.tmp; after space is freed the close succeeds and every bitmap is exact' -ForEach @(
        @{ Stage = 'bitmap store' }
        if ($Format -eq 'Qcow2') { @{ Stage = 'metadata sync' } }   # a raw image has no metadata to write back
    ) {
        if (-not $mount) { Set-ItResult -Skipped -Because 'mounting a tmpfs needs root (mount -t tmpfs); CI runs as root'; return }
        $null = Open-BlockNode -Path $path -Name disk
        $s = Initialize-BitmapImage -Node disk -Dir $dir -Rng ([Random]::new(15))
        # Synced first, the close's sync has nothing to write and the store is what needs space; else the sync fails first.
        if ($Stage -eq 'bitmap store') { Sync-BlockNode -Node disk }
        $length = (Get-Item -LiteralPath $path).Length
        $null = Set-TmpfsFree -Mount $mount -Free 0
        foreach ($attempt in 1, 2) {
            $e = Assert-BlockError -ErrorId 'ImageIOFailed,BitmapBackup.CloseBlockNodeCommand' -MessageContains @('No space left on device') -ScriptBlock { Close-BlockNode -Node disk -Confirm:$false -ErrorAction Stop }
            Write-FaultLog "close $attempt`: $($e.Exception.Message)"
            if ($Stage -eq 'bitmap store') {
                if ($Format -eq 'Qcow2') { $e.Exception.Message -match 'during write at offset (\d+)' | Should -BeTrue; [long]$Matches[1] | Should -BeGreaterOrEqual $length -Because 'the store needs new clusters' }
                else { $e.Exception.Message | Should -Match 'sidecar' }
            }
            (Get-BlockNode -Name disk).Name | Should -Be 'disk' -Because 'a close that failed leaves the node open'
            Assert-NoTempFile -Path $mount
        }
        if ($Format -eq 'Qcow2') {
            $info = (& qemu-img info -U --output=json $path | ConvertFrom-Json).'format-specific'.data.bitmaps
            @($info | Where-Object { 'in-use' -notin $_.flags }).Count | Should -Be 0 -Because 'the image still says every bitmap is in use'
        }
        # Still usable: it reads, and its bitmaps are whole.
        $null = Read-BlockNode -Node disk -Offset 0 -Length 64KB
        $null = Assert-StoredBitmap -Node disk -Shadow $s.Shadow -Exact
        Clear-TmpfsFiller -Mount $mount
        Close-BlockNode -Node disk -Confirm:$false
        Assert-NoTempFile -Path $mount
        if ($Format -eq 'Qcow2') { $null = Assert-QemuImageCheck -Path $path }
        $null = Open-BlockNode -Path $path -Name disk
        $null = Assert-StoredBitmap -Node disk -Shadow $s.Shadow -Exact
        # The node backs up on its chain.
        $inc = Join-Path $dir 'inc.qcow2'
        (Start-IncrementalBackup -Node disk -Target $inc -Sync Incremental -Bitmap p0 -BackingFile $s.Top -Wait).Succeeded | Should -BeTrue
        Close-BlockNode -Node disk -Confirm:$false
        Assert-QemuImageEqual -Path $inc -Reference $path
    }

    It 'a process that <How> while its close keeps failing at the <Stage> leaves every bitmap inconsistent or exact, never clean with bits missing' -ForEach @(
        @{ How = 'is killed (kill -9)' ; Kill = $true; Stage = 'bitmap store' }
        @{ How = 'exits normally'; Kill = $false; Stage = 'bitmap store' }
        if ($Format -eq 'Qcow2') { @{ How = 'is killed (kill -9)' ; Kill = $true; Stage = 'metadata sync' } }
    ) {
        if (-not $mount) { Set-ItResult -Skipped -Because 'mounting a tmpfs needs root (mount -t tmpfs); CI runs as root'; return }
        $log = Join-Path $dir 'child.log'
        $go = Join-Path $dir 'go'
        $script = @'
$helpers = '__HELPERS__'; Import-Module $helpers
function Write-Log([string] $Line) { [IO.File]::AppendAllText('__LOG__', "$Line`n") }
$null = Open-BlockNode -Path '__PATH__' -Name disk
$granularities = @(512, 1KB, 2KB, 4KB, 8KB, 16KB, 32KB, 64KB, 512, 4KB, 64KB, 512)
for ($i = 0; $i -lt $granularities.Count; $i++) { $null = New-DirtyBitmap -Node disk -Name "p$i" -Granularity $granularities[$i] -Persistent }
$null = Start-IncrementalBackup -Node disk -Target '__DIR__/anchor.qcow2' -Sync Full -Bitmap p0 -BitmapMode OnSuccess -Wait
$rng = [Random]::new(15)
for ($k = 0; $k -lt 24; $k++) {
    $len = 4KB * $rng.Next(1, 17)
    $off = 4KB * [long]$rng.Next(0, [int]((256MB - $len) / 4KB))
    Write-Log "W $k $off $len data $k"
    Write-BlockNode -Node disk -Offset $off -Data (New-FaultData -Rng ([Random]::new($k)) -Length $len) -Confirm:$false
    Write-Log "E $k"
}
if ('__STAGE__' -eq 'bitmap store') { Sync-BlockNode -Node disk }
Write-Log 'ready'
while (-not (Test-Path '__GO__')) { Start-Sleep -Milliseconds 20 }
try { Close-BlockNode -Node disk -Confirm:$false -ErrorAction Stop; Write-Log 'closed' }
catch { Write-Log "closefailed $($_.Exception.Message)" }
if ('__KILL__' -eq 'True') { Start-Sleep -Seconds 120 }
exit 0
'@
        $script = $script.Replace('__HELPERS__', (Join-Path $PSScriptRoot 'FaultHelpers.psm1')).Replace('__LOG__', $log).Replace('__PATH__', $path).Replace('__DIR__', $dir).Replace('__GO__', $go).Replace('__KILL__', "$Kill").Replace('__STAGE__', $Stage)
        $child = Start-FaultChild -Script $script -Directory $dir
        try {
            Wait-FaultFile -Path $log -Pattern '^ready$' -Process $child | Should -BeTrue -Because "the child gets ready ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))"
            $null = Set-TmpfsFree -Mount $mount -Free 0
            $null = New-Item -ItemType File -Path $go
            Wait-FaultFile -Path $log -Pattern '^close' -Process $child | Should -BeTrue
            (Get-Content $log) -match '^close' | Should -Match '^closefailed .*No space left on device'
            if ($Kill) { Stop-FaultChild -Process $child }
            else { Wait-FaultChild -Process $child -TimeoutSeconds 30 | Should -Be 0 }
        }
        finally { Stop-FaultChild -Process $child }
        Assert-NoTempFile -Path $mount
        Clear-TmpfsFiller -Mount $mount
        if ($Format -eq 'Qcow2') {
            # A failed bitmap store gives back what it allocated: no leak. Leaks are allowed only after a failed metadata
            # sync: the write-back failed part-way (refcounts are written before the L2 tables that would reference their
            # clusters) and the process is gone, as after a crash. They stay until repaired (QEMU does not reclaim leaks
            # at open either): repair them, as an admin would, so that the check after the session below shows that the
            # session itself adds none.
            $check = Get-QemuCheckU -Path $path
            $check.ExitCode | Should -BeIn ($Stage -eq 'metadata sync' ? @(0, 3) : @(0)) -Because "qemu-img check '$path' said: $($check.Output)"
            $check.Corruptions | Should -Be 0
            Write-FaultLog "qemu-img check: $($check.Leaks) leaked clusters after the process $How"
            if ($check.ExitCode -eq 3) { $null = & qemu-img check -q -r leaks -f qcow2 $path 2>&1 }
        }

        # A new process (this one) loads the image: every bitmap inconsistent, or exactly what was written.
        $shadow = @{}
        for ($i = 0; $i -lt $Granularities.Count; $i++) {
            $shadow["p$i"] = [Collections.Generic.SortedSet[long]]::new()
            foreach ($w in (Read-ShadowLog -Path $log)) { Add-RangeCluster -Set $shadow["p$i"] -Offset $w.Offset -Length $w.Length -Granularity $Granularities[$i] }
        }
        $null = Open-BlockNode -Path $path -Name disk
        $inconsistent = Assert-StoredBitmap -Node disk -Shadow $shadow
        Write-FaultLog "$inconsistent of $($Granularities.Count) bitmaps inconsistent after the process $How"
        # The way back: a full backup re-anchors p0; the other bitmaps that are inconsistent go.
        foreach ($b in @(Get-DirtyBitmap -Node disk | Where-Object { $_.Inconsistent -and $_.Name -ne 'p0' })) { Remove-DirtyBitmap -Node disk -Name $b.Name -Confirm:$false }
        $full = Join-Path $dir 'reanchor.qcow2'
        (Start-IncrementalBackup -Node disk -Target $full -Sync Full -Bitmap p0 -BitmapMode OnSuccess -Wait).Succeeded | Should -BeTrue
        Write-BlockNode -Node disk -Offset 100MB -Pattern 7 -Length 100KB -Confirm:$false
        $inc = Join-Path $dir 'inc.qcow2'
        (Start-IncrementalBackup -Node disk -Target $inc -Sync Incremental -Bitmap p0 -BackingFile $full -Wait).Succeeded | Should -BeTrue
        Close-BlockNode -Node disk -Confirm:$false
        Assert-QemuImageEqual -Path $inc -Reference $path
        if ($Format -eq 'Qcow2') { $null = Assert-QemuImageCheck -Path $path }
    }
}

Describe 'Stop-Job and Remove-Job -Force at random instants of a running backup (seed <Seed>)' -ForEach $SeedCases -Skip:$NoQemuImg {
    BeforeEach { $dir = New-TestDirectory }
    AfterEach {
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
    }

    It 'each ends Stopped or removed promptly, with no target, no partial and every dirty bit; the next backup verifies' {
        $rng = [Random]::new($Seed)
        $queue = [Collections.Generic.List[object]]::new()
        $nodes = @((New-FaultNode -Dir $dir -Rng $rng), (New-FaultNode -Dir $dir -Rng $rng))
        $sets = @{}
        foreach ($n in $nodes) { $sets[$n.Name] = New-WriteSet -Rng $rng -Size 2MB -Count 6 }
        # PausedOnError: -OnTargetError Stop, every write of the target failing (injected), so the job sits paused.
        $variants = 'Incremental', 'Always', 'Pending', 'Suspended', 'Grouped', 'RawFull', 'PausedOnError'
        $count = (Test-FaultFullSweep) ? 49 : 14
        $cancelled = 0
        for ($k = 0; $k -lt $count; $k++) {
            $variant = $variants[$k % $variants.Count]
            $remove = $rng.Next(2) -eq 1
            $delay = $rng.Next(0, 400)
            $writeAt = $rng.Next(0, $delay + 1)
            $use = ($variant -eq 'Grouped') ? $nodes : @($nodes[0])
            $before = @{}; $ref = @{}; $targets = @{}
            $specs = @(foreach ($n in $use) {
                $null = Write-Set -Node $n.Name -Writes $sets[$n.Name] -Rng $rng
                $before[$n.Name] = Get-DirtyClusterSet -Node $n.Name -Name b
                $ref[$n.Name] = Save-NodeSnapshot -Node $n.Name -Path (Join-Path $dir "ref$k-$($n.Name).raw")
                $p = @{ Node = $n.Name; Bitmap = 'b'; BytesPerSecond = 2MB }
                switch ($variant) {
                    'RawFull' { $p += @{ Target = (Join-Path $dir "t$k-$($n.Name).img"); Sync = 'Full'; BitmapMode = 'OnSuccess'; TargetFormat = 'Raw' }; $p.BytesPerSecond = 4MB }
                    'Always' { $p += @{ Target = (Join-Path $dir "t$k-$($n.Name).qcow2"); Sync = 'Bitmap'; BitmapMode = 'Always'; BackingFile = $n.Top } }
                    default { $p += @{ Target = (Join-Path $dir "t$k-$($n.Name).qcow2"); Sync = 'Incremental'; BackingFile = $n.Top } }
                }
                if ($variant -eq 'Pending') { $p.AutoFinalize = $false }
                if ($variant -eq 'PausedOnError') { $p.OnTargetError = 'Stop' }
                $targets[$n.Name] = $p.Target
                @{ Command = 'Start-IncrementalBackup'; Parameters = $p }
            })
            $jobs = @(if ($variant -eq 'Grouped') { Invoke-BitmapTransaction -CompletionMode Grouped -Action $specs } else { $p = $specs[0].Parameters; Start-IncrementalBackup @p })
            if ($variant -eq 'Suspended') { Suspend-IncrementalBackup -Job $jobs[0] -Confirm:$false }
            $rule = if ($variant -eq 'PausedOnError') { [BitmapBackup.Core.Testing.FaultInjection]::Add("$($targets[$use[0].Name]).partial", 'FileWrite', 0, [long]::MaxValue, -1) }
            # A write to the node while the backup runs (after its point in time): the bitmap keeps it whatever happens.
            Start-Sleep -Milliseconds $writeAt
            $during = [Collections.Generic.SortedSet[long]]::new()
            $w = (New-WriteSet -Rng $rng -Size 2MB -Count 1)[0]
            Write-BlockNode -Node $use[0].Name -Offset $w[0] -Data (New-FaultData -Rng $rng -Length $w[1]) -Confirm:$false
            Add-RangeCluster -Set $during -Offset $w[0] -Length $w[1]
            Start-Sleep -Milliseconds ($delay - $writeAt)
            $sw = [Diagnostics.Stopwatch]::StartNew()
            $paused = $jobs[0].Backup.PausedByError
            if ($remove) { Remove-Job -Job $jobs -Force } else { Stop-Job -Job $jobs }
            $sw.Elapsed.TotalSeconds | Should -BeLessThan $RemoveBound -Because "$($remove ? 'Remove-Job -Force' : 'Stop-Job') returns promptly"
            if ($rule) { [BitmapBackup.Core.Testing.FaultInjection]::Remove($rule) }
            $outcomes = for ($i = 0; $i -lt $jobs.Count; $i++) {
                $j = $jobs[$i]; $n = $use[$i]; $target = $targets[$n.Name]
                $j.Backup.Status | Should -Be 'Concluded'
                if ($remove) { Get-Job -Id $j.Id -ErrorAction SilentlyContinue | Should -BeNullOrEmpty }
                else { $j.State | Should -BeIn @('Stopped', 'Completed', 'Failed') }
                $expected = [Collections.Generic.SortedSet[long]]::new($during)
                if ($null -eq $j.Backup.Error) {
                    # It had completed before the stop: a complete backup, verified.
                    $variant | Should -Not -BeIn @('Pending', 'Suspended', 'PausedOnError')
                    if (-not $remove) { $j.State | Should -Be 'Completed' }
                    Test-Path -LiteralPath $target -PathType Leaf | Should -BeTrue
                    Test-Path -LiteralPath "$target.partial" | Should -BeFalse
                    Add-CompareCheck -Queue $queue -Path $target -Reference $ref[$n.Name] -Because "backup $k ($variant) completed before it was stopped"
                    if ($target -like '*.qcow2') { Add-ImageCheck -Queue $queue -Path $target -Because "backup $k ($variant)" }
                    $n.Top = $target
                    'completed'
                }
                else {
                    if ($j.Backup.Error.ErrorId -ne 'BackupCancelled') {
                        # The write made during the backup had to copy its old data first, into the failing target:
                        # the point in time is lost, and the backup fails (documented: it never fails the write).
                        $variant | Should -Be 'PausedOnError'
                        $j.Backup.Error.Message | Should -Match 'injected'
                    }
                    if (-not $remove) { $j.State | Should -Be ($j.Backup.Error.ErrorId -eq 'BackupCancelled' ? 'Stopped' : 'Failed') }
                    Assert-NoTargetFile -Target $target -Because "backup $k ($variant) was stopped"
                    if ($j.Backup.KeptPartialTarget) {
                        $variant | Should -Be 'Always'
                        $n.Top = "$target.partial"
                        Add-ImageCheck -Queue $queue -Path $n.Top -Because "partial image kept by stopped backup $k (-BitmapMode Always)"
                    }
                    else {
                        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
                        $expected.UnionWith($before[$n.Name])
                    }
                    ($j.Backup.Error.ErrorId -eq 'BackupCancelled' ? 'cancelled' : 'failed (copy-before-write)') + ($j.Backup.KeptPartialTarget ? ' (partial kept)' : '')
                }
                if ($n -eq $use[0]) { Assert-BitmapKept -Node $n.Name -Before $expected -Because "backup $k ($variant) stopped after $delay ms" }
                else { Assert-BitmapKept -Node $n.Name -Before ($null -eq $j.Backup.Error ? [Collections.Generic.SortedSet[long]]::new() : $before[$n.Name]) -Because "backup $k ($variant)" }
            }
            $cancelled += @($outcomes | Where-Object { $_ -like 'cancelled*' }).Count
            Write-FaultLog ("instant {0,2}: {1,-13} {2} after {3,3} ms{4}: {5}" -f $k, $variant, ($remove ? 'Remove-Job -Force' : 'Stop-Job'), $delay, ($paused ? ' (paused by the error)' : ''), ($outcomes -join ','))
            foreach ($n in $use) { Assert-NextBackup -Node $n -Tag "stop$k" -Queue $queue }
        }
        Assert-QueuedCheck -Queue $queue -Directory $dir
        $cancelled | Should -BeGreaterThan 0 -Because 'most instants land while the backup runs'
    }
}

Describe 'kill -9 of a child pwsh at random instants (seed <Seed>)' -ForEach $SeedCases -Skip:$NoQemuImg {
    BeforeAll {
        # What every child script starts with: the helpers, a log, and random writes logged before and after each one
        # ('W k offset length data|zero seed' / 'E k'), so that the parent knows the writes made before the kill.
        $script:ChildPrelude = @'
Import-Module '__HELPERS__'
$rng = [Random]::new(__SEED__)
$script:k = 0
function Write-Log([string] $Line) { [IO.File]::AppendAllText('__LOG__', "$Line`n") }
function Write-Random([string] $Node, [long] $Size, [int] $Count, [int] $MaxLength = 128KB, [int] $Align = 512) {
    for ($c = 0; $c -lt $Count; $c++) {
        $len = $Align * $rng.Next(1, [int]($MaxLength / $Align) + 1)
        $off = $Align * [long]$rng.Next(0, [int](($Size - $len) / $Align) + 1)
        $zero = $rng.Next(5) -eq 0
        $seed = $rng.Next()
        Write-Log "W $script:k $off $len $($zero ? 'zero' : 'data') $seed $Node"
        if ($zero) { Write-BlockNode -Node $Node -Offset $off -Zero -Length $len -Confirm:$false }
        else { Write-BlockNode -Node $Node -Offset $off -Data (New-FaultData -Rng ([Random]::new($seed)) -Length $len) -Confirm:$false }
        Write-Log "E $script:k"
        $script:k++
    }
}
'@

        function Start-KillChild {
            <#
            Start -Script (after the prelude) in a child pwsh, wait for -Ready in its log, wait a random time, kill -9 it;
            or, with -End, create the file '<Dir>/end' (the script ends itself when it sees it: exit, Remove-Module) and
            wait (bounded) for a normal exit.
            #>
            param([string] $Script, [string] $Dir, [int] $Seed, [string] $Ready, [int] $MaxDelay, [Random] $Rng, [switch] $End)
            $log = Join-Path $Dir 'child.log'
            $full = $ChildPrelude.Replace('__HELPERS__', (Join-Path $PSScriptRoot 'FaultHelpers.psm1')).Replace('__SEED__', "$Seed").Replace('__LOG__', $log) + "`n" + $Script.Replace('__DIR__', $Dir)
            $child = Start-FaultChild -Script $full -Directory $Dir
            try {
                Wait-FaultFile -Path $log -Pattern $Ready -Process $child -TimeoutSeconds 90 | Should -BeTrue -Because "the child gets to '$Ready' ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))"
                $delay = $Rng.Next(0, $MaxDelay)
                Start-Sleep -Milliseconds $delay
                $child.HasExited | Should -BeFalse -Because "the child runs until it is ended ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))"
                if ($End) {
                    $null = New-Item -ItemType File -Path (Join-Path $Dir 'end')
                    Wait-FaultChild -Process $child -TimeoutSeconds $Bound | Should -Be 0 -Because "the process exits normally, in bounded time ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))"
                }
            }
            finally { Stop-FaultChild -Process $child }
            $lines = @(Get-Content -LiteralPath $log)
            Write-FaultLog "$($End ? 'ended' : 'killed') $delay ms after '$Ready', at: $($lines[-1])"
            return $lines
        }

        function Assert-CrashedImage {
            <# qemu-img check of a qcow2 image left by a killed process: no corruption; leaks allowed (a crash may leave them). #>
            param([string] $Path, [string] $Because, [Collections.Generic.List[object]] $Queue)
            Add-ImageCheck -Queue $Queue -Path $Path -AllowLeaks -Because $Because
        }

        function Invoke-Reanchor {
            <# The way back after a crash: a full backup with bitmap -Bitmap re-anchors it (inconsistent or not), a write, an incremental that verifies. #>
            param([string] $Node, [string] $Dir, [string] $Bitmap, [Collections.Generic.List[object]] $Queue)
            $full = Join-Path $Dir "reanchor-$Node.qcow2"
            $r = Start-IncrementalBackup -Node $Node -Target $full -Sync Full -Bitmap $Bitmap -BitmapMode OnSuccess -Wait
            $r.Succeeded | Should -BeTrue -Because "$($r.Error)"
            (Get-DirtyBitmap -Node $Node -Name $Bitmap).Inconsistent | Should -BeFalse
            Write-BlockNode -Node $Node -Offset 64KB -Pattern 0x5a -Length 100KB -Confirm:$false
            $inc = Join-Path $Dir "after-$Node.qcow2"
            (Start-IncrementalBackup -Node $Node -Target $inc -Sync Incremental -Bitmap $Bitmap -BackingFile $full -Wait).Succeeded | Should -BeTrue
            Add-CompareCheck -Queue $Queue -Path $inc -Reference (Save-NodeSnapshot -Node $Node -Path (Join-Path $Dir "after-$Node.raw")) -Because 'the first incremental after the crash'
            Add-ImageCheck -Queue $Queue -Path $inc -Because 'the first incremental after the crash'
        }

        function Assert-BackupFiles {
            <#
            The targets a killed child left: a final name only for a complete backup (it reads as its reference, the node
            at its point in time, and checks clean); a '.partial' checks without corruption (a crash may leave leaks in it).
            Every backup the child logged as Completed exists. Returns how many were complete and partial.
            #>
            param([string] $Dir, [string] $Pattern, [string[]] $Lines, [Collections.Generic.List[object]] $Queue)
            $complete = 0; $partial = 0
            foreach ($f in @(Get-ChildItem -LiteralPath $Dir -Filter $Pattern)) {
                if ($f.Name -like '*.digests*') { continue }   # a backup's digest manifest (issue 11), not an image
                if ($f.Name -like '*.partial') {
                    $partial++
                    if ($f.Length -lt 256KB) {
                        # Killed while the target was being created (a new qcow2 target is 256 KiB once its header and
                        # tables are written): not an image yet, and its name says it is no backup; the next job ignores it.
                        Write-FaultLog "$($f.Name): $($f.Length) bytes, killed while it was created"
                        continue
                    }
                    Assert-CrashedImage -Path $f.FullName -Because 'a partial target left by a crash' -Queue $Queue
                    continue
                }
                $complete++
                $ref = Join-Path $Dir ($f.BaseName + '.ref.raw')
                Test-Path -LiteralPath $ref | Should -BeTrue
                Add-CompareCheck -Queue $Queue -Path $f.FullName -Reference $ref -Because 'a backup under its final name is complete'
                Add-ImageCheck -Queue $Queue -Path $f.FullName -Because 'a backup under its final name'
            }
            foreach ($line in ($Lines -match '^B \S+ Completed$')) {
                Test-Path -LiteralPath (Join-Path $Dir (($line -split ' ')[1] + '.qcow2')) | Should -BeTrue -Because "the child saw '$line'"
            }
            return "$complete complete, $partial partial"
        }
    }
    BeforeEach { $dir = New-TestDirectory }
    AfterEach {
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
    }

    It '<How> during backups of a <Format> node (<Cache>): images check, only complete backups carry their final name, the bitmap is <Bitmap>, the node reads as the shadow of its writes' -ForEach @(
        @{ How = 'kill -9'; Format = 'Qcow2'; Cache = 'WriteThrough'; End = ''; Bitmap = 'inconsistent or exact' }
        @{ How = 'kill -9'; Format = 'Raw'; Cache = 'WriteBack'; End = ''; Bitmap = 'inconsistent or exact' }
        @{ How = 'kill -9'; Format = 'Qcow2'; Cache = 'WriteBack'; End = ''; Bitmap = 'inconsistent or exact' }
        # A normal end while a backup runs: the backup is cancelled and the node closed cleanly (QEMU cancels its jobs
        # before it closes its block devices at exit), so the bitmap comes back clean and whole.
        @{ How = 'exit'; Format = 'Qcow2'; Cache = 'WriteBack'; End = 'exit 0'; Bitmap = 'exact' }
        @{ How = 'Remove-Module, then exit'; Format = 'Raw'; Cache = 'WriteBack'; End = 'Remove-Module BitmapBackup; Write-Log removed; exit 0'; Bitmap = 'exact' }
    ) {
        $rng = [Random]::new($Seed * 100 + ($Format -eq 'Raw' ? 1 : 2) + ($Cache -eq 'WriteBack' ? 10 : 0) + ($End ? 50 : 0))
        $path = Join-Path $dir ('disk' + ($Format -eq 'Raw' ? '.img' : '.qcow2'))
        $script = @"
`$null = New-BlockImage -Path '$path' -Size 4MB -Format $Format -Confirm:`$false
`$null = Open-BlockNode -Path '$path' -Name disk -Cache $Cache
Write-Random -Node disk -Size 4MB -Count 12
`$null = New-DirtyBitmap -Node disk -Name p -Persistent
Write-Log 'B full start'
`$null = Start-IncrementalBackup -Node disk -Target '__DIR__/full.qcow2' -Sync Full -Bitmap p -BitmapMode OnSuccess -Wait
Write-Log 'B full Completed'
`$prev = '__DIR__/full.qcow2'
for (`$i = 1; ; `$i++) {
    Write-Random -Node disk -Size 4MB -Count 3
    [IO.File]::WriteAllBytes("__DIR__/inc`$i.ref.raw", [byte[]](Read-BlockNode -Node disk -Offset 0 -Length 4MB))
    Write-Log "B inc`$i start"
    `$job = Start-IncrementalBackup -Node disk -Target "__DIR__/inc`$i.qcow2" -Sync Incremental -Bitmap p -BackingFile `$prev -BytesPerSecond 4MB
    while (`$job.State -eq 'Running') {
        Write-Random -Node disk -Size 4MB -Count 1; Start-Sleep -Milliseconds (`$rng.Next(0, 40))
        if (Test-Path '__DIR__/end') { Write-Log "ending `$(`$job.Status)"; $End }
    }
    `$null = Wait-Job -Job `$job
    Write-Log "B inc`$i `$(`$job.State)"
    if (`$job.State -eq 'Completed') { `$prev = "__DIR__/inc`$i.qcow2" }
    Remove-Job -Job `$job
}
"@
        $lines = Start-KillChild -Script $script -Dir $dir -Seed $Seed -Ready '^B inc1 start$' -MaxDelay 1500 -Rng $rng -End:([bool]$End)
        $queue = [Collections.Generic.List[object]]::new()
        Write-FaultLog (Assert-BackupFiles -Dir $dir -Pattern 'inc*.qcow2*' -Lines $lines -Queue $queue)
        if ($End) {
            @(Get-ChildItem -LiteralPath $dir -Filter '*.partial').Count | Should -Be 0 -Because 'the backup running at the exit was cancelled: its partial target is gone'
            if ($Format -eq 'Qcow2') { Add-ImageCheck -Queue $queue -Path $path -Because 'the node image after a normal exit' }
        }
        elseif ($Format -eq 'Qcow2') { Assert-CrashedImage -Path $path -Because 'the node image of a killed process' -Queue $queue }
        Assert-QueuedCheck -Queue $queue -Directory $dir

        $writes = @(Read-ShadowLog -Path (Join-Path $dir 'child.log'))
        $null = Open-BlockNode -Path $path -Name disk
        # What the node reads: every write that returned, but for a qcow2 node in write-back mode, whose last window
        # of metadata a crash may lose (documented); the write cut short by the kill may have landed or not.
        if (-not ($Format -eq 'Qcow2' -and $Cache -eq 'WriteBack' -and -not $End)) {
            $why = Assert-ShadowContent -Actual (Read-NodeBytes -Node disk) -Shadow (Get-ShadowBytes -Size 4MB -Writes $writes)
            $why | Should -BeNullOrEmpty -Because 'the node keeps every write that returned'
        }
        # The persistent bitmap: inconsistent (the node was open), or exact: every write since the last complete backup.
        $p = Get-DirtyBitmap -Node disk -Name p
        if ($End) { $p.Inconsistent | Should -BeFalse -Because 'the node was closed cleanly at the exit' }
        if (-not $p.Inconsistent) {
            $last = @($lines -match '^B \S+ start$' | Where-Object { Test-Path (Join-Path $dir ((($_ -split ' ')[1]) + '.qcow2')) })[-1]
            $from = [array]::IndexOf($lines, $last)
            $exact = [Collections.Generic.SortedSet[long]]::new()
            foreach ($w in $writes) { if ($w.Line -gt $from) { Add-RangeCluster -Set $exact -Offset $w.Offset -Length $w.Length } }
            Get-MissingCluster -Expected $exact -Actual (Get-DirtyClusterSet -Node disk -Name p) | Should -Be 'none' -Because 'a clean bitmap after a crash holds every write since its last backup'
        }
        Write-FaultLog "bitmap p: $($p.Inconsistent ? 'inconsistent' : 'consistent')"
        Invoke-Reanchor -Node disk -Dir $dir -Bitmap p -Queue $queue
        Close-BlockNode -Node disk -Confirm:$false
        if ($Format -eq 'Qcow2') {
            $null = & qemu-img check -q -r leaks -f qcow2 $path 2>&1   # what the crash leaked (checked above) is not the reopened session's
        }
        Assert-QueuedCheck -Queue $queue -Directory $dir
    }

    It 'during persistent-bitmap stores of a <Format> node (open, write, close, again): each bitmap is inconsistent or exact, never clean with bits missing' -ForEach @(
        @{ Format = 'Qcow2' }
        @{ Format = 'Raw' }
    ) {
        $rng = [Random]::new($Seed * 100 + ($Format -eq 'Raw' ? 21 : 22))
        $path = Join-Path $dir ('disk' + ($Format -eq 'Raw' ? '.img' : '.qcow2'))
        $script = @"
`$null = New-BlockImage -Path '$path' -Size 256MB -Format $Format -Confirm:`$false
`$granularities = @(512, 1KB, 2KB, 4KB, 8KB, 16KB, 32KB, 64KB, 512, 512, 512, 512, 4KB, 4KB, 64KB, 512)
for (`$i = 1; ; `$i++) {
    `$null = Open-BlockNode -Path '$path' -Name disk
    if (`$i -eq 1) { for (`$g = 0; `$g -lt `$granularities.Count; `$g++) { `$null = New-DirtyBitmap -Node disk -Name "p`$g" -Granularity `$granularities[`$g] -Persistent } }
    Write-Log "O `$i"
    Write-Random -Node disk -Size 256MB -Count 4 -MaxLength 64KB -Align 4096
    Write-Log "C `$i begin"
    Close-BlockNode -Node disk -Confirm:`$false
    Write-Log "C `$i end"
}
"@
        $lines = Start-KillChild -Script $script -Dir $dir -Seed $Seed -Ready '^C 2 begin$' -MaxDelay 1500 -Rng $rng
        $queue = [Collections.Generic.List[object]]::new()
        if ($Format -eq 'Qcow2') { Assert-CrashedImage -Path $path -Because 'a crash during a bitmap store may leave the clusters it had allocated' -Queue $queue }
        Assert-QueuedCheck -Queue $queue -Directory $dir
        $writes = @(Read-ShadowLog -Path (Join-Path $dir 'child.log'))
        $granularities = @(512, 1KB, 2KB, 4KB, 8KB, 16KB, 32KB, 64KB, 512, 512, 512, 512, 4KB, 4KB, 64KB, 512)
        $null = Open-BlockNode -Path $path -Name disk
        $inconsistent = 0
        for ($g = 0; $g -lt $granularities.Count; $g++) {
            $b = Get-DirtyBitmap -Node disk -Name "p$g"
            if ($b.Inconsistent) { $inconsistent++; continue }
            # Clean: it was stored at a close, after every write had returned: it holds exactly all of them.
            $exact = [Collections.Generic.SortedSet[long]]::new()
            foreach ($w in $writes) { Add-RangeCluster -Set $exact -Offset $w.Offset -Length $w.Length -Granularity $granularities[$g] }
            Format-ClusterSet (Get-DirtyClusterSet -Node disk -Name "p$g" -Granularity $granularities[$g]) | Should -Be (Format-ClusterSet $exact) -Because "bitmap p$g loaded clean"
        }
        Write-FaultLog "$inconsistent of $($granularities.Count) bitmaps inconsistent"
        @(Get-DirtyBitmap -Node disk | Where-Object Inconsistent).Count | Should -BeIn @(0, $granularities.Count) -Because 'one store writes every bitmap'
        foreach ($b in @(Get-DirtyBitmap -Node disk | Where-Object { $_.Name -ne 'p0' })) { Remove-DirtyBitmap -Node disk -Name $b.Name -Confirm:$false }
        Invoke-Reanchor -Node disk -Dir $dir -Bitmap p0 -Queue $queue
        Close-BlockNode -Node disk -Confirm:$false
        @(Get-ChildItem -LiteralPath $dir -Filter '*.tmp').Count | Should -Be 0 -Because 'the next store replaces what a crash left'
        if ($Format -eq 'Qcow2') { $null = & qemu-img check -q -r leaks -f qcow2 $path 2>&1 }
        Assert-QueuedCheck -Queue $queue -Directory $dir
    }

    It 'during transaction commits (grouped backups of two nodes; bitmaps added and removed with a backup): images check, only complete backups carry their final name, every bitmap inconsistent' {
        $rng = [Random]::new($Seed * 100 + 31)
        $script = @"
`$nodes = 'na', 'nc'
`$prev = @{}
foreach (`$n in `$nodes) {
    `$null = New-BlockImage -Path "__DIR__/`$n.qcow2" -Size 4MB -Confirm:`$false
    `$null = Open-BlockNode -Path "__DIR__/`$n.qcow2" -Name `$n
    Write-Random -Node `$n -Size 4MB -Count 6
    `$null = New-DirtyBitmap -Node `$n -Name p -Persistent
    `$null = Start-IncrementalBackup -Node `$n -Target "__DIR__/`$n-full.qcow2" -Sync Full -Bitmap p -BitmapMode OnSuccess -Wait
    `$prev[`$n] = "__DIR__/`$n-full.qcow2"
}
for (`$i = 1; ; `$i++) {
    foreach (`$n in `$nodes) {
        Write-Random -Node `$n -Size 4MB -Count 2
        [IO.File]::WriteAllBytes("__DIR__/`$n-inc`$i.ref.raw", [byte[]](Read-BlockNode -Node `$n -Offset 0 -Length 4MB))
    }
    `$backups = @(foreach (`$n in `$nodes) { @{ Command = 'Start-IncrementalBackup'; Parameters = @{ Node = `$n; Target = "__DIR__/`$n-inc`$i.qcow2"; Sync = 'Incremental'; Bitmap = 'p'; BackingFile = `$prev[`$n]; BytesPerSecond = 8MB } } })
    Write-Log "T `$i begin"
    if (`$i % 2) { `$jobs = @(Invoke-BitmapTransaction -CompletionMode Grouped -Action `$backups) }
    else {
        `$actions = @(@{ Command = 'New-DirtyBitmap'; Parameters = @{ Node = 'na'; Name = "s`$i"; Persistent = `$true } })
        if (`$i -gt 2) { `$actions += @{ Command = 'Remove-DirtyBitmap'; Parameters = @{ Node = 'na'; Name = "s`$(`$i - 2)" } } }
        `$jobs = @(Invoke-BitmapTransaction -Action (`$actions + `$backups) | Where-Object { `$_ -is [BitmapBackup.BackupPSJob] })
    }
    Write-Log "T `$i committed"
    `$null = `$jobs | Wait-Job
    foreach (`$j in `$jobs) {
        Write-Log "B `$(`$j.Node)-inc`$i `$(`$j.State)"
        if (`$j.State -eq 'Completed') { `$prev[`$j.Node] = "__DIR__/`$(`$j.Node)-inc`$i.qcow2" }
    }
    `$jobs | Remove-Job
}
"@
        $lines = Start-KillChild -Script $script -Dir $dir -Seed $Seed -Ready '^T 1 begin$' -MaxDelay 2000 -Rng $rng
        $queue = [Collections.Generic.List[object]]::new()
        Write-FaultLog (Assert-BackupFiles -Dir $dir -Pattern '*-inc*.qcow2*' -Lines $lines -Queue $queue)
        foreach ($n in 'na', 'nc') { Assert-CrashedImage -Path (Join-Path $dir "$n.qcow2") -Because 'the node image of a killed process' -Queue $queue }
        Assert-QueuedCheck -Queue $queue -Directory $dir
        foreach ($n in 'na', 'nc') {
            $null = Open-BlockNode -Path (Join-Path $dir "$n.qcow2") -Name $n
            foreach ($b in @(Get-DirtyBitmap -Node $n)) {
                $b.Inconsistent | Should -BeTrue -Because "bitmap '$($b.Name)' of node '$n' was in use when the process was killed"
                if ($b.Name -ne 'p') { Remove-DirtyBitmap -Node $n -Name $b.Name -Confirm:$false }
            }
            Invoke-Reanchor -Node $n -Dir $dir -Bitmap p -Queue $queue
            Close-BlockNode -Node $n -Confirm:$false
            $null = & qemu-img check -q -r leaks -f qcow2 (Join-Path $dir "$n.qcow2") 2>&1
        }
        Assert-QueuedCheck -Queue $queue -Directory $dir
    }
}

Describe 'Shadow model: random writes and zero writes on a tmpfs filled to random levels (<Format>, <Kind> bitmap, seed <Seed>)' -ForEach $ShadowCases -Skip:$NoQemuImg {
    BeforeEach {
        $dir = New-TestDirectory
        $mount = Mount-FaultTmpfs -Size 8MB -Parent $dir
    }
    AfterEach {
        if ($mount) { Clear-TmpfsFiller -Mount $mount }
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
        Dismount-FaultTmpfs -All
    }

    It 'every byte that differs from the last backup lies in a dirty cluster, in this process and the next; the next incremental makes the chain equal to the node; the image checks clean' {
        if (-not $mount) { Set-ItResult -Skipped -Because 'mounting a tmpfs needs root (mount -t tmpfs); CI runs as root'; return }
        $rng = [Random]::new($Seed * 100 + ($Format -eq 'Raw' ? 41 : 42) + ($Persistent ? 0 : 10))
        $size = 4MB
        $path = Join-Path $mount ('disk' + ($Format -eq 'Raw' ? '.img' : '.qcow2'))
        $null = New-BlockImage -Path $path -Size $size -Format $Format -Confirm:$false
        $null = Open-BlockNode -Path $path -Name disk
        # Data in a quarter of the node: writes elsewhere need new space (in place, they would not).
        for ($c = 0; $c -lt 16; $c++) { Write-BlockNode -Node disk -Offset (64KB * $rng.Next(0, 64)) -Data (New-FaultData -Rng $rng -Length 64KB) -Confirm:$false }
        $null = New-DirtyBitmap -Node disk -Name b -Persistent:$Persistent
        $top = Join-Path $dir 'full.qcow2'
        (Start-IncrementalBackup -Node disk -Target $top -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait).Succeeded | Should -BeTrue
        $last = Read-NodeBytes -Node disk        # what the last backup holds
        $expected = [byte[]]$last.Clone()        # what the node must read: every write applied, a failed one as it read back
        $queue = [Collections.Generic.List[object]]::new()
        $failures = 0
        $rounds = (Test-FaultFullSweep) ? 8 : 2
        for ($round = 1; $round -le $rounds; $round++) {
            $attempted = [Collections.Generic.SortedSet[long]]::new()
            $free = Set-TmpfsFree -Mount $mount -Free (4KB * $rng.Next(0, ($round -eq 1) ? 16 : 128))
            $failed = 0
            for ($op = 0; $op -lt ((Test-FaultFullSweep) ? 24 : 12); $op++) {
                $len = 512 * $rng.Next(1, 513)
                $off = 512 * [long]$rng.Next(0, [int](($size - $len) / 512) + 1)
                $zero = $rng.Next(3) -eq 0
                $data = $zero ? $null : (New-FaultData -Rng $rng -Length $len)
                Add-RangeCluster -Set $attempted -Offset $off -Length $len
                try {
                    if ($zero) { Write-BlockNode -Node disk -Offset $off -Zero -Length $len -Confirm:$false -ErrorAction Stop; [Array]::Clear($expected, $off, $len) }
                    else { Write-BlockNode -Node disk -Offset $off -Data $data -Confirm:$false -ErrorAction Stop; [Array]::Copy($data, 0, $expected, $off, $len) }
                }
                catch {
                    $_.FullyQualifiedErrorId | Should -Be 'ImageIOFailed,BitmapBackup.WriteBlockNodeCommand'
                    $_.Exception.Message | Should -Match 'No space left on device'
                    $_.Exception.Message | Should -Match ([regex]::Escape($path))
                    $failed++
                    # The range of a failed write may hold old or new bytes: the shadow takes what it reads back.
                    [Array]::Copy([byte[]](Read-BlockNode -Node disk -Offset $off -Length $len), 0, $expected, $off, $len)
                }
            }
            $failures += $failed
            Clear-TmpfsFiller -Mount $mount
            Write-FaultLog "round $round`: $free bytes free, $failed of the writes failed, $($attempted.Count) clusters written"

            # In this process: the bitmap marks the whole range of every write, failed or not, and nothing else; every
            # byte that differs from the last backup lies in a dirty cluster; the node reads as the shadow.
            $dirty = Get-DirtyClusterSet -Node disk -Name b
            Format-ClusterSet $dirty | Should -Be (Format-ClusterSet $attempted) -Because "round $round"
            $now = Read-NodeBytes -Node disk
            Get-FirstDifference -A $now -B $expected | Should -Be -1 -Because 'the node reads as the shadow of its writes'
            Get-MissingCluster -Expected (Get-DifferentCluster -A $now -B $last) -Actual $dirty | Should -Be 'none' -Because "every changed byte lies in a dirty cluster (round $round)"
            $snapshot = Join-Path $dir "now$round.raw"
            [IO.File]::WriteAllBytes($snapshot, $now)
            $inc = Join-Path $dir "inc$round.qcow2"
            if (-not $Persistent) {
                # The bitmap ends with the node: the incremental is taken in this process, before the close.
                (Start-IncrementalBackup -Node disk -Target $inc -Sync Incremental -Bitmap b -BackingFile $top -Wait).Succeeded | Should -BeTrue
                Add-CompareCheck -Queue $queue -Path $inc -Reference $snapshot -Because "the incremental after round $round"
            }
            Close-BlockNode -Node disk -Confirm:$false -WarningAction SilentlyContinue
            if ($Format -eq 'Qcow2') { Add-ImageCheck -Queue $queue -Path $path -Because "the node image after round $round and a close" }
            @(Get-ChildItem -LiteralPath $mount -Filter '*.tmp').Count | Should -Be 0

            # A new process: the node reads the same; a persistent bitmap comes back clean and whole, and the
            # incremental taken there makes the chain equal to the node.
            $child = if ($Persistent) {
                "`$null = Open-BlockNode -Path '$path' -Name disk; `$b = Get-DirtyBitmap -Node disk -Name b; 'inconsistent=' + `$b.Inconsistent
                (Get-DirtyBitmapRange -Node disk -Name b | ForEach-Object { '{0}+{1}' -f `$_.Offset, `$_.Length }) -join ';'
                'sha=' + [Convert]::ToHexString([Security.Cryptography.SHA256]::HashData([byte[]](Read-BlockNode -Node disk -Offset 0 -Length $size)))
                `$r = Start-IncrementalBackup -Node disk -Target '$inc' -Sync Incremental -Bitmap b -BackingFile '$top' -Wait; 'succeeded=' + `$r.Succeeded
                Close-BlockNode -Node disk -Confirm:`$false"
            }
            else {
                "`$null = Open-BlockNode -Path '$path' -Name disk -ReadOnly
                'sha=' + [Convert]::ToHexString([Security.Cryptography.SHA256]::HashData([byte[]](Read-BlockNode -Node disk -Offset 0 -Length $size)))
                Close-BlockNode -Node disk -Confirm:`$false"
            }
            $out = @(Invoke-FaultChild -Script $child -Directory $dir -Name "reopen$round")
            ($out -match '^sha=') | Should -Be ('sha=' + [Convert]::ToHexString([Security.Cryptography.SHA256]::HashData($now)))
            if ($Persistent) {
                $out[0] | Should -Be 'inconsistent=False'
                $out[1] | Should -Be ((Get-ClusterRangeText -Cluster @($attempted) -NodeSize $size) -join ';') -Because "the new process finds the bitmap whole (round $round)"
                ($out -match '^succeeded=') | Should -Be 'succeeded=True'
                Add-CompareCheck -Queue $queue -Path $inc -Reference $snapshot -Because "the incremental of the new process after round $round"
            }
            $top = $inc
            $last = $now
            $null = Open-BlockNode -Path $path -Name disk
            if (-not $Persistent) { $null = New-DirtyBitmap -Node disk -Name b }
        }
        Close-BlockNode -Node disk -Confirm:$false -WarningAction SilentlyContinue
        Assert-QueuedCheck -Queue $queue -Directory $dir
        $failures | Should -BeGreaterThan 0 -Because 'the campaign must meet ENOSPC'
    }
}

AfterAll {
    Dismount-FaultTmpfs -All
}
