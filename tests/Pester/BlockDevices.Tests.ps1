# Block devices as nodes (issue 17): loop devices opened as QEMU's host_device opens them, their backups checked by
# qemu-img compare against the device, persistent bitmaps in the bitmap state folder across processes, and raw files
# whose length is not a multiple of 512. Loop devices need root and /dev/loop-control; every one made is detached.
BeforeDiscovery {
    function Get-NoLoopReason {
        <# Why loop devices cannot be tested here, or $null when they can. #>
        if (-not (Test-Path /dev/loop-control)) { return '/dev/loop-control is absent' }
        if ((& id -u) -ne '0') { return 'loop devices need root' }
        if (-not (Get-Command losetup -ErrorAction SilentlyContinue)) { return 'losetup is not installed' }
        if (-not (Get-Command qemu-img -ErrorAction SilentlyContinue)) { return 'qemu-img is not installed' }
        return $null
    }
    $noLoop = Get-NoLoopReason
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module (Join-Path $PSScriptRoot 'FaultHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE
    $reason = if (-not (Test-Path /dev/loop-control)) { '/dev/loop-control is absent' } elseif ((& id -u) -ne '0') { 'loop devices need root' }
    if ($reason) { Write-Warning "Loop device tests skipped: $reason." }

    $script:loops = [System.Collections.Generic.List[string]]::new()
    $script:oldStateHome = $env:BITMAPBACKUP_STATE_HOME
    $script:stateHome = Join-Path (Get-TestDirectory) 'state'
    $env:BITMAPBACKUP_STATE_HOME = $script:stateHome # the default state folder of this process and its children

    function New-LoopDevice {
        <# A new file of $Size bytes attached to a free loop device (or to $Device); returns the device path. #>
        param([Parameter(Mandatory)] [string] $File, [long] $Size = 64MB, [string] $Device)
        if (-not (Test-Path $File)) { & truncate -s $Size $File }
        $dev = if ($Device) { & losetup $Device $File; $Device } else { & losetup -f --show $File }
        if ($LASTEXITCODE -ne 0) { throw "losetup of '$File' failed" }
        $script:loops.Add($dev)
        return $dev
    }

    function Remove-LoopDevice {
        param([Parameter(Mandatory)] [string] $Device)
        & losetup -d $Device 2>$null
        $null = $script:loops.Remove($Device)
    }

    function Invoke-ChildScript {
        <# Run a script file in a new pwsh process that imports the module; returns its output, throws on failure. #>
        param([Parameter(Mandatory)] [string] $Script)
        $file = Join-Path (Get-TestDirectory) "$(New-TestName 'c').ps1"
        Set-Content -Path $file -Value "`$ErrorActionPreference = 'Stop'; Import-Module '$env:BITMAPBACKUP_MODULE'`n$Script"
        $out = & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -File $file 2>&1
        if ($LASTEXITCODE -ne 0) { throw "child pwsh failed ($LASTEXITCODE): $out" }
        return $out
    }

    function Compare-Device {
        <# qemu-img compare of a backup chain (qcow2) with a device or raw file; returns its exit code and output. #>
        param([Parameter(Mandatory)] [string] $Backup, [Parameter(Mandatory)] [string] $Device)
        return Invoke-QemuImg compare -f qcow2 -F raw $Backup $Device
    }
}

AfterAll {
    Close-TestNode
    if (Get-Variable -Scope Script -Name loops -ErrorAction SilentlyContinue) {
        foreach ($dev in @($script:loops)) { & losetup -d $dev 2>$null }
    }
    $env:BITMAPBACKUP_STATE_HOME = $script:oldStateHome
}

Describe 'Loop devices as nodes' -Skip:($null -ne $noLoop) {
    BeforeEach {
        $dir = New-TestDirectory
        $dev = New-LoopDevice -File (Join-Path $dir 'backing.img')
    }
    AfterEach {
        Close-TestNode
        Remove-LoopDevice $dev
    }

    It 'opens a 64 MiB device with its size and sector sizes' {
        $node = Open-BlockNode -Path $dev -Name lo
        $node.Format | Should -Be 'Raw'
        $node.Size | Should -Be 67108864
        $node.LogicalSectorSize | Should -Be 512
        $node.PhysicalSectorSize | Should -BeGreaterOrEqual 512
        (Get-BlockNode lo).Size | Should -Be 67108864
    }

    It 'backs up the device in full, then incrementally: the chain equals the device' {
        $null = Open-BlockNode -Path $dev -Name lo
        $null = New-DirtyBitmap -Node lo -Name inc
        Write-BlockNode -Node lo -Offset 0 -Pattern 5 -Length 1MB
        Write-BlockNode -Node lo -Offset 40MB -Data ([byte[]](1..255))
        $full = Join-Path $dir 'full.qcow2'
        $r = Start-IncrementalBackup -Node lo -Target $full -Sync Full -Bitmap inc -BitmapMode OnSuccess -Wait
        $r.Succeeded | Should -BeTrue
        $r.BytesCopied | Should -Be 64MB
        (Get-Item $full).Length | Should -BeLessThan 8MB -Because 'zero detection keeps the target sparse although a device reports all of itself as data'

        Write-BlockNode -Node lo -Offset 10MB -Pattern 7 -Length 100000
        Write-BlockNode -Node lo -Offset 0 -Zero -Length 64KB
        Write-BlockNode -Node lo -Offset (63MB + 1000) -Data ([byte[]](9, 8, 7))
        (Get-DirtyBitmap -Node lo -Name inc).Count | Should -Be (4 * 64KB)
        $inc = Join-Path $dir 'inc1.qcow2'
        $r = Start-IncrementalBackup -Node lo -Target $inc -Sync Incremental -Bitmap inc -BitmapMode OnSuccess -BackingFile $full -Wait
        $r.Succeeded | Should -BeTrue
        $r.BytesCopied | Should -Be (4 * 64KB)
        Close-BlockNode lo
        $c = Compare-Device -Backup $inc -Device $dev
        $c.ExitCode | Should -Be 0 -Because $c.Output
        (Compare-Device -Backup $full -Device $dev).ExitCode | Should -Be 1 -Because 'the full backup predates the writes'

        # Restored onto another device of the same size, over what it held: written in place, zeros included.
        $other = New-LoopDevice -File (Join-Path $dir 'other.img')
        try {
            $out = & qemu-io -f raw -c 'write -P 0x77 0 64M' $other 2>&1
            $LASTEXITCODE | Should -Be 0 -Because "$out"
            $rr = Restore-IncrementalBackup -Path $inc -Destination $other -Wait -Confirm:$false
            $rr.Succeeded | Should -BeTrue
            $c = Compare-Device -Backup $inc -Device $other
            $c.ExitCode | Should -Be 0 -Because $c.Output
            $small = New-LoopDevice -File (Join-Path $dir 'small.img') -Size 32MB
            { Restore-IncrementalBackup -Path $inc -Destination $small -Wait -Confirm:$false -ErrorAction Stop } |
                Should -Throw -ErrorId 'TargetSizeMismatch,BitmapBackup.RestoreIncrementalBackupCommand'
        }
        finally {
            Remove-LoopDevice $other
            if ($small) { Remove-LoopDevice $small }
        }
    }

    It 'zeroes ranges of the device, aligned or not' {
        $null = Open-BlockNode -Path $dev -Name lo
        Write-BlockNode -Node lo -Offset 0 -Pattern 0xAB -Length 2MB
        Write-BlockNode -Node lo -Offset 100 -Zero -Length (1MB + 300)
        Close-BlockNode lo
        $bytes = Get-FileBytes -Path (Join-Path $dir 'backing.img') -Offset 0 -Length 2MB
        $bytes[99] | Should -Be 0xAB
        [Convert]::ToHexString($bytes, 100, 1MB + 300).Trim('0') | Should -BeNullOrEmpty
        $bytes[1MB + 400] | Should -Be 0xAB
    }

    It 'refuses to resize the node to any size but the device''s, and follows the device when it grows' {
        $null = Open-BlockNode -Path $dev -Name lo
        $null = New-DirtyBitmap -Node lo -Name inc
        { Resize-BlockNode -Node lo -Size 128MB -ErrorAction Stop } | Should -Throw -ErrorId 'DeviceSizeFixed,BitmapBackup.ResizeBlockNodeCommand'
        & truncate -s 96M (Join-Path $dir 'backing.img')
        & losetup -c $dev
        Resize-BlockNode -Node lo -Size 96MB
        (Get-BlockNode lo).Size | Should -Be 96MB
        Get-RangeText -Node lo -Name inc | Should -Be @("$(64MB)+$(32MB)")
    }

    It 'keeps a persistent bitmap in the state folder, found by a new process with its count' {
        $out = Invoke-ChildScript @"
`$null = Open-BlockNode -Path '$dev' -Name lo
`$null = New-DirtyBitmap -Node lo -Name pers -Persistent -Granularity 4KB
Write-BlockNode -Node lo -Offset 12345 -Pattern 7 -Length 100000
(Get-BlockNode lo).BitmapStore
Close-BlockNode lo
"@
        $file = @($out | Where-Object { "$_" -like '*.bitmaps' })[-1]
        $file | Should -BeLike (Join-Path $script:stateHome 'bitmaps/loop_*.bitmaps')
        Test-Path $file | Should -BeTrue
        $count = Invoke-ChildScript @"
`$null = Open-BlockNode -Path '$dev' -Name lo
`$b = Get-DirtyBitmap -Node lo -Name pers
'{0} {1} {2}' -f `$b.Count, `$b.Recording, `$b.Inconsistent
Close-BlockNode lo
"@
        @($count)[-1] | Should -Be "$(25 * 4KB) True False"
    }

    It 'keeps persistent bitmaps in the folder given by -BitmapStore, and only there' {
        $store = Join-Path $dir 'store'
        $null = Open-BlockNode -Path $dev -Name lo -BitmapStore $store
        $null = New-DirtyBitmap -Node lo -Name pers -Persistent
        (Get-BlockNode lo).BitmapStore | Should -BeLike (Join-Path $store 'bitmaps/*')
        { New-DirtyBitmap -Node lo -Name other -Persistent -BitmapStore (Join-Path $dir 'elsewhere') -ErrorAction Stop } |
            Should -Throw -ErrorId 'BitmapStoreConflict,BitmapBackup.NewDirtyBitmapCommand'
        Close-BlockNode lo
        (Get-DirtyBitmap -Path $dev -BitmapStore $store).Name | Should -Be 'pers'
        Get-DirtyBitmap -Path $dev | Should -BeNullOrEmpty
        $null = Open-BlockNode -Path $dev -Name lo
        (Get-BlockNode lo).Bitmaps | Should -BeNullOrEmpty -Because 'the default folder holds nothing for the device'
        $null = New-DirtyBitmap -Node lo -Name t -BitmapStore $store
        (Get-BlockNode lo).Bitmaps | Should -Be @('pers', 't') -Because 'switching a node with no persistent bitmap to a folder loads what it holds'
    }

    It 'loads the bitmaps inconsistent after kill -9' {
        $marker = Join-Path $dir 'ready'
        $child = Start-FaultChild -Directory $dir -Name killed -Script @"
`$null = Open-BlockNode -Path '$dev' -Name lo
`$null = New-DirtyBitmap -Node lo -Name pers -Persistent
Write-BlockNode -Node lo -Offset 0 -Pattern 1 -Length 1MB
Set-Content -Path '$marker' -Value ready
Start-Sleep -Seconds 120
"@
        try { Wait-FaultFile -Path $marker -Process $child | Should -BeTrue }
        finally { Stop-FaultChild $child }
        $null = Open-BlockNode -Path $dev -Name lo
        $b = Get-DirtyBitmap -Node lo -Name pers
        $b.Inconsistent | Should -BeTrue
        $b.Recording | Should -BeFalse
        Remove-DirtyBitmap -Node lo -Name pers
        Close-BlockNode lo
        $null = Open-BlockNode -Path $dev -Name lo
        (Get-BlockNode lo).Bitmaps | Should -BeNullOrEmpty
    }

    It 'keeps a crash-safe bitmap''s write-intent log in the state folder (nothing in /dev), and recovers it after kill -9' {
        $marker = Join-Path $dir 'ready'
        $child = Start-FaultChild -Directory $dir -Name killed -Script @"
`$null = Open-BlockNode -Path '$dev' -Name lo
`$null = New-DirtyBitmap -Node lo -Name safe -Persistent -CrashSafe
`$null = New-DirtyBitmap -Node lo -Name plain -Persistent
Write-BlockNode -Node lo -Offset 3MB -Pattern 1 -Length 64KB
Write-BlockNode -Node lo -Offset 40MB -Pattern 2 -Length 100KB
Set-Content -Path '$marker' -Value ready
Start-Sleep -Seconds 120
"@
        try { Wait-FaultFile -Path $marker -Process $child | Should -BeTrue -Because (Get-Content -Raw $child.Err -ErrorAction SilentlyContinue) }
        finally { Stop-FaultChild $child }
        $logs = @(Get-ChildItem (Join-Path $script:stateHome 'bitmaps') -Filter '*.intent')
        $logs.Count | Should -Be 1 -Because 'the log sits beside the device''s bitmaps in the state folder'
        @(Get-ChildItem /dev -Filter "$(Split-Path -Leaf $dev)*" | Where-Object Name -Like '*.intent').Count | Should -Be 0
        $stored = @(Get-DirtyBitmap -Path $dev | Sort-Object Name)
        $stored.Name | Should -Be @('plain', 'safe')
        $stored.Recoverable | Should -Be @($false, $true)
        $null = Open-BlockNode -Path $dev -Name lo -WarningVariable w -WarningAction SilentlyContinue
        "$w" | Should -BeLike "*Bitmap 'safe'*recovered from its write-intent log*"
        $safe = Get-DirtyBitmap -Node lo -Name safe
        $safe.Inconsistent | Should -BeFalse
        $safe.Recovered | Should -BeTrue
        $ranges = @(Get-DirtyBitmapRange -Node lo -Name safe)
        foreach ($written in @(@(3MB, 64KB), @(40MB, 100KB))) {
            @($ranges | Where-Object { $_.Offset -le $written[0] -and $written[0] + $written[1] -le $_.Offset + $_.Length }).Count |
                Should -Be 1 -Because "the write at $($written[0]) is covered"
        }
        (Get-DirtyBitmap -Node lo -Name plain).Inconsistent | Should -BeTrue
    }

    It 'resizes a stored bitmap when the device grew while closed, the new range dirty' {
        $null = Open-BlockNode -Path $dev -Name lo
        $null = New-DirtyBitmap -Node lo -Name pers -Persistent
        Write-BlockNode -Node lo -Offset 1MB -Pattern 2 -Length 64KB
        Close-BlockNode lo
        & truncate -s 96M (Join-Path $dir 'backing.img')
        & losetup -c $dev
        $null = Open-BlockNode -Path $dev -Name lo
        (Get-BlockNode lo).Size | Should -Be 96MB
        $b = Get-DirtyBitmap -Node lo -Name pers
        $b.Inconsistent | Should -BeFalse
        $b.Count | Should -Be (64KB + 32MB)
        Get-RangeText -Node lo -Name pers | Should -Be @("$(1MB)+$(64KB)", "$(64MB)+$(32MB)")
    }

    It 'does not attach the bitmaps of one device to another device at the same path' {
        $null = Open-BlockNode -Path $dev -Name lo
        $null = New-DirtyBitmap -Node lo -Name pers -Persistent
        Close-BlockNode lo
        & losetup -d $dev
        $null = New-LoopDevice -File (Join-Path $dir 'other.img') -Device $dev
        $null = Open-BlockNode -Path $dev -Name lo
        (Get-BlockNode lo).Bitmaps | Should -BeNullOrEmpty
        Close-BlockNode lo
        & losetup -d $dev
        $null = New-LoopDevice -File (Join-Path $dir 'backing.img') -Device $dev
        $null = Open-BlockNode -Path $dev -Name lo
        (Get-BlockNode lo).Bitmaps | Should -Be @('pers') -Because 'the first device is back'
    }

    It 'holds the device with QEMU''s image locks' {
        $null = Open-BlockNode -Path $dev -Name lo
        $out = & qemu-io -f raw -c 'write 0 512' $dev 2>&1
        $LASTEXITCODE | Should -Not -Be 0
        "$out" | Should -Match 'Failed to get "write" lock'
        Close-BlockNode lo
        $out = & qemu-io -f raw -c 'write 0 512' $dev 2>&1
        $LASTEXITCODE | Should -Be 0 -Because "$out"
    }

    It 'opens a qcow2 image written on the device; a write past the device''s end fails with ENOSPC' {
        Close-TestNode
        $small = New-LoopDevice -File (Join-Path $dir 'small.img') -Size 4MB
        try {
            (Invoke-QemuImg create -q -f qcow2 $small 64M).ExitCode | Should -Be 0
            $node = Open-BlockNode -Path $small -Name q
            $node.Format | Should -Be 'Qcow2'
            $node.Size | Should -Be 64MB
            { New-DirtyBitmap -Node q -Name b -Persistent -BitmapStore (Join-Path $dir 's') -ErrorAction Stop } |
                Should -Throw -ErrorId 'BitmapStoreConflict,BitmapBackup.NewDirtyBitmapCommand'
            Write-BlockNode -Node q -Offset 0 -Pattern 3 -Length 1MB
            $err = { Write-BlockNode -Node q -Offset 8MB -Pattern 3 -Length 8MB -ErrorAction Stop } | Should -Throw -PassThru
            $err.FullyQualifiedErrorId | Should -Be 'ImageIOFailed,BitmapBackup.WriteBlockNodeCommand'
            $err.Exception.Message | Should -Match 'No space left on device'
            Close-BlockNode q
            $check = Invoke-QemuImg check $small
            $check.ExitCode | Should -BeIn @(0, 3) -Because $check.Output
            $out = & qemu-img convert -f qcow2 -O raw $small (Join-Path $dir 'q.raw') 2>&1
            $LASTEXITCODE | Should -Be 0 -Because "$out"
            $bytes = Get-FileBytes -Path (Join-Path $dir 'q.raw') -Offset 0 -Length 1MB
            [Convert]::ToHexString($bytes).Replace('03', '') | Should -BeNullOrEmpty
        }
        finally {
            Close-TestNode
            Remove-LoopDevice $small
        }
    }
}

Describe 'Raw files whose length is not a multiple of 512' {
    BeforeEach {
        $dir = New-TestDirectory
        $path = Join-Path $dir 'small.img'
        $data = [byte[]]::new(1000)
        [System.Random]::new(17).NextBytes($data)
        [System.IO.File]::WriteAllBytes($path, $data)
    }
    AfterEach { Close-TestNode }

    It 'opens a 1000-byte file as a 1024-byte disk whose tail reads zeros, as qemu-img info shows it' {
        $node = Open-BlockNode -Path $path -Name s
        $node.Size | Should -Be 1024
        $tail = Read-BlockNode -Node s -Offset 1000 -Length 24
        @($tail | Where-Object { $_ -ne 0 }).Count | Should -Be 0
        Close-BlockNode s
        (Invoke-QemuImg info -f raw $path).Output | Should -Match '1024 bytes'
    }

    It 'backs up the 1000-byte file and restores it as the 1024-byte disk' -Skip:(-not (Get-Command qemu-img -ErrorAction SilentlyContinue)) {
        $null = Open-BlockNode -Path $path -Name s
        $backup = Join-Path $dir 'small.qcow2'
        $r = Start-IncrementalBackup -Node s -Target $backup -Sync Full -Wait
        $r.Succeeded | Should -BeTrue
        Close-BlockNode s
        $c = Invoke-QemuImg compare -f qcow2 -F raw $backup $path
        $c.ExitCode | Should -Be 0 -Because $c.Output
        $restored = Join-Path $dir 'restored.img'
        $rr = Restore-IncrementalBackup -Path $backup -Destination $restored -Wait
        $rr.Succeeded | Should -BeTrue
        (Get-Item $restored).Length | Should -Be 1024
        $bytes = [System.IO.File]::ReadAllBytes($restored)
        [Convert]::ToHexString($bytes, 0, 1000) | Should -Be ([Convert]::ToHexString($data))
        @($bytes[1000..1023] | Where-Object { $_ -ne 0 }).Count | Should -Be 0
    }

    It 'extends the file when the tail is written' {
        $null = Open-BlockNode -Path $path -Name s
        Write-BlockNode -Node s -Offset 1020 -Data ([byte[]](1, 2, 3, 4))
        Close-BlockNode s
        (Get-Item $path).Length | Should -Be 1024
        Get-FileBytes -Path $path -Offset 1020 -Length 4 | Should -Be @(1, 2, 3, 4)
    }
}
