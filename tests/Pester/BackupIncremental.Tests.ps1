# Port of QEMU's iotest 124 ("Tests for incremental drive-backup") to Start-IncrementalBackup: a full anchor that
# resets the bitmap, chains of incrementals each on -BackingFile the previous one, hollow incrementals, small and
# large bitmap granularities, larger target clusters, a node grown before a backup, and failures on source reads
# and target writes (report and retry, pause and resume, ignore). Each backup is compared by the real qemu-img
# with a raw copy of the node taken at its point in time, each image is checked by qemu-img check, and the
# last backup is compared with the node's own image file once the node is closed.
BeforeDiscovery {
    $script:NoQemuImg = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
    if ($script:NoQemuImg) {
        Write-Warning 'qemu-img is not on PATH: the iotest 124 port (BackupIncremental.Tests.ps1) is skipped (install qemu-utils; CI has it).'
    }
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    $script:Start = 'BitmapBackup.StartIncrementalBackupCommand'
    $script:Faults = [BitmapBackup.Core.Testing.FaultInjection]
    $script:Read = [BitmapBackup.Core.Testing.FaultOperation]::Read
    $script:Write = [BitmapBackup.Core.Testing.FaultOperation]::Write

    # iotest 124's write batches: @(offset, length, pattern).
    $script:BatchA = @(@(0, 512, 0xab), @(16MB, 256KB, 0xfe), @(32736KB, 64KB, 0x64))
    $script:BatchB = @(@(0, 512, 0x9a), @(8MB, 352KB, 0x55), @(15872KB, 1MB, 0x78))

    function New-Drive {
        <#
        iotest 124's drive0: a 64 MiB qcow2 image with 0x41@0 512, 0xd5@1M 32k and 0xdc@32M 124k, opened as a node,
        with bitmap0 (granularity -Granularity). Resets the list of backups that Assert-Backups checks.
        #>
        param([long] $Granularity = 64KB)
        $dir = New-TestDirectory
        $path = Join-Path $dir 'drive0.qcow2'
        $null = New-BlockImage -Path $path -Size 64MB -Confirm:$false
        $name = New-TestName 'd'
        $null = Open-BlockNode -Path $path -Name $name
        Write-Batch -Node $name -Batch @(@(0, 512, 0x41), @(1MB, 32KB, 0xd5), @(32MB, 124KB, 0xdc))
        $null = New-DirtyBitmap -Node $name -Name bitmap0 -Granularity $Granularity
        $script:Backups = [Collections.Generic.List[object]]::new()
        return [pscustomobject]@{ Dir = $dir; Path = $path; Name = $name }
    }

    function Write-Batch {
        param([string] $Node, [object[]] $Batch)
        foreach ($w in $Batch) { Write-BlockNode -Node $Node -Offset $w[0] -Pattern $w[2] -Length $w[1] -Confirm:$false }
    }

    function Get-BitmapCluster {
        <# The dirty bits (indices) that the writes of -Batch give at -Granularity. #>
        param([object[]] $Batch, [long] $Granularity)
        return Get-WriteCluster -Write @($Batch | ForEach-Object { , @($_[0], $_[1]) }) -Granularity $Granularity
    }

    function Get-JobBytes {
        <# What a job copies for dirty bits (indices) of -Granularity: whole job clusters of -JobCluster bytes. #>
        param([long[]] $Bit, [long] $Granularity, [long] $JobCluster = 64KB)
        $clusters = Get-WriteCluster -Write @($Bit | ForEach-Object { , @(($_ * $Granularity), $Granularity) }) -Granularity $JobCluster
        return $clusters.Count * $JobCluster
    }

    function Save-Reference {
        <# A raw copy of the node now, named after the backup it is the reference of. #>
        param($Drive, [string] $For)
        return Save-NodeSnapshot -Node $Drive.Name -Path (Join-Path $Drive.Dir ([IO.Path]::GetFileNameWithoutExtension($For) + '.ref.raw'))
    }

    function New-AnchorBackup {
        <# A full backup that also resets bitmap0 (-Sync Full -Bitmap bitmap0 -BitmapMode OnSuccess): the chain's base. #>
        param($Drive, [hashtable] $Extra = @{})
        $target = Join-Path $Drive.Dir 'full.qcow2'
        $ref = Save-Reference -Drive $Drive -For $target
        $r = Start-IncrementalBackup -Node $Drive.Name -Target $target -Sync Full -Bitmap bitmap0 -BitmapMode OnSuccess -Wait @Extra
        $r.Succeeded | Should -BeTrue
        $r.Bitmap | Should -BeExactly 'bitmap0'
        [string]$r.BitmapMode | Should -BeExactly 'OnSuccess'
        (Get-DirtyBitmap -Node $Drive.Name -Name bitmap0).Count | Should -Be 0 -Because 'the anchor resets the bitmap'
        $script:Backups.Add([pscustomobject]@{ Image = $target; Reference = $ref })
        return $r
    }

    function New-IncrementalBackup {
        <#
        An incremental backup on top of the last one (-BackingFile, relative to the folder), with -Wait. On success it
        joins the backups Assert-Backups checks and the bitmap must be empty; returns the BackupResult.
        #>
        param($Drive, [hashtable] $Extra = @{})
        $target = Join-Path $Drive.Dir ('inc{0}.qcow2' -f $script:Backups.Count)
        $ref = Save-Reference -Drive $Drive -For $target
        $backing = Split-Path -Leaf $script:Backups[-1].Image
        $r = Start-IncrementalBackup -Node $Drive.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile $backing -Wait @Extra
        $r.Succeeded | Should -BeTrue
        $r.Target | Should -BeExactly $target
        (Get-DirtyBitmap -Node $Drive.Name -Name bitmap0).Count | Should -Be 0
        (Get-BlockImage -Path $target).BackingFile | Should -BeExactly $backing
        $script:Backups.Add([pscustomobject]@{ Image = $target; Reference = $ref })
        return $r
    }

    function Assert-Backups {
        <#
        iotest 124's check_backups: every image is sound (qemu-img check) and its chain reads as the node at its point
        in time (qemu-img compare); then the node is closed and its own image must read as the last backup.
        #>
        param($Drive)
        foreach ($b in $script:Backups) {
            $null = Assert-QemuImageCheck -Path $b.Image
            Assert-QemuImageEqual -Path $b.Image -Reference $b.Reference
        }
        Close-BlockNode -Node $Drive.Name -Confirm:$false -WarningAction SilentlyContinue
        $null = Assert-QemuImageCheck -Path $Drive.Path
        Assert-QemuImageEqual -Path $script:Backups[-1].Image -Reference $Drive.Path
    }

    function Assert-Bitmap0 {
        <# bitmap0 holds exactly the dirty bits -Bit (indices at -Granularity). #>
        param($Drive, [long[]] $Bit, [long] $Granularity = 64KB)
        $b = Get-DirtyBitmap -Node $Drive.Name -Name bitmap0
        $b.Count | Should -Be ($Bit.Count * $Granularity)
        (Get-RangeText -Node $Drive.Name -Name bitmap0) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $Bit -Granularity $Granularity) -join ';')
    }
}

