# Start-IncrementalBackup and its job: the PowerShell job shape, -Wait, progress, status, Stop-Job, -AutoFinalize,
# the point in time (copy-before-write), the sync modes and target formats, Get-BackupChain and
# Restore-IncrementalBackup. Every backup is checked with the real qemu-img (compare against a raw copy of the
# node taken at the backup's point in time, and check of each qcow2 image).
BeforeDiscovery {
    $script:NoQemuImg = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
    if ($script:NoQemuImg) {
        Write-Warning 'qemu-img is not on PATH: the backup tests of Backup.Tests.ps1 are skipped (install qemu-utils; CI has it).'
    }
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    $script:Start = 'BitmapBackup.StartIncrementalBackupCommand'
    $script:Faults = [BitmapBackup.Core.Testing.FaultInjection]
    $script:Read = [BitmapBackup.Core.Testing.FaultOperation]::Read
    $script:Write = [BitmapBackup.Core.Testing.FaultOperation]::Write

    function New-SourceNode {
        <#
        A new qcow2 image in a new folder, opened as a node under a unique name, pre-filled as iotest 124's
        drive0 (0x41@0 512, 0xd5@1M 32k, 0xdc@32M 124k). Returns Dir, Path and Name.
        #>
        param([long] $Size = 64MB, [switch] $Empty)
        $dir = New-TestDirectory
        $path = Join-Path $dir 'drive0.qcow2'
        $null = New-BlockImage -Path $path -Size $Size -Confirm:$false
        $name = New-TestName 'n'
        $null = Open-BlockNode -Path $path -Name $name
        if (-not $Empty) {
            Write-BlockNode -Node $name -Offset 0 -Pattern 0x41 -Length 512 -Confirm:$false
            Write-BlockNode -Node $name -Offset 1MB -Pattern 0xd5 -Length 32KB -Confirm:$false
            Write-BlockNode -Node $name -Offset 32MB -Pattern 0xdc -Length 124KB -Confirm:$false
        }
        return [pscustomobject]@{ Dir = $dir; Path = $path; Name = $name }
    }

    function Write-BatchA {
        <# iotest 124's first write batch: 7 clusters of 64 KiB. #>
        param([string] $Node)
        Write-BlockNode -Node $Node -Offset 0 -Pattern 0xab -Length 512 -Confirm:$false
        Write-BlockNode -Node $Node -Offset 16MB -Pattern 0xfe -Length 256KB -Confirm:$false
        Write-BlockNode -Node $Node -Offset 32736KB -Pattern 0x64 -Length 64KB -Confirm:$false
    }

    function Write-BatchB {
        <# iotest 124's second write batch. #>
        param([string] $Node)
        Write-BlockNode -Node $Node -Offset 0 -Pattern 0x9a -Length 512 -Confirm:$false
        Write-BlockNode -Node $Node -Offset 8MB -Pattern 0x55 -Length 352KB -Confirm:$false
        Write-BlockNode -Node $Node -Offset 15872KB -Pattern 0x78 -Length 1MB -Confirm:$false
    }

    function Fill-Node {
        <#
        Write a distinct pattern in every MiB of [Start, Start+Size), so that any misplaced cluster shows. Throttled
        tests need it too: -BytesPerSecond paces the copy of data, not of holes.
        #>
        param([string] $Node, [long] $Size, [long] $Start = 0)
        for ($mib = $Start / 1MB; $mib -lt ($Start + $Size) / 1MB; $mib++) {
            Write-BlockNode -Node $Node -Offset ($mib * 1MB) -Pattern ((0x20 + $mib) % 256) -Length 1MB -Confirm:$false
        }
    }

    function Get-DataRangeText {
        <# The ranges qemu-img map shows as data in an image itself (depth 0), adjacent extents merged, as "offset+length". #>
        param([string] $Path)
        $ranges = [Collections.Generic.List[long[]]]::new()
        foreach ($e in (Get-QemuImageMap -Path $Path | Where-Object { $_.data -and $_.depth -eq 0 })) {
            if ($ranges.Count -gt 0 -and $ranges[-1][0] + $ranges[-1][1] -eq [long]$e.start) { $ranges[-1][1] += [long]$e.length }
            else { $ranges.Add([long[]]@([long]$e.start, [long]$e.length)) }
        }
        return [string[]]@($ranges | ForEach-Object { '{0}+{1}' -f $_[0], $_[1] })
    }

    $script:BatchA = @(@(0, 512), @(16MB, 256KB), @(32736KB, 64KB))
    $script:BatchB = @(@(0, 512), @(8MB, 352KB), @(15872KB, 1MB))
    $script:ResultProperties = @('Node', 'Target', 'Sync', 'Bitmap', 'BitmapMode', 'BytesCopied', 'BytesTotal', 'BytesRead', 'PointInTime',
        'Duration', 'BytesPerSecond', 'Succeeded', 'Error', 'ErrorId', 'Manifest')
}

