# Port of QEMU's iotest 257 ("Test bitmap-sync backups (incremental, differential, and partials)") to
# Start-IncrementalBackup: the bitmap-mode matrix (OnSuccess, Always, Never x success, cancel while pending, read
# failure partway x -Sync Bitmap, Full, Top) with the exact dirty bits after each job, and test_backup_api: the
# argument checks in QEMU's order with their error ids, plus the checks that follow them (source is target,
# existing target, sizes, backing file, speed, busy and inconsistent bitmaps). Images are checked with the real
# qemu-img: compare against reference copies taken at each point in time, and check.
BeforeDiscovery {
    $script:NoQemuImg = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
    if ($script:NoQemuImg) {
        Write-Warning 'qemu-img is not on PATH: the iotest 257 port (BackupModes.Tests.ps1) is skipped (install qemu-utils; CI has it).'
    }

    # iotest 257's main(): msync bitmap x every bitmap mode, msync full and top x on-success and always; each
    # with failure None (job-finalize), Simulated (cancelled while pending) and Intermediate (read error partway).
    $script:ModeMatrix = foreach ($combo in @(
            @('Bitmap', 'Never'), @('Bitmap', 'OnSuccess'), @('Bitmap', 'Always'),
            @('Full', 'OnSuccess'), @('Full', 'Always'), @('Top', 'OnSuccess'), @('Top', 'Always'))) {
        foreach ($failure in 'None', 'Simulated', 'Intermediate') {
            @{ Sync = $combo[0]; Mode = $combo[1]; Failure = $failure }
        }
    }

    # test_backup_api: every combination of sync mode, bitmap (none, missing, present) and bitmap mode (none or
    # one of three) that QEMU refuses, with the error of the first check that fails, in do_backup_common's order.
    function Get-ExpectedBackupError {
        param([string] $Sync, [string] $Bitmap, [string] $Mode)
        if ($Sync -in 'Bitmap', 'Incremental' -and -not $Bitmap) { return 'BitmapRequired' }
        if ($Sync -eq 'Incremental') {
            if ($Mode -and $Mode -ne 'OnSuccess') { return 'BitmapModeInvalid' }
            $Sync = 'Bitmap'; $Mode = 'OnSuccess'
        }
        if ($Bitmap) {
            if ($Bitmap -eq 'bitmap404') { return 'BitmapNotFound' }
            if (-not $Mode) { return 'BitmapModeRequired' }
            if ($Sync -eq 'None') { return 'BitmapWithSyncNone' }
            if ($Mode -eq 'Never' -and $Sync -ne 'Bitmap') { return 'BitmapModeNeverMeaningless' }
        }
        elseif ($Mode) { return 'BitmapModeWithoutBitmap' }
        return $null
    }
    $script:ApiMatrix = foreach ($sync in 'Incremental', 'Bitmap', 'Full', 'Top', 'None') {
        foreach ($bitmap in '', 'bitmap404', 'bitmap0') {
            foreach ($mode in '', 'OnSuccess', 'Always', 'Never') {
                $id = Get-ExpectedBackupError -Sync $sync -Bitmap $bitmap -Mode $mode
                if ($id) {
                    @{ Sync = $sync; Bitmap = $bitmap; Mode = $mode; ErrorId = $id
                        BitmapText = $(if ($bitmap) { $bitmap } else { '(none)' }); ModeText = $(if ($mode) { $mode } else { '(none)' }) }
                }
            }
        }
    }
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    $script:Start = 'BitmapBackup.StartIncrementalBackupCommand'
    $script:Faults = [BitmapBackup.Core.Testing.FaultInjection]
    $script:Read = [BitmapBackup.Core.Testing.FaultOperation]::Read

    # iotest 257's write groups, @(offset, length, pattern); each dirties the 64 KiB clusters noted. (The leading
    # commas keep each group one element of the list.)
    $script:Groups = @(
        , @(@(0, 64KB, 0x49), @(1MB, 64KB, 0x6c), @(32MB, 64KB, 0x6f), @((64MB - 64KB), 64KB, 0x76))                               # {0,16,512,1023}
        , @(@(0, 64KB, 0x65), @((1MB - 32KB), 64KB, 0x77), @((32MB + 32KB), 64KB, 0x72), @((64MB - 128KB), 64KB, 0x69))             # {0,15,16,512,513,1022}
        , @(@(64KB, 64KB, 0x74), @((1MB - 96KB), 64KB, 0x69), @((32MB + 96KB), 64KB, 0x6e), @((64MB - 128KB), 128KB, 0x67))          # {1,14,15,513,514,1022,1023}
        , @(@(64KB, 192KB, 0xaa), @((1MB - 160KB), 64KB, 0xbb), @((32MB + 160KB), 64KB, 0xcc), @((64MB - 256KB), 64KB, 0xdd))       # {1,2,3,13,14,514,515,1020}
    )

    function Write-Group {
        param([string] $Node, [int] $Index)
        foreach ($w in $Groups[$Index]) { Write-BlockNode -Node $Node -Offset $w[0] -Pattern $w[2] -Length $w[1] -Confirm:$false }
    }

    function Get-GroupCluster {
        <# The 64 KiB clusters that the groups given dirty. #>
        param([int[]] $Index)
        return Get-WriteCluster -Write @(foreach ($i in $Index) { foreach ($w in $Groups[$i]) { , @($w[0], $w[1]) } })
    }

    function Get-DirtyCluster {
        <# The dirty 64 KiB clusters of bitmap0, from Get-DirtyBitmapRange. #>
        param([string] $Node)
        return [long[]]@(Get-DirtyBitmapRange -Node $Node -Name bitmap0 | ForEach-Object {
                for ($o = $_.Offset; $o -lt $_.Offset + $_.Length; $o += 64KB) { [long]($o / 64KB) }
            })
    }

    function Assert-Bitmap0 {
        <# bitmap0 holds exactly the 64 KiB clusters -Cluster. #>
        param([string] $Node, [AllowEmptyCollection()] [long[]] $Cluster, [string] $Because)
        $b = Get-DirtyBitmap -Node $Node -Name bitmap0
        $b.Count | Should -Be ($Cluster.Count * 64KB) -Because $Because
        (Get-RangeText -Node $Node -Name bitmap0) -join ';' | Should -BeExactly ((Get-ClusterRangeText -Cluster $Cluster) -join ';') -Because $Because
    }

    function New-Drive {
        <# iotest 257's drive0: an empty 64 MiB qcow2 image in a new folder, opened as a node. #>
        param([long] $Size = 64MB, [string] $Extension = '.qcow2')
        $dir = New-TestDirectory
        $path = Join-Path $dir "drive0$Extension"
        $null = New-BlockImage -Path $path -Size $Size -Confirm:$false
        $name = New-TestName 'd'
        $null = Open-BlockNode -Path $path -Name $name
        return [pscustomobject]@{ Dir = $dir; Path = $path; Name = $name }
    }
}