Describe 'Incremental backup chains (iotest 124)' -Skip:$NoQemuImg {
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It '<Test>: anchor, hollow incremental, batch A, batch B at granularity <Granularity>' -ForEach @(
        @{ Test = 'test_incremental_simple'; Granularity = 64KB }
        @{ Test = 'test_small_granularity'; Granularity = 512 }
        @{ Test = 'test_small_granularity'; Granularity = 4KB }
        @{ Test = 'test_large_granularity'; Granularity = 1MB }
        @{ Test = 'test_large_granularity'; Granularity = 2MB }
    ) {
        $d = New-Drive -Granularity $Granularity
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Granularity | Should -Be $Granularity
        Write-BlockNode -Node $d.Name -Offset 48MB -Pattern 0x11 -Length 64KB -Confirm:$false   # bits for the anchor to reset
        $null = New-AnchorBackup -Drive $d

        # Hollow: nothing dirty, still a valid image that reads as the previous one.
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be 0
        $r.BytesCopied | Should -Be 0
        (Get-QemuImageCheck -Path $r.Target).'allocated-clusters' | Should -Be 0

        Write-Batch -Node $d.Name -Batch $BatchA
        $bits = Get-BitmapCluster -Batch $BatchA -Granularity $Granularity
        Assert-Bitmap0 -Drive $d -Bit $bits -Granularity $Granularity
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be (Get-JobBytes -Bit $bits -Granularity $Granularity)
        $r.BytesCopied | Should -Be $r.BytesTotal

        Write-Batch -Node $d.Name -Batch $BatchB
        $bits = Get-BitmapCluster -Batch $BatchB -Granularity $Granularity
        Assert-Bitmap0 -Drive $d -Bit $bits -Granularity $Granularity
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be (Get-JobBytes -Bit $bits -Granularity $Granularity)

        @(Get-BackupChain -Path $r.Target).Count | Should -Be 4
        Assert-Backups -Drive $d
    }

    It 'test_larger_cluster_target: <ClusterSize>-byte target clusters, on -BackingFile and rebased like QEMU' -ForEach @(
        @{ ClusterSize = 128KB }
        @{ ClusterSize = 1MB }
    ) {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d -Extra @{ ClusterSize = $ClusterSize }
        (Get-BlockImage -Path $Backups[0].Image).ClusterSize | Should -Be $ClusterSize
        Write-Batch -Node $d.Name -Batch $BatchA
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Name | Should -BeExactly 'bitmap0'
        $b.Count | Should -Be 458752
        $b.Granularity | Should -Be 65536
        $b.Persistent | Should -BeFalse
        $b.Busy | Should -BeFalse
        $b.Recording | Should -BeTrue

        # The job copies whole target clusters.
        $r = New-IncrementalBackup -Drive $d -Extra @{ ClusterSize = $ClusterSize }
        $r.BytesTotal | Should -Be (Get-JobBytes -Bit (Get-BitmapCluster -Batch $BatchA -Granularity 64KB) -Granularity 64KB -JobCluster $ClusterSize)
        (Get-BlockImage -Path $r.Target).ClusterSize | Should -Be $ClusterSize

        # As iotest 124: an incremental into an existing image without backing file, rebased on the previous afterwards.
        Write-Batch -Node $d.Name -Batch $BatchB
        $target = Join-Path $d.Dir 'inc2.qcow2'
        $null = New-BlockImage -Path $target -Size 64MB -ClusterSize $ClusterSize -Confirm:$false
        $ref = Save-Reference -Drive $d -For $target
        $r = Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -UseExistingTarget -Wait
        $r.Succeeded | Should -BeTrue
        $r.BytesTotal | Should -Be (Get-JobBytes -Bit (Get-BitmapCluster -Batch $BatchB -Granularity 64KB) -Granularity 64KB -JobCluster $ClusterSize)
        (Get-BlockImage -Path $target).BackingFile | Should -BeNullOrEmpty
        $rebase = Invoke-QemuImg rebase -u -b 'inc1.qcow2' -F qcow2 -f qcow2 $target
        $rebase.ExitCode | Should -Be 0 -Because $rebase.Output
        $Backups.Add([pscustomobject]@{ Image = $target; Reference = $ref })
        Assert-Backups -Drive $d
    }

    It 'test_growing_before_backup: bits past the old end are copied into a larger image on the smaller backing file' {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Resize-BlockNode -Node $d.Name -Size 65MB -Confirm:$false
        # Unlike QEMU (count 0 here), growth marks the new megabyte: the anchor does not have it.
        Assert-Bitmap0 -Drive $d -Bit @(1024..1039)
        Write-BlockNode -Node $d.Name -Offset 64MB -Pattern 0x5a -Length 64KB -Confirm:$false
        Assert-Bitmap0 -Drive $d -Bit @(1024..1039)
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be 64KB -Because 'the zeros past the end of the backing file are left unallocated, not copied'
        $grown = @(Get-QemuImageMap -Path $r.Target | Where-Object { $_.start -ge 64MB + 64KB })
        $grown | Should -Not -BeNullOrEmpty
        $grown | ForEach-Object { $_.present | Should -BeFalse -Because 'nothing is written past the backing file''s end for zeros (no zero clusters)' }
        (Get-BlockImage -Path $r.Target).Size | Should -Be 65MB
        (Get-BackupChain -Path $r.Target).Size -join ',' | Should -BeExactly ('{0},{1}' -f 64MB, 65MB)
        Write-BlockNode -Node $d.Name -Offset (65MB - 512) -Pattern 0x5b -Length 512 -Confirm:$false
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be 64KB
        Assert-Backups -Drive $d
    }

    It 'zeros written after the anchor are zero clusters in the incremental that hide the older data (TestBackupZeroClusters)' {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Write-BlockNode -Node $d.Name -Offset 32MB -Zero -Length 64KB -Confirm:$false           # the fixture's 0xdc, zeroed
        Write-BlockNode -Node $d.Name -Offset 1MB -Pattern 0 -Length 64KB -Confirm:$false       # 0xd5, overwritten with zero bytes
        Write-BlockNode -Node $d.Name -Offset 40MB -Pattern 0x77 -Length 64KB -Confirm:$false   # plain data beside them
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be (3 * 64KB)
        $map = Get-QemuImageMap -Path $r.Target
        foreach ($offset in 1MB, 32MB) {
            $e = @($map | Where-Object { $_.start -le $offset -and $_.start + $_.length -gt $offset })
            $e.Count | Should -Be 1
            $e[0].depth | Should -Be 0 -Because "the cluster at $offset must be stored in the incremental, not read through to the anchor"
            $e[0].zero | Should -BeTrue
            $e[0].data | Should -BeFalse
        }
        Assert-Backups -Drive $d
    }

    It 'test_incremental_failure: a failed source read fails the job, the target is deleted, no bit is lost, the retry verifies' {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Write-Batch -Node $d.Name -Batch $BatchA
        $bitsA = Get-BitmapCluster -Batch $BatchA -Granularity 64KB
        $rule = $Faults::Add($d.Path, $Read, 16MB + 64KB, 64KB, 1)
        $target = Join-Path $d.Dir 'inc1.qcow2'
        $job = Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'full.qcow2'
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Failed'
        $result = Receive-Job -Job $job -ErrorAction SilentlyContinue
        $result.Succeeded | Should -BeFalse
        $result.ErrorId | Should -BeExactly 'ImageIOFailed'
        $rule.Hits | Should -Be 1
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Busy | Should -BeFalse
        $b.Recording | Should -BeTrue
        Assert-Bitmap0 -Drive $d -Bit $bitsA

        Write-Batch -Node $d.Name -Batch $BatchB
        $bitsAB = Get-BitmapCluster -Batch ($BatchA + $BatchB) -Granularity 64KB
        Assert-Bitmap0 -Drive $d -Bit $bitsAB
        $r = New-IncrementalBackup -Drive $d
        $r.BytesTotal | Should -Be ($bitsAB.Count * 64KB)
        Assert-Backups -Drive $d
    }

    It 'a failed target write fails the job the same way (-Wait: terminating error), and the retry verifies' {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Write-Batch -Node $d.Name -Batch $BatchA
        $rule = $Faults::Add('inc1.qcow2.partial', $Write, 32MB - 64KB, 128KB, 1)
        $target = Join-Path $d.Dir 'inc1.qcow2'
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'full.qcow2' -Wait -ErrorAction Stop } `
            -ErrorId "ImageIOFailed,$Start" -MessageContains "'$target.partial'" -Category WriteError
        $rule.Hits | Should -Be 1
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        Assert-Bitmap0 -Drive $d -Bit (Get-BitmapCluster -Batch $BatchA -Granularity 64KB)
        Write-Batch -Node $d.Name -Batch $BatchB
        $null = New-IncrementalBackup -Drive $d
        Assert-Backups -Drive $d
    }

    It 'test_incremental_pause: -On<Side>Error Stop pauses the job, the bitmap stays busy, Resume-IncrementalBackup retries' -ForEach @(
        @{ Side = 'Source' }
        @{ Side = 'Target' }
    ) {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Write-Batch -Node $d.Name -Batch $BatchA
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Count | Should -Be 458752
        $b.Granularity | Should -Be 65536
        $b.Busy | Should -BeFalse
        $b.Recording | Should -BeTrue
        $target = Join-Path $d.Dir 'inc1.qcow2'
        $ref = Save-Reference -Drive $d -For $target   # before the fault: Read-BlockNode reads through it too
        $rule = if ($Side -eq 'Source') { $Faults::Add($d.Path, $Read, 16MB, 64KB, 1) } else { $Faults::Add('inc1.qcow2.partial', $Write, 16MB, 64KB, 1) }
        $onError = @{ "On$($Side)Error" = 'Stop' }
        $job = Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'full.qcow2' @onError
        Wait-BackupStatus -Job $job -Status Paused
        $job.State | Should -Be 'Suspended'
        $job.Backup.PausedByError | Should -BeTrue
        $rule.Hits | Should -Be 1
        @($job.Warning).Count | Should -Be 1
        $job.Warning[0].Message | Should -BeLike "*paused after an error*Resume-IncrementalBackup retries.*" -Because "Linux has no Resume-Job (issue 20)"
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Count | Should -Be 458752
        $b.Busy | Should -BeTrue
        $b.Recording | Should -BeTrue
        Test-Path -LiteralPath "$target.partial" | Should -BeTrue

        Resume-IncrementalBackup -Job $job -Confirm:$false
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Completed'
        $r = Receive-Job -Job $job -WarningAction SilentlyContinue
        $r.Succeeded | Should -BeTrue
        $r.BytesCopied | Should -Be 458752
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Count | Should -Be 0
        $b.Busy | Should -BeFalse
        $b.Recording | Should -BeTrue
        $Backups.Add([pscustomobject]@{ Image = $target; Reference = $ref })
        Assert-Backups -Drive $d
    }

    It 'Stop-Job of a job paused by an error aborts it: no target, every bit kept, and the retry verifies' {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Write-Batch -Node $d.Name -Batch $BatchA
        $target = Join-Path $d.Dir 'inc1.qcow2'
        $rule = $Faults::Add($d.Path, $Read, 16MB, 64KB, -1)
        $job = Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'full.qcow2' -OnSourceError Stop
        Wait-BackupStatus -Job $job -Status Paused
        Stop-Job -Job $job
        $job.State | Should -Be 'Stopped'
        [string]$job.Status | Should -BeExactly 'Concluded'
        $rule.Hits | Should -BeGreaterOrEqual 1
        $Faults::Clear()
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Busy | Should -BeFalse
        Assert-Bitmap0 -Drive $d -Bit (Get-BitmapCluster -Batch $BatchA -Granularity 64KB)
        $null = New-IncrementalBackup -Drive $d
        Assert-Backups -Drive $d
    }

    It '-On<Side>Error Ignore retries the failed clusters by itself and the backup verifies' -ForEach @(
        @{ Side = 'Source' }
        @{ Side = 'Target' }
    ) {
        $d = New-Drive
        $null = New-AnchorBackup -Drive $d
        Write-Batch -Node $d.Name -Batch $BatchA
        $target = Join-Path $d.Dir 'inc1.qcow2'
        $ref = Save-Reference -Drive $d -For $target   # before the fault: Read-BlockNode reads through it too
        $rule = if ($Side -eq 'Source') { $Faults::Add('drive0.qcow2', $Read, 32MB, 64KB, 3) } else { $Faults::Add('inc1.qcow2.partial', $Write, 0, 64KB, 3) }
        $onError = @{ "On$($Side)Error" = 'Ignore' }
        $r = Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'full.qcow2' -Wait @onError
        $r.Succeeded | Should -BeTrue
        $rule.Hits | Should -Be 3
        $r.BytesCopied | Should -Be 458752
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Count | Should -Be 0
        $Backups.Add([pscustomobject]@{ Image = $target; Reference = $ref })
        Assert-Backups -Drive $d
    }

    It 'test_sync_dirty_bitmap_missing, _not_found and _bad_granularity are refused' {
        $d = New-Drive
        $target = Join-Path $d.Dir 'inc.qcow2'
        $null = New-AnchorBackup -Drive $d
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -BackingFile 'full.qcow2' -ErrorAction Stop } `
            -ErrorId "BitmapRequired,$Start" -MessageContains "'$($d.Name)'"
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap unknown -BackingFile 'full.qcow2' -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Start" -MessageContains "'unknown'"
        $null = Assert-BlockError { New-DirtyBitmap -Node $d.Name -Name bad -Granularity 64000 -ErrorAction Stop } `
            -ErrorId 'InvalidGranularity,BitmapBackup.NewDirtyBitmapCommand'
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
    }
}