Describe 'Start-IncrementalBackup as a PowerShell job' -Skip:$NoQemuImg {
    BeforeEach {
        $src = New-SourceNode
        $full = Join-Path $src.Dir 'full.qcow2'
    }
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'returns a BitmapBackupJob that Get-Job finds, Wait-Job waits for and Receive-Job gives one BackupResult' {
        $ref = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 'ref.raw')
        $before = [DateTimeOffset]::Now
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -JobName myfull
        $job | Should -BeOfType 'BitmapBackup.BackupPSJob'
        $job.PSJobTypeName | Should -BeExactly 'BitmapBackupJob'
        $job.Name | Should -BeExactly 'myfull'
        $job.Node | Should -BeExactly $src.Name
        $job.Location | Should -BeExactly $src.Name
        $job.Target | Should -BeExactly $full
        (Get-Job -Name myfull).InstanceId | Should -Be $job.InstanceId
        (Get-Job -Id $job.Id).InstanceId | Should -Be $job.InstanceId
        @(Get-Job | Where-Object PSJobTypeName -EQ 'BitmapBackupJob').Count | Should -Be 1

        $waited = Wait-Job -Job $job -Timeout 60
        $waited.InstanceId | Should -Be $job.InstanceId
        $job.State | Should -Be 'Completed'
        [string]$job.Status | Should -BeExactly 'Concluded'
        $job.HasMoreData | Should -BeTrue

        $results = @(Receive-Job -Job $job -ErrorVariable jobErrors)
        $jobErrors.Count | Should -Be 0
        $results.Count | Should -Be 1
        $r = $results[0]
        $r | Should -BeOfType 'BitmapBackup.BackupResult'
        ($r.PSObject.Properties.Name | Sort-Object) -join ',' | Should -BeExactly (($ResultProperties | Sort-Object) -join ',')
        $r.Node | Should -BeExactly $src.Name
        $r.Target | Should -BeExactly $full
        [string]$r.Sync | Should -BeExactly 'Full'
        $r.Bitmap | Should -BeNullOrEmpty
        $r.BitmapMode | Should -BeNullOrEmpty
        $r.Succeeded | Should -BeTrue
        $r.Error | Should -BeNullOrEmpty
        $r.ErrorId | Should -BeNullOrEmpty
        # a full backup copies what the disk holds (the fixture's four clusters); its holes cost nothing
        $r.BytesTotal | Should -Be (4 * 64KB)
        $r.BytesCopied | Should -Be (4 * 64KB)
        $r.Manifest | Should -BeNullOrEmpty -Because 'a backup without a bitmap writes no digest manifest'
        $r.PointInTime | Should -BeOfType [DateTimeOffset]
        $r.PointInTime | Should -BeGreaterOrEqual $before
        $r.PointInTime | Should -BeLessOrEqual ([DateTimeOffset]::Now)
        $r.Duration | Should -BeOfType [TimeSpan]
        $r.Duration | Should -BeGreaterOrEqual ([TimeSpan]::Zero)
        $r.BytesPerSecond | Should -BeGreaterThan 0

        $job.HasMoreData | Should -BeFalse
        @(Receive-Job -Job $job).Count | Should -Be 0
        Remove-Job -Job $job
        Get-Job -Name myfull -ErrorAction SilentlyContinue | Should -BeNullOrEmpty

        Test-Path -LiteralPath $full | Should -BeTrue
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
        $null = Assert-QemuImageCheck -Path $full
        Assert-QemuImageEqual -Path $full -Reference $ref
    }

    It 'names the job after the engine job (backupN) when -JobName is not given' {
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full
        $job.Name | Should -Match '^backup\d+$'
        $job.Backup.Id | Should -BeExactly $job.Name
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Completed'
    }

    It '-Wait writes the BackupResult itself and leaves no job behind' {
        $ref = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 'ref.raw')
        $out = @(Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Wait)
        $out.Count | Should -Be 1
        $out[0] | Should -BeOfType 'BitmapBackup.BackupResult'
        $out[0].Succeeded | Should -BeTrue
        $out[0].Target | Should -BeExactly $full
        @(Get-Job).Count | Should -Be 0
        Assert-QemuImageEqual -Path $full -Reference $ref
    }

    It '-Wait throws a terminating error with the failure''s id and leaves no target' {
        $rule = $Faults::Add($src.Path, $Read, 1MB, 64KB, 1)
        $record = Assert-BlockError { Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Wait -ErrorAction Stop } `
            -ErrorId "ImageIOFailed,$Start" -MessageContains "'$($src.Path)'", 'Input/output error' -Category ReadError
        $record.TargetObject | Should -BeExactly $src.Path
        $rule.Hits | Should -Be 1
        Test-Path -LiteralPath $full | Should -BeFalse
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
        @(Get-Job).Count | Should -Be 0
    }

    It '-Wait still terminates the pipeline under -ErrorAction SilentlyContinue when the backup fails' {
        $null = $Faults::Add('drive0.qcow2', $Read, 0, 64MB, -1)
        $reached = $false
        { Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Wait -ErrorAction SilentlyContinue; $reached = $true } |
            Should -Throw -ErrorId "ImageIOFailed,$Start"
        $reached | Should -BeFalse
    }

    It 'a failed job: State Failed, Status Concluded, the error is JobStateInfo.Reason, Receive-Job gives the result and writes the error once' {
        $rule = $Faults::Add('drive0.qcow2', $Read, 32MB, 64KB, 1)
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Failed'
        [string]$job.Status | Should -BeExactly 'Concluded'
        $rule.Hits | Should -Be 1
        $out = @(Receive-Job -Job $job -ErrorVariable jobErrors -ErrorAction SilentlyContinue)
        $out.Count | Should -Be 1
        $out[0] | Should -BeOfType 'BitmapBackup.BackupResult'
        $out[0].Succeeded | Should -BeFalse
        $out[0].ErrorId | Should -BeExactly 'ImageIOFailed'
        $out[0].Error | Should -BeLike "*'$($src.Path)'*offset 33554432*"
        # The failure is the job's JobStateInfo.Reason (the engine's exception: id, category); Receive-Job writes it
        # once, as JobStateFailed, as it does for a failed ThreadJob.
        $job.JobStateInfo.Reason.ErrorId | Should -BeExactly 'ImageIOFailed'
        [string]$job.JobStateInfo.Reason.Category | Should -BeExactly 'ReadError'
        $job.JobStateInfo.Reason.Message | Should -BeExactly $out[0].Error
        $jobErrors.Count | Should -Be 1
        $jobErrors[0].FullyQualifiedErrorId | Should -BeExactly 'JobStateFailed'
        $jobErrors[0].Exception | Should -Be $job.JobStateInfo.Reason
        Test-Path -LiteralPath $full | Should -BeFalse
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
    }

    It 'puts progress records in $job.Progress while it copies; Receive-Job passes them on' {
        Fill-Node -Node $src.Name -Size 16MB -Start 40MB   # data to pace
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -BytesPerSecond 16MB
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Completed'
        $records = @($job.Progress)
        $records.Count | Should -BeGreaterOrEqual 2
        $records | ForEach-Object { $_.Activity | Should -BeExactly "Backup of node '$($src.Name)'" }
        $records[0].RecordType | Should -Be 'Processing'
        $records[-1].RecordType | Should -Be 'Completed'
        $records[-1].PercentComplete | Should -Be 100
        $records[-1].StatusDescription | Should -BeLike 'Concluded: *'
        ($records | Select-Object -ExpandProperty ActivityId -Unique | Measure-Object).Count | Should -Be 1
        $ProgressPreference = 'SilentlyContinue'
        $null = Receive-Job -Job $job
        $job.Progress.Count | Should -Be 0
        $job.HasMoreData | Should -BeFalse
    }

    It 'Status goes Running, Paused (Suspend-IncrementalBackup), Running (Resume-IncrementalBackup), Concluded; State follows' {
        Fill-Node -Node $src.Name -Size 16MB   # data to pace, from the start of the disk
        # At 1 MB/s the four workers book their first MiBs of data for 0, 1, 2 and 3 s after the start.
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -BytesPerSecond 1MB
        [string]$job.Status | Should -BeExactly 'Running'
        $job.State | Should -Be 'Running'
        $job.BytesTotal | Should -Be (16MB + 2 * 64KB) -Because 'the 16 MiB written and the fixture''s two clusters past them: holes are not copied'
        $same = Suspend-IncrementalBackup -Job $job -PassThru -Confirm:$false
        $same.InstanceId | Should -Be $job.InstanceId
        [string]$job.Status | Should -BeExactly 'Paused'
        $job.State | Should -Be 'Suspended'
        Start-Sleep -Milliseconds 300   # a copy in flight when paused may still finish, nothing may start
        $copied = $job.BytesCopied
        Start-Sleep -Milliseconds 1500
        $job.BytesCopied | Should -Be $copied -Because 'a paused job starts no new copy (QEMU''s backup_pause cancels the background copy; only requests in flight finish)'
        $job.BytesCopied | Should -BeLessThan $job.BytesTotal
        Resume-IncrementalBackup -Job $job -Confirm:$false
        [string]$job.Status | Should -BeExactly 'Running'
        $job.State | Should -Be 'Running'
        $job.Backup.BytesPerSecond = 0   # the rest at full speed
        $null = $job | Wait-Job -Timeout 60
        [string]$job.Status | Should -BeExactly 'Concluded'
        $job.State | Should -Be 'Completed'
        (Receive-Job -Job $job).Succeeded | Should -BeTrue
        $null = Assert-QemuImageCheck -Path $full
    }

    It 'Stop-Job cancels: State Stopped, Status Concluded, neither target nor partial file, the bitmap keeps every bit' {
        Fill-Node -Node $src.Name -Size 16MB -Start 40MB   # data to pace
        $null = New-DirtyBitmap -Node $src.Name -Name b
        Write-BatchA -Node $src.Name
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -BytesPerSecond 8MB
        Test-Path -LiteralPath "$full.partial" | Should -BeTrue
        (Get-DirtyBitmap -Node $src.Name -Name b).Busy | Should -BeTrue
        Write-BatchB -Node $src.Name   # recorded by the successor while the job runs
        Stop-Job -Job $job
        $job.State | Should -Be 'Stopped'
        [string]$job.Status | Should -BeExactly 'Concluded'
        Test-Path -LiteralPath $full | Should -BeFalse
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
        $b = Get-DirtyBitmap -Node $src.Name -Name b
        $b.Busy | Should -BeFalse
        $b.Recording | Should -BeTrue
        $clusters = Get-WriteCluster -Write ($BatchA + $BatchB)
        $b.Count | Should -Be ($clusters.Count * 64KB)
        (Get-RangeText -Node $src.Name -Name b) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $clusters) -join ';')
        $out = @(Receive-Job -Job $job -ErrorVariable jobErrors)
        $jobErrors.Count | Should -Be 0
        $out.Count | Should -Be 1
        $out[0].Succeeded | Should -BeFalse
        $out[0].ErrorId | Should -BeExactly 'BackupCancelled'
    }

    It 'Stop-Job also cancels a job that Suspend-IncrementalBackup paused' {
        Fill-Node -Node $src.Name -Size 16MB -Start 40MB   # data to pace
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -BytesPerSecond 4MB
        Suspend-IncrementalBackup -Job $job -Confirm:$false
        Stop-Job -Job $job
        $job.State | Should -Be 'Stopped'
        [string]$job.Status | Should -BeExactly 'Concluded'
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
    }

    It 'Remove-Job refuses a running backup; Remove-Job -Force stops and removes it' {
        Fill-Node -Node $src.Name -Size 16MB -Start 40MB   # data to pace
        $null = New-DirtyBitmap -Node $src.Name -Name b
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -BytesPerSecond 4MB
        { Remove-Job -Job $job -ErrorAction Stop } | Should -Throw -ErrorId 'JobObjectNotFinishedCannotBeRemoved,Microsoft.PowerShell.Commands.RemoveJobCommand'
        Remove-Job -Job $job -Force
        Get-Job -Id $job.Id -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
        [string]$job.Backup.Status | Should -BeExactly 'Concluded'
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
        (Get-DirtyBitmap -Node $src.Name -Name b).Busy | Should -BeFalse
    }

    It 'takes the node from the pipeline and resolves a relative -Target against the current location' {
        Push-Location -LiteralPath $src.Dir
        try {
            $r = Get-BlockNode -Name $src.Name | Start-IncrementalBackup -Target 'relative.qcow2' -Sync Full -Wait
        }
        finally { Pop-Location }
        $r.Node | Should -BeExactly $src.Name
        $r.Target | Should -BeExactly (Join-Path $src.Dir 'relative.qcow2')
        Test-Path -LiteralPath (Join-Path $src.Dir 'relative.qcow2') | Should -BeTrue
    }

    It '-WhatIf starts nothing: no job, no file, the bitmap is not frozen' {
        $null = New-DirtyBitmap -Node $src.Name -Name b
        Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -WhatIf | Should -BeNullOrEmpty
        @(Get-Job).Count | Should -Be 0
        Test-Path -LiteralPath $full | Should -BeFalse
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
        (Get-DirtyBitmap -Node $src.Name -Name b).Busy | Should -BeFalse
    }

    It 'holds the node while it runs: Close-BlockNode and Resize-BlockNode are refused (NodeBusy)' {
        Fill-Node -Node $src.Name -Size 16MB -Start 40MB   # data to pace
        $job = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -BytesPerSecond 4MB
        { Close-BlockNode -Node $src.Name -Confirm:$false -ErrorAction Stop } | Should -Throw -ErrorId 'NodeBusy,BitmapBackup.CloseBlockNodeCommand'
        { Resize-BlockNode -Node $src.Name -Size 128MB -Confirm:$false -ErrorAction Stop } | Should -Throw -ErrorId 'NodeBusy,BitmapBackup.ResizeBlockNodeCommand'
        Stop-Job -Job $job
        $job.State | Should -Be 'Stopped'
    }
}

Describe 'Point in time: copy-before-write during a throttled backup' -Skip:$NoQemuImg {
    BeforeAll {
        function Write-Scattered {
            <# 4 KiB writes at -Count distinct clusters spread over the 32 MiB node; returns them as @(offset, length). #>
            param([string] $Node, [int] $Count, [int] $Step, [int] $First = 0, [int] $Pattern = 0x80, [long] $Shift = 1000)
            for ($k = $First; $k -lt $First + $Count; $k++) {
                $offset = (($k * $Step) % 512) * 64KB + $Shift
                Write-BlockNode -Node $Node -Offset $offset -Pattern (($Pattern + $k) % 256) -Length 4KB -Confirm:$false
                , @($offset, 4KB)
            }
        }
    }
    BeforeEach {
        $src = New-SourceNode -Size 32MB -Empty
        Fill-Node -Node $src.Name -Size 32MB
        $null = New-DirtyBitmap -Node $src.Name -Name b
    }
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    # Each test writes while the throttled background copy runs, then pauses the job (copy-before-write goes on)
    # and writes more, so that writes certainly land before the copy of their clusters, then lets it finish at
    # full speed.

    It 'a full backup equals the disk at its start, and the bitmap then holds exactly the clusters written during it' {
        $t0 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't0.raw')
        $target = Join-Path $src.Dir 'full.qcow2'
        $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -Bitmap b -BitmapMode OnSuccess -BytesPerSecond 8MB
        $writes = [Collections.Generic.List[object]]::new()
        foreach ($w in (Write-Scattered -Node $src.Name -Count 24 -Step 181)) { $writes.Add($w) }
        [string]$job.Status | Should -BeExactly 'Running' -Because 'the writes must land while the job runs'
        Suspend-IncrementalBackup -Job $job -Confirm:$false
        foreach ($w in (Write-Scattered -Node $src.Name -Count 24 -Step 181 -First 24)) { $writes.Add($w) }
        Write-BlockNode -Node $src.Name -Offset (20MB - 10) -Pattern 0xf1 -Length 20 -Confirm:$false       # across a cluster boundary
        $writes.Add(@((20MB - 10), 20))
        Write-BlockNode -Node $src.Name -Offset (24MB + 12345) -Pattern 0xf2 -Length 2MB -Confirm:$false   # over 33 clusters
        $writes.Add(@((24MB + 12345), 2MB))
        Write-BlockNode -Node $src.Name -Offset (32MB - 100KB) -Pattern 0xf3 -Length 100KB -Confirm:$false # up to the end
        $writes.Add(@((32MB - 100KB), 100KB))
        $job.BytesCopied | Should -BeLessThan 32MB
        (Get-DirtyBitmap -Node $src.Name -Name b).Count | Should -Be 0 -Because 'the frozen bitmap does not see writes made during the job'
        $job.Backup.BytesPerSecond = 0
        Resume-IncrementalBackup -Job $job -Confirm:$false

        $null = $job | Wait-Job -Timeout 60
        $r = Receive-Job -Job $job
        $r.Succeeded | Should -BeTrue
        $r.BytesCopied | Should -Be 32MB
        $null = Assert-QemuImageCheck -Path $target
        Assert-QemuImageEqual -Path $target -Reference $t0
        (Compare-QemuImage -Path $target -Reference (Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 'now.raw'))).ExitCode |
            Should -Be 1 -Because 'the node has moved on since the point in time'

        $expected = Get-WriteCluster -Write $writes
        $b = Get-DirtyBitmap -Node $src.Name -Name b
        $b.Busy | Should -BeFalse
        $b.Count | Should -Be ($expected.Count * 64KB)
        (Get-RangeText -Node $src.Name -Name b) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $expected) -join ';')
    }

    It 'an incremental backup equals the disk at its start, whether the writes hit dirty or clean clusters' {
        $anchor = Join-Path $src.Dir 'full.qcow2'
        $null = Start-IncrementalBackup -Node $src.Name -Target $anchor -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        for ($mib = 0; $mib -lt 32; $mib += 2) {   # every other MiB dirty: 16 MiB to copy
            Write-BlockNode -Node $src.Name -Offset ($mib * 1MB) -Pattern (0xa0 + $mib) -Length 1MB -Confirm:$false
        }
        (Get-DirtyBitmap -Node $src.Name -Name b).Count | Should -Be 16MB
        $t1 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't1.raw')
        $target = Join-Path $src.Dir 'inc1.qcow2'
        $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Incremental -Bitmap b -BackingFile 'full.qcow2' -BytesPerSecond 4MB
        $writes = [Collections.Generic.List[object]]::new()
        foreach ($w in (Write-Scattered -Node $src.Name -Count 20 -Step 37 -Shift 512)) { $writes.Add($w) }   # dirty and clean clusters alike
        [string]$job.Status | Should -BeExactly 'Running' -Because 'the writes must land while the job runs'
        Suspend-IncrementalBackup -Job $job -Confirm:$false
        foreach ($w in (Write-Scattered -Node $src.Name -Count 20 -Step 37 -First 20 -Shift 512)) { $writes.Add($w) }
        Write-BlockNode -Node $src.Name -Offset (3MB - 4KB) -Pattern 0xf4 -Length 1MB -Confirm:$false   # half dirty, half clean
        $writes.Add(@((3MB - 4KB), 1MB))
        $job.BytesCopied | Should -BeLessThan 16MB
        $job.Backup.BytesPerSecond = 0
        Resume-IncrementalBackup -Job $job -Confirm:$false
        $null = $job | Wait-Job -Timeout 60
        $r = Receive-Job -Job $job
        $r.Succeeded | Should -BeTrue
        $r.BytesTotal | Should -Be 16MB
        $r.BytesCopied | Should -Be 16MB
        $null = Assert-QemuImageCheck -Path $target
        Assert-QemuImageEqual -Path $target -Reference $t1
        $expected = Get-WriteCluster -Write $writes
        (Get-RangeText -Node $src.Name -Name b) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $expected) -join ';')
    }

    It 'two backups of the node at once each keep their own point in time' {
        $t0 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't0.raw')
        $first = Join-Path $src.Dir 'first.qcow2'
        $job1 = Start-IncrementalBackup -Node $src.Name -Target $first -Sync Full -BytesPerSecond 8MB
        $null = Write-Scattered -Node $src.Name -Count 12 -Step 67 -Pattern 0x40
        Suspend-IncrementalBackup -Job $job1 -Confirm:$false
        Write-BlockNode -Node $src.Name -Offset (8MB + 12345) -Pattern 0x5e -Length 2MB -Confirm:$false
        $t1 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't1.raw')
        $second = Join-Path $src.Dir 'second.qcow2'
        $job2 = Start-IncrementalBackup -Node $src.Name -Target $second -Sync Full -BytesPerSecond 8MB
        $null = Write-Scattered -Node $src.Name -Count 12 -Step 131 -Pattern 0x60 -Shift 8KB
        Suspend-IncrementalBackup -Job $job2 -Confirm:$false
        $null = Write-Scattered -Node $src.Name -Count 12 -Step 131 -First 12 -Pattern 0x60 -Shift 16KB
        Write-BlockNode -Node $src.Name -Offset (20MB - 4KB) -Pattern 0x5f -Length 3MB -Confirm:$false
        $job1.BytesCopied | Should -BeLessThan 32MB
        $job2.BytesCopied | Should -BeLessThan 32MB
        foreach ($job in $job1, $job2) {
            $job.Backup.BytesPerSecond = 0
            Resume-IncrementalBackup -Job $job -Confirm:$false
        }
        $null = Wait-Job -Job $job1, $job2 -Timeout 60
        (Receive-Job -Job $job1).Succeeded | Should -BeTrue
        (Receive-Job -Job $job2).Succeeded | Should -BeTrue
        Assert-QemuImageEqual -Path $first -Reference $t0
        Assert-QemuImageEqual -Path $second -Reference $t1
        $null = Assert-QemuImageCheck -Path $first
        $null = Assert-QemuImageCheck -Path $second
    }

    It 'a failed copy-before-write (<Side>) fails the backup, never the write, whatever -On<Side>Error says' -ForEach @(
        @{ Side = 'Source' }
        @{ Side = 'Target' }
    ) {
        $target = Join-Path $src.Dir 'cbw.qcow2'
        $onError = @{ "On$($Side)Error" = 'Ignore' }
        $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -Bitmap b -BitmapMode OnSuccess -BytesPerSecond 8MB @onError
        # Far ahead of the background copy: only the copy before the write below touches these clusters.
        $rule = if ($Side -eq 'Source') { $Faults::Add($src.Path, $Read, 30MB, 64KB, 1) } else { $Faults::Add('cbw.qcow2.partial', $Write, 30MB, 64KB, -1) }
        { Write-BlockNode -Node $src.Name -Offset (30MB + 4KB) -Pattern 0xc5 -Length 4KB -Confirm:$false -ErrorAction Stop } | Should -Not -Throw
        $rule.Hits | Should -BeGreaterOrEqual 1
        $Faults::Clear()
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $src.Name -Offset (30MB + 4KB) -Length 4KB) -Value 0xc5 | Should -Be -1
        $job.Backup.BytesPerSecond = 0
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Failed'
        $r = Receive-Job -Job $job -ErrorAction SilentlyContinue
        $r.ErrorId | Should -BeExactly 'ImageIOFailed'
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        $b = Get-DirtyBitmap -Node $src.Name -Name b
        $b.Busy | Should -BeFalse
        (Get-RangeText -Node $src.Name -Name b) -join ';' | Should -BeExactly ('{0}+{1}' -f 30MB, 64KB) -Because 'the job failed: the write made during it is kept'
    }

    It 'writes to the node are not slowed by -BytesPerSecond (only by the copy of the clusters they overwrite)' {
        # At 1 MB/s the workers have claimed the first MiBs of the disk and wait for their turn of the limit; a
        # write to the fourth MiB must still go through at once (QEMU's block-copy drops a claim before it sleeps).
        $job = Start-IncrementalBackup -Node $src.Name -Target (Join-Path $src.Dir 'slow.qcow2') -Sync Full -BytesPerSecond 1MB
        Start-Sleep -Milliseconds 300
        $watch = [Diagnostics.Stopwatch]::StartNew()
        Write-BlockNode -Node $src.Name -Offset (3MB + 4KB) -Pattern 0x01 -Length 4KB -Confirm:$false
        $watch.Stop()
        [string]$job.Status | Should -BeExactly 'Running'
        $watch.Elapsed.TotalSeconds | Should -BeLessThan 1.5 -Because 'copying one cluster first takes milliseconds; the rate limit is for the background copy only'
    }
}

Describe '-AutoFinalize $false and Complete-IncrementalBackup' -Skip:$NoQemuImg {
    BeforeEach {
        $src = New-SourceNode
        $null = New-DirtyBitmap -Node $src.Name -Name b
        Write-BatchA -Node $src.Name
        $target = Join-Path $src.Dir 'full.qcow2'
    }
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'waits Pending with the bitmap busy and no target file; Complete-IncrementalBackup finalizes it' {
        $t0 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't0.raw')
        $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -Bitmap b -BitmapMode OnSuccess -AutoFinalize $false
        Wait-BackupStatus -Job $job -Status Pending
        Start-Sleep -Milliseconds 300
        [string]$job.Status | Should -BeExactly 'Pending' -Because 'it waits for Complete-IncrementalBackup'
        $job.State | Should -Be 'Blocked' -Because 'it waits for the user (issue 20)'
        $job.BytesCopied | Should -Be $job.BytesTotal
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeTrue
        $b = Get-DirtyBitmap -Node $src.Name -Name b
        $b.Busy | Should -BeTrue
        $b.Count | Should -Be 458752
        { Clear-DirtyBitmap -Node $src.Name -Name b -Confirm:$false -ErrorAction Stop } | Should -Throw -ErrorId 'BitmapBusy,BitmapBackup.ClearDirtyBitmapCommand'
        Write-BlockNode -Node $src.Name -Offset 40MB -Pattern 0x44 -Length 64KB -Confirm:$false   # after the point in time
        (Get-DirtyBitmap -Node $src.Name -Name b).Count | Should -Be 458752

        $same = Complete-IncrementalBackup -Job $job -Wait -PassThru -Confirm:$false
        $same.InstanceId | Should -Be $job.InstanceId
        [string]$job.Status | Should -BeExactly 'Concluded'
        $null = $job | Wait-Job -Timeout 10
        $job.State | Should -Be 'Completed'
        (Receive-Job -Job $job).Succeeded | Should -BeTrue
        Test-Path -LiteralPath $target | Should -BeTrue
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        $b = Get-DirtyBitmap -Node $src.Name -Name b
        $b.Busy | Should -BeFalse
        (Get-RangeText -Node $src.Name -Name b) -join ';' | Should -BeExactly ('{0}+{1}' -f 40MB, 64KB)
        $null = Assert-QemuImageCheck -Path $target
        Assert-QemuImageEqual -Path $target -Reference $t0
    }

    It 'Complete-IncrementalBackup refuses a job that is still copying (JobStateInvalid)' {
        Fill-Node -Node $src.Name -Size 16MB -Start 40MB   # data to pace
        $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -AutoFinalize $false -BytesPerSecond 4MB
        $null = Assert-BlockError { Complete-IncrementalBackup -Job $job -Confirm:$false -ErrorAction Stop } `
            -ErrorId 'JobStateInvalid,BitmapBackup.CompleteIncrementalBackupCommand' -MessageContains "'Running'", "'finalize'"
        [string]$job.Status | Should -BeExactly 'Running'
    }

    It 'Stop-Job of a Pending job aborts it: no target, no partial file, every bit kept' {
        $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -Bitmap b -BitmapMode OnSuccess -AutoFinalize $false
        Wait-BackupStatus -Job $job -Status Pending
        Write-BlockNode -Node $src.Name -Offset 40MB -Pattern 0x44 -Length 64KB -Confirm:$false
        Stop-Job -Job $job
        $job.State | Should -Be 'Stopped'
        [string]$job.Status | Should -BeExactly 'Concluded'
        (Receive-Job -Job $job).ErrorId | Should -BeExactly 'BackupCancelled'
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        $expected = Get-WriteCluster -Write ($BatchA + , @(40MB, 64KB))
        $b = Get-DirtyBitmap -Node $src.Name -Name b
        $b.Busy | Should -BeFalse
        (Get-RangeText -Node $src.Name -Name b) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $expected) -join ';')
    }
}