Describe 'Bitmap sync modes (iotest 257 test_bitmap_sync)' -Skip:$NoQemuImg {
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'bitmap mode <Mode>, -Sync <Sync>, failure <Failure>' -ForEach $ModeMatrix {
        $d = New-Drive
        $node = $d.Name
        $all = [long[]](0..1023)
        $g0 = Get-GroupCluster 0
        $g1 = Get-GroupCluster 1
        $g2 = Get-GroupCluster 2
        $g3 = Get-GroupCluster 3

        # 1-2. G0, reference #0, bitmap0, G1 (6 bits), reference #1.
        Write-Group -Node $node -Index 0
        $fbackup0 = Save-NodeSnapshot -Node $node -Path (Join-Path $d.Dir 'fbackup0.raw')
        $null = New-DirtyBitmap -Node $node -Name bitmap0 -Granularity 64KB
        Write-Group -Node $node -Index 1
        $g1.Count | Should -Be 6
        Assert-Bitmap0 -Node $node -Cluster $g1
        $fbackup1 = Save-NodeSnapshot -Node $node -Path (Join-Path $d.Dir 'fbackup1.raw')

        # 3. Test backup #1 into a prepared image (QEMU's blockdev-create), auto-finalize off.
        $bsync1 = Join-Path $d.Dir 'bsync1.qcow2'
        $null = New-BlockImage -Path $bsync1 -BackingFile 'fbackup0.raw' -Confirm:$false
        if ($Failure -eq 'Intermediate') {
            # blkdebug's EIO partway: reads of cluster 1022 fail (the last run, so other clusters get copied first).
            # Every read fails, not only the first: with several workers another one could otherwise copy the
            # cluster in the instant before the job is cancelled, and the partial image would be complete.
            $rule = $Faults::Add($d.Path, $Read, 1022 * 64KB, 64KB, -1)
        }
        $job = Start-IncrementalBackup -Node $node -Target $bsync1 -UseExistingTarget -Sync $Sync -Bitmap bitmap0 -BitmapMode $Mode -AutoFinalize $false
        $job.Backup.ClusterSize | Should -Be 64KB
        $expectedTotal = switch ($Sync) { 'Bitmap' { $g1.Count * 64KB } 'Full' { 64MB } 'Top' { (Get-GroupCluster 0, 1).Count * 64KB } }
        $job.BytesTotal | Should -Be $expectedTotal

        if ($Failure -ne 'Intermediate') {
            # 4. While pending: bitmap0 is frozen with G1, G2 goes to its successor.
            Wait-BackupStatus -Job $job -Status Pending
            (Get-DirtyBitmap -Node $node -Name bitmap0).Busy | Should -BeTrue
            Write-Group -Node $node -Index 2
            Assert-Bitmap0 -Node $node -Cluster $g1 -Because 'the bitmap is frozen while the job runs'
            (Get-DirtyBitmap -Node $node -Name bitmap0).Busy | Should -BeTrue
            # 5. Finalize, or cancel while pending.
            if ($Failure -eq 'None') {
                Complete-IncrementalBackup -Job $job -Wait -Confirm:$false
                $job.State | Should -Be 'Completed'
            }
            else {
                Stop-Job -Job $job
                $job.State | Should -Be 'Stopped'
            }
        }
        else {
            $null = $job | Wait-Job -Timeout 60
            $job.State | Should -Be 'Failed'
            $rule.Hits | Should -BeGreaterOrEqual 1
            $Faults::Clear()   # Read-BlockNode reads through the rule too
        }
        $r1 = Receive-Job -Job $job -ErrorAction SilentlyContinue
        $r1.Succeeded | Should -Be ($Failure -eq 'None')
        $r1.ErrorId | Should -Be $(switch ($Failure) { 'None' { $null } 'Simulated' { 'BackupCancelled' } 'Intermediate' { 'ImageIOFailed' } })
        Test-Path -LiteralPath $bsync1 | Should -BeTrue -Because 'an existing target is kept, whatever the outcome'
        (Get-DirtyBitmap -Node $node -Name bitmap0).Busy | Should -BeFalse

        # 6. The bitmap after the job, by backup_cleanup_sync_bitmap's rule.
        $written2 = if ($Failure -eq 'Intermediate') { @() } else { $g2 }
        if ($Mode -eq 'Always' -and $Failure -eq 'Intermediate') {
            # Synced, then the clusters not copied added back: all of the job's clusters but those it copied.
            $jobClusters = switch ($Sync) { 'Bitmap' { $g1 } 'Full' { $all } 'Top' { Get-GroupCluster 0, 1 } }
            $left = @(Get-DirtyCluster -Node $node)
            $left.Count * 64KB | Should -Be ($jobClusters.Count * 64KB - $r1.BytesCopied) -Because 'every cluster is either copied or dirty again'
            $left | Should -Contain 1022 -Because 'the cluster whose read failed was not copied'
            @($left | Where-Object { $_ -notin $jobClusters }).Count | Should -Be 0
            $r1.BytesCopied | Should -BeLessThan $r1.BytesTotal
            $model = $left
        }
        elseif (($Failure -eq 'None' -and $Mode -ne 'Never') -or $Mode -eq 'Always') {
            $model = $written2
        }
        else {
            $model = @($g1) + @($written2)
        }
        $model = [long[]]@($model | Sort-Object -Unique)
        Assert-Bitmap0 -Node $node -Cluster $model -Because "bitmap mode $Mode after failure $Failure"

        # 7. G3, reference #2.
        Write-Group -Node $node -Index 3
        $model = [long[]]@(@($model) + @($g3) | Sort-Object -Unique)
        Assert-Bitmap0 -Node $node -Cluster $model
        $fbackup2 = Save-NodeSnapshot -Node $node -Path (Join-Path $d.Dir 'fbackup2.raw')

        # 8. Test backup #2: -Sync Bitmap with the same mode, on backup #1 if that one is usable, else on reference #0.
        $base2 = if ($Failure -eq 'None' -or $Mode -eq 'Always') { 'bsync1.qcow2' } else { 'fbackup0.raw' }
        $bsync2 = Join-Path $d.Dir 'bsync2.qcow2'
        $null = New-BlockImage -Path $bsync2 -BackingFile $base2 -Confirm:$false
        $job2 = Start-IncrementalBackup -Node $node -Target $bsync2 -UseExistingTarget -Sync Bitmap -Bitmap bitmap0 -BitmapMode $Mode -AutoFinalize $false
        $job2.BytesTotal | Should -Be ($model.Count * 64KB)
        Wait-BackupStatus -Job $job2 -Status Pending
        Complete-IncrementalBackup -Job $job2 -Wait -Confirm:$false
        $job2.State | Should -Be 'Completed'
        (Receive-Job -Job $job2).Succeeded | Should -BeTrue
        if ($Mode -eq 'Never') { Assert-Bitmap0 -Node $node -Cluster $model -Because 'Never keeps every bit' }
        else { Assert-Bitmap0 -Node $node -Cluster @() -Because "$Mode clears the bitmap after a successful backup" }

        # 9. Cleanup.
        Remove-DirtyBitmap -Node $node -Name bitmap0 -Confirm:$false
        @(Get-DirtyBitmap -Node $node).Count | Should -Be 0

        # 10. Verification with qemu-img.
        $null = Assert-QemuImageCheck -Path $bsync1
        $null = Assert-QemuImageCheck -Path $bsync2
        $c1 = Compare-QemuImage -Path $bsync1 -Reference $fbackup1
        if ($Failure -eq 'Intermediate') {
            $c1.ExitCode | Should -Be 1 -Because "backup #1 failed partway ($($r1.BytesCopied) of $($r1.BytesTotal) bytes copied, $($rule.Hits) read failed), so it must differ from reference #1 ($($c1.Output))"
        }
        else {
            $c1.ExitCode | Should -Be 0 -Because "backup #1 must read as reference #1 ($($c1.Output))"
        }
        Assert-QemuImageEqual -Path $bsync2 -Reference $fbackup2
        Close-BlockNode -Node $node -Confirm:$false -WarningAction SilentlyContinue
        $null = Assert-QemuImageCheck -Path $d.Path
        Assert-QemuImageEqual -Path $d.Path -Reference $fbackup2
    }
}