Describe 'Sync modes and target formats' -Skip:$NoQemuImg {
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    Context '-Sync Top and -Sync Full on a qcow2 overlay' {
        BeforeEach {
            $dir = New-TestDirectory
            $base = Join-Path $dir 'base.qcow2'
            $null = New-BlockImage -Path $base -Size 16MB -Confirm:$false
            $bn = New-TestName 'b'
            $null = Open-BlockNode -Path $base -Name $bn
            Write-BlockNode -Node $bn -Offset 0 -Pattern 0x01 -Length 16MB -Confirm:$false
            Close-BlockNode -Node $bn -Confirm:$false
            $overlay = Join-Path $dir 'overlay.qcow2'
            $null = New-BlockImage -Path $overlay -BackingFile 'base.qcow2' -Confirm:$false
            $name = New-TestName 'o'
            $null = Open-BlockNode -Path $overlay -Name $name
            Write-BlockNode -Node $name -Offset 1MB -Pattern 0x02 -Length 64KB -Confirm:$false
            Write-BlockNode -Node $name -Offset (5MB + 10KB) -Pattern 0x03 -Length 100KB -Confirm:$false   # 2 clusters
            Write-BlockNode -Node $name -Offset 15MB -Zero -Length 64KB -Confirm:$false
        }

        It '-Sync Top copies only what the overlay stores; on its backing file it reads as the overlay' {
            $ref = Save-NodeSnapshot -Node $name -Path (Join-Path $dir 'ref.raw')
            $top = Join-Path $dir 'top.qcow2'
            $r = Start-IncrementalBackup -Node $name -Target $top -Sync Top -Wait
            $r.Succeeded | Should -BeTrue
            $r.BytesTotal | Should -Be (4 * 64KB)
            (Get-BlockImage -Path $top).BackingFile | Should -BeNullOrEmpty
            $null = Assert-QemuImageCheck -Path $top
            (Get-DataRangeText -Path $top) -join ';' | Should -BeExactly ('{0}+{1};{2}+{3}' -f 1MB, 64KB, 5MB, 128KB)
            (Invoke-QemuImg rebase -u -b 'base.qcow2' -F qcow2 -f qcow2 $top).ExitCode | Should -Be 0
            Assert-QemuImageEqual -Path $top -Reference $ref
        }

        It '-Sync Full copies what the whole chain holds into a standalone image' {
            $ref = Save-NodeSnapshot -Node $name -Path (Join-Path $dir 'ref.raw')
            $full = Join-Path $dir 'full.qcow2'
            $r = Start-IncrementalBackup -Node $name -Target $full -Sync Full -Wait
            $r.Succeeded | Should -BeTrue
            (Get-BlockImage -Path $full).BackingFile | Should -BeNullOrEmpty
            $null = Assert-QemuImageCheck -Path $full
            Assert-QemuImageEqual -Path $full -Reference $ref
        }
    }

    Context '-Sync None, -Compress, raw targets and odd sizes' {
        BeforeEach {
            $src = New-SourceNode -Size 16MB -Empty
            Fill-Node -Node $src.Name -Size 16MB
        }

        It '-Sync None copies only the clusters overwritten during the job, as they were at its start, and ends with Complete-IncrementalBackup' {
            $t0Path = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't0.raw')
            $target = Join-Path $src.Dir 'cbw.qcow2'
            $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync None
            $writes = @(@(4MB, 100KB), @((12MB + 4KB), 4KB), @((16MB - 1), 1))
            foreach ($w in $writes) { Write-BlockNode -Node $src.Name -Offset $w[0] -Pattern 0xee -Length $w[1] -Confirm:$false }
            Write-BlockNode -Node $src.Name -Offset 4MB -Pattern 0xef -Length 4KB -Confirm:$false   # the second write to a cluster copies nothing
            Start-Sleep -Milliseconds 300
            [string]$job.Status | Should -BeExactly 'Running' -Because 'a -Sync None job runs until it is completed'
            $job.State | Should -Be 'Blocked' -Because 'it waits for Complete-IncrementalBackup'
            Complete-IncrementalBackup -Job $job -Wait -Confirm:$false
            $job.State | Should -Be 'Completed'
            $r = Receive-Job -Job $job
            $r.Succeeded | Should -BeTrue
            $clusters = Get-WriteCluster -Write $writes
            $clusters -join ',' | Should -BeExactly '64,65,192,255'
            $r.BytesCopied | Should -Be ($clusters.Count * 64KB)

            # The expected image: zeros except the overwritten clusters, with their data of the start.
            $t0 = [IO.File]::ReadAllBytes($t0Path)
            $expected = [byte[]]::new(16MB)
            foreach ($c in $clusters) { [Array]::Copy($t0, $c * 64KB, $expected, $c * 64KB, 64KB) }
            $expectedPath = Join-Path $src.Dir 'expected.raw'
            [IO.File]::WriteAllBytes($expectedPath, $expected)
            $null = Assert-QemuImageCheck -Path $target
            Assert-QemuImageEqual -Path $target -Reference $expectedPath
            (Get-DataRangeText -Path $target) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $clusters) -join ';')
        }

        It '-Sync None: Stop-Job discards the target' {
            $target = Join-Path $src.Dir 'cbw.qcow2'
            $job = Start-IncrementalBackup -Node $src.Name -Target $target -Sync None
            Write-BlockNode -Node $src.Name -Offset 0 -Pattern 0xee -Length 4KB -Confirm:$false
            Stop-Job -Job $job
            $job.State | Should -Be 'Stopped'
            Test-Path -LiteralPath $target | Should -BeFalse
            Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        }

        It '-Compress writes compressed clusters that read back equal' {
            $ref = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 'ref.raw')
            $target = Join-Path $src.Dir 'compressed.qcow2'
            $r = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -Compress -Wait
            $r.Succeeded | Should -BeTrue
            Assert-QemuImageEqual -Path $target -Reference $ref
            $check = Assert-QemuImageCheck -Path $target
            $check.'compressed-clusters' | Should -BeGreaterThan 0 -Because 'the pattern data compresses well (qemu-img check counts compressed clusters)'
        }

        It 'a raw chain: a full raw backup, a copy of it updated in place by -Sync Incremental -UseExistingTarget' {
            $null = New-DirtyBitmap -Node $src.Name -Name b
            $full = Join-Path $src.Dir 'full.img'
            $t0 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't0.raw')
            $null = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -TargetFormat Raw -Wait
            $inc = Join-Path $src.Dir 'inc1.img'
            Copy-Item -LiteralPath $full -Destination $inc
            Write-BlockNode -Node $src.Name -Offset 3MB -Pattern 0x33 -Length 1000 -Confirm:$false
            Write-BlockNode -Node $src.Name -Offset 9MB -Zero -Length 64KB -Confirm:$false
            $t1 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't1.raw')
            $r = Start-IncrementalBackup -Node $src.Name -Target $inc -Sync Incremental -Bitmap b -UseExistingTarget -Wait
            $r.Succeeded | Should -BeTrue
            $r.BytesTotal | Should -Be (2 * 64KB)
            Assert-QemuImageEqual -Path $inc -Reference $t1
            Assert-QemuImageEqual -Path $full -Reference $t0
        }

        It 'a node whose size is not a multiple of the cluster size: the last, partial cluster is copied to the end' {
            $raw = Join-Path $src.Dir 'odd.img'
            $null = New-BlockImage -Path $raw -Size 1024000 -Confirm:$false
            $odd = New-TestName 'r'
            $null = Open-BlockNode -Path $raw -Name $odd
            Write-BlockNode -Node $odd -Offset 0 -Pattern 0x09 -Length 1024000 -Confirm:$false
            $null = New-DirtyBitmap -Node $odd -Name b
            $full = Join-Path $src.Dir 'odd.full.qcow2'
            $r = Start-IncrementalBackup -Node $odd -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
            $r.BytesTotal | Should -Be 1024000
            $r.BytesCopied | Should -Be 1024000
            (Get-BlockImage -Path $full).Size | Should -Be 1024000
            Write-BlockNode -Node $odd -Offset 1023999 -Pattern 0x07 -Length 1 -Confirm:$false
            Write-BlockNode -Node $odd -Offset 100 -Pattern 0x07 -Length 1 -Confirm:$false
            $t1 = Save-NodeSnapshot -Node $odd -Path (Join-Path $src.Dir 'odd.t1.raw')
            $inc = Join-Path $src.Dir 'odd.inc1.qcow2'
            $r = Start-IncrementalBackup -Node $odd -Target $inc -Sync Incremental -Bitmap b -BackingFile 'odd.full.qcow2' -Wait
            $r.BytesTotal | Should -Be (64KB + (1024000 - 15 * 64KB))
            $r.BytesCopied | Should -Be $r.BytesTotal
            $null = Assert-QemuImageCheck -Path $full
            $null = Assert-QemuImageCheck -Path $inc
            Assert-QemuImageEqual -Path $inc -Reference $t1
        }

        It '-TargetFormat Raw writes a raw full backup' {
            $ref = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 'ref.raw')
            $target = Join-Path $src.Dir 'full.img'
            $r = Start-IncrementalBackup -Node $src.Name -Target $target -Sync Full -TargetFormat Raw -Wait
            $r.Succeeded | Should -BeTrue
            $info = Get-BlockImage -Path $target
            [string]$info.Format | Should -BeExactly 'Raw'
            $info.Size | Should -Be 16MB
            (Get-Item -LiteralPath $target).Length | Should -Be 16MB
            (Invoke-QemuImg info --output=json $target).Output | ConvertFrom-Json | ForEach-Object { $_.format | Should -BeExactly 'raw' }
            Assert-QemuImageEqual -Path $target -Reference $ref
        }
    }
}

Describe 'Get-BackupChain and Restore-IncrementalBackup' -Skip:$NoQemuImg {
    BeforeEach {
        # full <- inc1 <- inc2, with a raw copy of the node at each point in time.
        $src = New-SourceNode
        $null = New-DirtyBitmap -Node $src.Name -Name b
        $full = Join-Path $src.Dir 'full.qcow2'
        $inc1 = Join-Path $src.Dir 'inc1.qcow2'
        $inc2 = Join-Path $src.Dir 'inc2.qcow2'
        $t0 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't0.raw')
        $null = Start-IncrementalBackup -Node $src.Name -Target $full -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        Write-BatchA -Node $src.Name
        $t1 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't1.raw')
        $null = Start-IncrementalBackup -Node $src.Name -Target $inc1 -Sync Incremental -Bitmap b -BackingFile 'full.qcow2' -Wait
        Write-BatchB -Node $src.Name
        $t2 = Save-NodeSnapshot -Node $src.Name -Path (Join-Path $src.Dir 't2.raw')
        $null = Start-IncrementalBackup -Node $src.Name -Target $inc2 -Sync Incremental -Bitmap b -BackingFile 'inc1.qcow2' -Wait
        Write-BlockNode -Node $src.Name -Offset 50MB -Pattern 0x99 -Length 1MB -Confirm:$false   # after the last backup
    }
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'Get-BackupChain lists the images from the base to the top, with their sizes' {
        $chain = @(Get-BackupChain -Path $inc2)
        $chain.Count | Should -Be 3
        $chain | ForEach-Object { $_ | Should -BeOfType 'BitmapBackup.BackupChainImage' }
        $chain.Depth -join ',' | Should -BeExactly '0,1,2'
        $chain.Path -join ',' | Should -BeExactly (@($full, $inc1, $inc2) -join ',')
        $chain.Format | ForEach-Object { [string]$_ | Should -BeExactly 'Qcow2' }
        $chain.Size | ForEach-Object { $_ | Should -Be 64MB }
        $chain.ClusterSize | ForEach-Object { $_ | Should -Be 64KB }
        $chain[0].BackingFile | Should -BeNullOrEmpty
        $chain[1].BackingFile | Should -BeExactly 'full.qcow2'
        $chain[2].BackingFile | Should -BeExactly 'inc1.qcow2'
        $chain[0].DataBytes | Should -Be (4 * 64KB)      # the fixture's four clusters
        $chain[1].DataBytes | Should -Be (7 * 64KB)      # batch A
        $chain[2].DataBytes | Should -Be (23 * 64KB)     # batch B
        foreach ($image in $chain) { $image.FileSize | Should -Be (Get-Item -LiteralPath $image.Path).Length }
        (Get-BackupChain -Path $inc1).Path -join ',' | Should -BeExactly (@($full, $inc1) -join ',')
        @(Get-Item -LiteralPath $inc2 | Get-BackupChain).Count | Should -Be 3
        foreach ($image in $chain) { $null = Assert-QemuImageCheck -Path $image.Path }
        $chain[2].ToString() | Should -BeExactly $inc2
    }

    It 'Restore-IncrementalBackup -Wait to raw gives the node at each backup''s point in time' {
        foreach ($case in @(@($full, $t0), @($inc1, $t1), @($inc2, $t2))) {
            $destination = $case[0] -replace '\.qcow2$', '.restored.img'
            $r = Restore-IncrementalBackup -Path $case[0] -Destination $destination -Wait
            $r | Should -BeOfType 'BitmapBackup.BackupResult'
            $r.Succeeded | Should -BeTrue
            $r.Target | Should -BeExactly $destination
            $r.BytesTotal | Should -BeLessThan 2MB -Because 'only what the chain holds is copied'
            [string](Get-BlockImage -Path $destination).Format | Should -BeExactly 'Raw'
            (Get-Item -LiteralPath $destination).Length | Should -Be 64MB
            [long](& stat -c '%b*%B' $destination | Invoke-Expression) | Should -BeLessOrEqual ($r.BytesTotal + 64KB) -Because 'the restored raw file stays sparse'
            Assert-QemuImageEqual -Path $destination -Reference $case[1]
        }
        @(Get-Job).Count | Should -Be 0
    }

    It 'Restore-IncrementalBackup as a job to qcow2 gives a standalone image of the node at that point in time' {
        $destination = Join-Path $src.Dir 'restored.qcow2'
        $job = Restore-IncrementalBackup -Path $inc1 -Destination $destination -Format Qcow2 -JobName restore1
        $job | Should -BeOfType 'BitmapBackup.BackupPSJob'
        $job.PSJobTypeName | Should -BeExactly 'BitmapBackupJob'
        (Get-Job -Name restore1).InstanceId | Should -Be $job.InstanceId
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Completed'
        $out = @(Receive-Job -Job $job)
        $out.Count | Should -Be 1
        $out[0].Succeeded | Should -BeTrue
        Remove-Job -Job $job
        $info = Get-BlockImage -Path $destination
        [string]$info.Format | Should -BeExactly 'Qcow2'
        $info.BackingFile | Should -BeNullOrEmpty
        $null = Assert-QemuImageCheck -Path $destination
        Assert-QemuImageEqual -Path $destination -Reference $t1
    }

    It 'Restore-IncrementalBackup has closed the chain when it returns (-Wait) or when its job has completed' {
        for ($i = 0; $i -lt 5; $i++) {
            $null = Restore-IncrementalBackup -Path $inc1 -Destination (Join-Path $src.Dir "wait$i.img") -Wait
            (Get-BlockNode | Where-Object Name -Like 'restore-*' | ForEach-Object Name) -join ',' | Should -BeNullOrEmpty -Because 'the temporary node of the restore must be gone'
            $name = New-TestName 'o'
            { Open-BlockNode -Path $inc1 -Name $name -ReadOnly -ErrorAction Stop } | Should -Not -Throw
            Close-BlockNode -Node $name -Confirm:$false
        }
        for ($i = 0; $i -lt 5; $i++) {
            $job = Restore-IncrementalBackup -Path $inc1 -Destination (Join-Path $src.Dir "job$i.img")
            $null = $job | Wait-Job -Timeout 60
            $job.State | Should -Be 'Completed'
            (Get-BlockNode | Where-Object Name -Like 'restore-*' | ForEach-Object Name) -join ',' | Should -BeNullOrEmpty -Because 'the temporary node of the restore must be gone'
            $name = New-TestName 'o'
            { Open-BlockNode -Path $inc1 -Name $name -ReadOnly -ErrorAction Stop } | Should -Not -Throw
            Close-BlockNode -Node $name -Confirm:$false
            Remove-Job -Job $job
        }
    }

    It 'Restore-IncrementalBackup refuses an existing destination (ImageAlreadyExists) and leaves it alone' {
        $before = (Get-Item -LiteralPath $t1).LastWriteTimeUtc
        $null = Assert-BlockError { Restore-IncrementalBackup -Path $inc2 -Destination $t1 -Wait -ErrorAction Stop } `
            -ErrorId 'ImageAlreadyExists,BitmapBackup.RestoreIncrementalBackupCommand'
        (Get-Item -LiteralPath $t1).LastWriteTimeUtc | Should -Be $before
        Get-BlockNode | Where-Object Name -Like 'restore-*' | Should -BeNullOrEmpty
    }
}