Describe 'Bitmap mode Always with a new target: the partial image of a failed backup is kept (iotest 257''s partials)' -Skip:$NoQemuImg {
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'keeps the .partial image with the clusters it copied, the bitmap has the rest, and the next incremental on it is complete' {
        $d = New-Drive
        $node = $d.Name
        $null = New-DirtyBitmap -Node $node -Name bitmap0
        Write-Group -Node $node -Index 0
        $null = Start-IncrementalBackup -Node $node -Target (Join-Path $d.Dir 'full.qcow2') -Sync Full -Bitmap bitmap0 -BitmapMode OnSuccess -Wait
        Write-Group -Node $node -Index 1
        Write-BlockNode -Node $node -Offset 40MB -Pattern 0x3c -Length 8MB -Confirm:$false   # 8 runs claimed before cluster 1022's
        $fbackup1 = Save-NodeSnapshot -Node $node -Path (Join-Path $d.Dir 'fbackup1.raw')
        $dirty = @(Get-DirtyCluster -Node $node)
        $dirty.Count | Should -Be (6 + 128)

        $inc1 = Join-Path $d.Dir 'inc1.qcow2'
        $rule = $Faults::Add($d.Path, $Read, 1022 * 64KB, 64KB, -1)
        $job = Start-IncrementalBackup -Node $node -Target $inc1 -Sync Bitmap -Bitmap bitmap0 -BitmapMode Always -BackingFile 'full.qcow2'
        $null = $job | Wait-Job -Timeout 60
        $Faults::Clear()
        $job.State | Should -Be 'Failed'
        $rule.Hits | Should -BeGreaterOrEqual 1
        $r = Receive-Job -Job $job -ErrorAction SilentlyContinue
        $r.ErrorId | Should -BeExactly 'ImageIOFailed'
        $r.Error | Should -BeLike "*'$inc1.partial'*"
        $r.BytesCopied | Should -BeGreaterThan 0
        Test-Path -LiteralPath $inc1 | Should -BeFalse -Because 'only a complete backup gets the target''s name'
        Test-Path -LiteralPath "$inc1.partial" | Should -BeTrue -Because 'with Always the copied clusters are no longer dirty: they are kept there'
        $left = @(Get-DirtyCluster -Node $node)
        $left | Should -Contain 1022
        @($left | Where-Object { $_ -notin $dirty }).Count | Should -Be 0
        $left.Count * 64KB | Should -Be ($dirty.Count * 64KB - $r.BytesCopied)
        $null = Assert-QemuImageCheck -Path "$inc1.partial"
        (Compare-QemuImage -Path "$inc1.partial" -Reference $fbackup1).ExitCode | Should -Be 1

        # QEMU's recovery: the next backup with the same bitmap, on top of the partial image.
        Write-Group -Node $node -Index 3
        $fbackup2 = Save-NodeSnapshot -Node $node -Path (Join-Path $d.Dir 'fbackup2.raw')
        $inc2 = Join-Path $d.Dir 'inc2.qcow2'
        $r2 = Start-IncrementalBackup -Node $node -Target $inc2 -Sync Bitmap -Bitmap bitmap0 -BitmapMode Always -BackingFile 'inc1.qcow2.partial' -Wait
        $r2.Succeeded | Should -BeTrue
        (Get-DirtyBitmap -Node $node -Name bitmap0).Count | Should -Be 0
        $null = Assert-QemuImageCheck -Path $inc2
        Assert-QemuImageEqual -Path $inc2 -Reference $fbackup2
    }

    It 'a <Mode> backup into a new target that fails leaves no file at all' -ForEach @(
        @{ Mode = 'OnSuccess' }
        @{ Mode = 'Never' }
    ) {
        $d = New-Drive
        $null = New-DirtyBitmap -Node $d.Name -Name bitmap0
        $null = Start-IncrementalBackup -Node $d.Name -Target (Join-Path $d.Dir 'full.qcow2') -Sync Full -Wait
        Write-Group -Node $d.Name -Index 1
        Write-BlockNode -Node $d.Name -Offset 40MB -Pattern 0x3c -Length 8MB -Confirm:$false
        $inc1 = Join-Path $d.Dir 'inc1.qcow2'
        $null = $Faults::Add($d.Path, $Read, 1022 * 64KB, 64KB, -1)
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $inc1 -Sync Bitmap -Bitmap bitmap0 -BitmapMode $Mode -BackingFile 'full.qcow2' -Wait -ErrorAction Stop } `
            -ErrorId "ImageIOFailed,$Start"
        Test-Path -LiteralPath $inc1 | Should -BeFalse
        Test-Path -LiteralPath "$inc1.partial" | Should -BeFalse
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Count | Should -Be ((6 + 128) * 64KB)
    }
}

Describe 'Argument checks in QEMU''s order (iotest 257 test_backup_api)' {
    BeforeEach {
        $d = New-Drive
        $null = New-DirtyBitmap -Node $d.Name -Name bitmap0
        Write-BlockNode -Node $d.Name -Offset 1MB -Pattern 7 -Length 64KB -Confirm:$false
        $target = Join-Path $d.Dir 'target.qcow2'
    }
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It '-Sync <Sync>, bitmap <BitmapText>, bitmap mode <ModeText>: <ErrorId>' -ForEach $ApiMatrix {
        $arguments = @{ Node = $d.Name; Target = $target; Sync = $Sync }
        if ($Bitmap) { $arguments.Bitmap = $Bitmap }
        if ($Mode) { $arguments.BitmapMode = $Mode }
        $null = Assert-BlockError { Start-IncrementalBackup @arguments -ErrorAction Stop } -ErrorId "$ErrorId,$Start" -Category $(if ($ErrorId -eq 'BitmapNotFound') { 'ObjectNotFound' } else { 'InvalidArgument' })
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        @(Get-Job).Count | Should -Be 0
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Busy | Should -BeFalse
        $b.Count | Should -Be 64KB
    }
}

Describe 'Checks after the bitmap checks, and busy or inconsistent bitmaps' {
    BeforeEach {
        $d = New-Drive
        $null = New-DirtyBitmap -Node $d.Name -Name bitmap0
        Write-BlockNode -Node $d.Name -Offset 1MB -Pattern 7 -Length 64KB -Confirm:$false
        $target = Join-Path $d.Dir 'target.qcow2'
        $full = Join-Path $d.Dir 'full.qcow2'
        $null = Start-IncrementalBackup -Node $d.Name -Target $full -Sync Full -Wait
    }
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'SourceIsTarget: the target is the node''s own image; the bitmap checks come first' {
        $before = (Get-Item -LiteralPath $d.Path).LastWriteTimeUtc
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $d.Path -Sync Full -ErrorAction Stop } `
            -ErrorId "SourceIsTarget,$Start" -MessageContains "'$($d.Path)'", "'$($d.Name)'"
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $d.Path -Sync Full -Bitmap bitmap404 -BitmapMode OnSuccess -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Start"
        (Get-Item -LiteralPath $d.Path).LastWriteTimeUtc | Should -Be $before
        Test-Path -LiteralPath "$($d.Path).partial" | Should -BeFalse
    }

    It 'ImageAlreadyExists: a new target must not exist, and the existing file is left alone' {
        $before = (Get-FileHash -LiteralPath $full).Hash
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $full -Sync Full -Bitmap bitmap0 -BitmapMode OnSuccess -ErrorAction Stop } `
            -ErrorId "ImageAlreadyExists,$Start" -MessageContains "'$full'"
        (Get-FileHash -LiteralPath $full).Hash | Should -Be $before
        Test-Path -LiteralPath "$full.partial" | Should -BeFalse
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Count | Should -Be 64KB
    }

    It 'TargetSizeMismatch: -UseExistingTarget needs an image of the node''s size' {
        $small = Join-Path $d.Dir 'small.qcow2'
        $null = New-BlockImage -Path $small -Size 32MB -Confirm:$false
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $small -Sync Incremental -Bitmap bitmap0 -UseExistingTarget -ErrorAction Stop } `
            -ErrorId "TargetSizeMismatch,$Start" -MessageContains "'$small'", '67108864', '33554432'
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Busy | Should -BeFalse
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Count | Should -Be 64KB
        Test-Path -LiteralPath $small | Should -BeTrue
    }

    It 'BackingFileRequired: a Bitmap backup into a new image needs -BackingFile, and cannot be raw' {
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Bitmap -Bitmap bitmap0 -BitmapMode OnSuccess -ErrorAction Stop } `
            -ErrorId "BackingFileRequired,$Start" -MessageContains "'$($d.Name)'"
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target (Join-Path $d.Dir 'inc.img') -Sync Incremental -Bitmap bitmap0 -TargetFormat Raw -BackingFile 'full.qcow2' -ErrorAction Stop } `
            -ErrorId "BackingFileRequired,$Start"
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath (Join-Path $d.Dir 'inc.img') | Should -BeFalse
    }

    It 'BackingFileNotFound: the backing file is looked for beside the target' {
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'nope.qcow2' -ErrorAction Stop } `
            -ErrorId "BackingFileNotFound,$Start" -MessageContains "'nope.qcow2'"
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Busy | Should -BeFalse
    }

    It 'UnsupportedFormat: a raw target cannot have a backing file' {
        $raw = Join-Path $d.Dir 'full.img'
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $raw -Sync Full -TargetFormat Raw -BackingFile 'full.qcow2' -ErrorAction Stop } `
            -ErrorId "UnsupportedFormat,$Start"
        Test-Path -LiteralPath $raw | Should -BeFalse
        Test-Path -LiteralPath "$raw.partial" | Should -BeFalse
    }

    It 'InvalidSpeed: -BytesPerSecond must not be negative' {
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Full -BytesPerSecond -1 -ErrorAction Stop } `
            -ErrorId "InvalidSpeed,$Start" -MessageContains '-1'
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
    }

    It 'BitmapBusy: a bitmap used by a running (throttled) backup cannot be used by another, whatever the mode' {
        Write-BlockNode -Node $d.Name -Offset 40MB -Pattern 8 -Length 8MB -Confirm:$false   # data to pace: -BytesPerSecond paces data, not holes
        $job = Start-IncrementalBackup -Node $d.Name -Target (Join-Path $d.Dir 'slow.qcow2') -Sync Full -Bitmap bitmap0 -BitmapMode OnSuccess -BytesPerSecond 4MB
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Busy | Should -BeTrue
        foreach ($case in @(
                @{ Sync = 'Incremental'; BackingFile = 'full.qcow2' }
                @{ Sync = 'Bitmap'; BitmapMode = 'Never'; BackingFile = 'full.qcow2' }
                @{ Sync = 'Full'; BitmapMode = 'OnSuccess' }
                @{ Sync = 'Top'; BitmapMode = 'Always' }
                @{ Sync = 'None'; BitmapMode = 'OnSuccess' })) {   # the busy check comes before the sync-none check
            $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Bitmap bitmap0 @case -ErrorAction Stop } `
                -ErrorId "BitmapBusy,$Start" -MessageContains "'bitmap0'"
            Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        }
        # Without a mode the mode check comes first.
        $null = Assert-BlockError { Start-IncrementalBackup -Node $d.Name -Target $target -Sync Full -Bitmap bitmap0 -ErrorAction Stop } `
            -ErrorId "BitmapModeRequired,$Start"
        [string]$job.Status | Should -BeExactly 'Running'
        Stop-Job -Job $job
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Busy | Should -BeFalse
        (Get-DirtyBitmap -Node $d.Name -Name bitmap0).Count | Should -Be (64KB + 8MB)
    }

    It 'BitmapInconsistent: a persistent bitmap left in use by a killed process cannot be used' {
        $raw = Join-Path $d.Dir 'crashed.img'
        $null = New-BlockImage -Path $raw -Size 8MB -Confirm:$false
        $marker = Join-Path $d.Dir 'ready'
        $script = @"
`$ErrorActionPreference = 'Stop'; Import-Module '$(Get-BitmapBackupModulePath)'
`$null = Open-BlockNode -Path '$raw' -Name disk
`$null = New-DirtyBitmap -Node disk -Name pers -Persistent
Write-BlockNode -Node disk -Offset 0 -Pattern 1 -Length 1MB
Close-BlockNode disk -WarningAction SilentlyContinue
`$null = Open-BlockNode -Path '$raw' -Name disk
Write-BlockNode -Node disk -Offset 2MB -Pattern 2 -Length 64KB
Set-Content -Path '$marker' -Value ready
Start-Sleep -Seconds 120
"@
        $child = Start-Process -FilePath dotnet -ArgumentList @((Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-Command', $script) -PassThru
        try {
            $deadline = [DateTime]::UtcNow.AddSeconds(90)
            while (-not (Test-Path $marker) -and [DateTime]::UtcNow -lt $deadline -and -not $child.HasExited) { Start-Sleep -Milliseconds 100 }
            Test-Path $marker | Should -BeTrue -Because 'the child process must have written to the node'
        }
        finally {
            & kill -9 $child.Id
            $child.WaitForExit()
        }
        $name = New-TestName 'c'
        $null = Open-BlockNode -Path $raw -Name $name
        (Get-DirtyBitmap -Node $name -Name pers).Inconsistent | Should -BeTrue
        $crashTarget = Join-Path $d.Dir 'crash.qcow2'
        $null = Start-IncrementalBackup -Node $name -Target (Join-Path $d.Dir 'crashfull.qcow2') -Sync Full -Wait
        foreach ($case in @(
                @{ Sync = 'Incremental'; BackingFile = 'crashfull.qcow2' }
                @{ Sync = 'Bitmap'; BitmapMode = 'Never'; BackingFile = 'crashfull.qcow2' }
                @{ Sync = 'Top'; BitmapMode = 'OnSuccess' }
                @{ Sync = 'None'; BitmapMode = 'Always' })) {   # the consistency check comes before the sync-none check
            $null = Assert-BlockError { Start-IncrementalBackup -Node $name -Target $crashTarget -Bitmap pers @case -ErrorAction Stop } `
                -ErrorId "BitmapInconsistent,$Start" -MessageContains "'pers'"
            Test-Path -LiteralPath $crashTarget | Should -BeFalse
            Test-Path -LiteralPath "$crashTarget.partial" | Should -BeFalse
        }
        $null = Assert-BlockError { Start-IncrementalBackup -Node $name -Target $crashTarget -Sync Full -Bitmap pers -ErrorAction Stop } `
            -ErrorId "BitmapModeRequired,$Start"
        # The documented way back: a full backup that resets the bitmap re-anchors it (QEMU would only allow removal).
        $r = Start-IncrementalBackup -Node $name -Target $crashTarget -Sync Full -Bitmap pers -BitmapMode OnSuccess -Wait
        $r.Succeeded | Should -BeTrue
        $b = Get-DirtyBitmap -Node $name -Name pers
        $b.Inconsistent | Should -BeFalse
        $b.Recording | Should -BeTrue
        $b.Count | Should -Be 0
        Write-BlockNode -Node $name -Offset 5MB -Pattern 9 -Length 4KB
        $inc = Join-Path $d.Dir 'crashinc.qcow2'
        $r = Start-IncrementalBackup -Node $name -Target $inc -Sync Incremental -Bitmap pers -BackingFile crash.qcow2 -Wait
        $r.BytesCopied | Should -Be 64KB
        $raw2 = Save-NodeSnapshot -Node $name -Path (Join-Path $d.Dir 'now.raw')
        Assert-QemuImageEqual -Path $inc -Reference $raw2
    }
}

Describe 'A disabled bitmap drives a backup and stays disabled (QEMU accepts it)' -Skip:$NoQemuImg {
    AfterEach {
        $Faults::Clear()
        Get-Job | Remove-Job -Force
        Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue
    }

    It 'copies the frozen bits, records nothing during the job, and ends empty and not recording' {
        $d = New-Drive
        $null = New-DirtyBitmap -Node $d.Name -Name bitmap0
        $null = Start-IncrementalBackup -Node $d.Name -Target (Join-Path $d.Dir 'full.qcow2') -Sync Full -Bitmap bitmap0 -BitmapMode OnSuccess -Wait
        Write-Group -Node $d.Name -Index 1
        Disable-DirtyBitmap -Node $d.Name -Name bitmap0 -Confirm:$false
        $t1 = Save-NodeSnapshot -Node $d.Name -Path (Join-Path $d.Dir 't1.raw')
        $target = Join-Path $d.Dir 'inc1.qcow2'
        $job = Start-IncrementalBackup -Node $d.Name -Target $target -Sync Incremental -Bitmap bitmap0 -BackingFile 'full.qcow2' -BytesPerSecond 256KB
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Busy | Should -BeTrue
        $b.Recording | Should -BeFalse
        Write-Group -Node $d.Name -Index 3   # during the job: not recorded, the bitmap is disabled
        [string]$job.Status | Should -BeExactly 'Running' -Because 'the writes must land while the job runs'
        $job.Backup.BytesPerSecond = 0
        $null = $job | Wait-Job -Timeout 60
        $r = Receive-Job -Job $job
        $r.Succeeded | Should -BeTrue
        $r.BytesTotal | Should -Be (6 * 64KB)
        $b = Get-DirtyBitmap -Node $d.Name -Name bitmap0
        $b.Busy | Should -BeFalse
        $b.Recording | Should -BeFalse
        $b.Count | Should -Be 0
        Assert-QemuImageEqual -Path $target -Reference $t1
    }
}
