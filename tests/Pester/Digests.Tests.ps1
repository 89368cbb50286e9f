# Digest manifests (issue 11): what the last backup holds, per cluster, so that a crash or a write made behind the
# engine's back costs an incremental, not a new full backup. Each case runs its writer in a child pwsh where it
# needs a real crash (kill -9) or another process's writes (qemu-io, dd).
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-io -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module (Join-Path $PSScriptRoot 'FaultHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE

    # Child processes: Start-FaultChild, Wait-FaultFile and Stop-FaultChild of FaultHelpers.psm1.

    function Get-DirtyClusterText([string] $Node, [string] $Name) {
        @(Get-DirtyBitmapRange -Node $Node -Name $Name | ForEach-Object { '{0}+{1}' -f $_.Offset, $_.Length })
    }
}

Describe 'Digest manifests of backups' -Skip:$NoQemu {
    BeforeEach {
        $dir = New-TestDirectory
        $env:BITMAPBACKUP_STATE_HOME = Join-Path $dir 'state'
    }
    AfterEach {
        Close-TestNode
        Remove-Item Env:BITMAPBACKUP_STATE_HOME -ErrorAction SilentlyContinue
    }

    It 'a full backup from a bitmap writes one beside its target; an incremental carries it on; the chain verifies against it without the source' {
        $path = Join-Path $dir 'm.qcow2'
        $null = New-BlockImage -Path $path -Size 32MB
        $null = Open-BlockNode -Path $path -Name mf
        Write-BlockNode -Node mf -Offset 0 -Pattern 1 -Length 3MB
        $null = New-DirtyBitmap -Node mf -Name b
        $full = Start-IncrementalBackup -Node mf -Target (Join-Path $dir 'full.qcow2') -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        $full.Manifest | Should -Be (Join-Path $dir 'full.qcow2.digests')
        (Get-Item $full.Manifest).Length | Should -Be (4096 + 512 * 16) -Because 'a 4 KiB header and one 16-byte digest per 64 KiB cluster'
        Write-BlockNode -Node mf -Offset 10MB -Pattern 2 -Length 100KB
        Write-BlockNode -Node mf -Offset 1MB -Zero -Length 64KB
        $inc = Start-IncrementalBackup -Node mf -Target (Join-Path $dir 'inc.qcow2') -Sync Incremental -Bitmap b -BackingFile full.qcow2 -Wait
        $inc.Manifest | Should -Be (Join-Path $dir 'inc.qcow2.digests')
        (Test-IncrementalBackup -Path $inc.Target -Manifest $inc.Manifest).Passed | Should -BeTrue
        (Test-IncrementalBackup -Path $full.Target -Manifest $full.Manifest).Passed | Should -BeTrue
        # the incremental's manifest describes the chain, not only what it copied: the full's manifest no longer fits it
        $v = Test-IncrementalBackup -Path $inc.Target -Manifest $full.Manifest
        $v.Passed | Should -BeFalse
        $v.ClustersDiffering | Should -Be 3 -Because 'two clusters of the 100 KiB write and the zeroed one'
        # a manifest that maintains itself matches one made from scratch: a full backup of the same disk now
        $again = Start-IncrementalBackup -Node mf -Target (Join-Path $dir 'again.qcow2') -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        $a = [IO.File]::ReadAllBytes($again.Manifest); $i = [IO.File]::ReadAllBytes($inc.Manifest)
        [Linq.Enumerable]::SequenceEqual([byte[]]$a[4096..($a.Length - 1)], [byte[]]$i[4096..($i.Length - 1)]) | Should -BeTrue
    }

    It 'finds, after a damaged backup file, the clusters that no longer hash to their digest' {
        $path = Join-Path $dir 'd.raw'
        $null = New-BlockImage -Path $path -Size 8MB
        $null = Open-BlockNode -Path $path -Name dm
        Write-BlockNode -Node dm -Offset 0 -Pattern 7 -Length 8MB
        $null = New-DirtyBitmap -Node dm -Name b
        $full = Start-IncrementalBackup -Node dm -Target (Join-Path $dir 'full.img') -TargetFormat Raw -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        Close-BlockNode dm
        $fs = [IO.File]::OpenWrite($full.Target); $fs.Position = 5MB + 17; $fs.WriteByte(0); $fs.Close()
        $v = Test-IncrementalBackup -Path $full.Target -Manifest $full.Manifest
        $v.Passed | Should -BeFalse
        $v.ClustersDiffering | Should -Be 1
        $v.FirstDifference | Should -Be 5MB
    }

    It 'refuses a manifest of another node, of another size and of another granularity, each with its reason' {
        foreach ($n in 'one', 'two') { $null = New-BlockImage -Path (Join-Path $dir "$n.qcow2") -Size 16MB }
        $null = Open-BlockNode -Path (Join-Path $dir 'one.qcow2') -Name one
        $null = Open-BlockNode -Path (Join-Path $dir 'two.qcow2') -Name two
        foreach ($n in 'one', 'two') { $null = New-DirtyBitmap -Node $n -Name b; $null = New-DirtyBitmap -Node $n -Name fine -Granularity 4KB }
        $r = Start-IncrementalBackup -Node one -Target (Join-Path $dir 'one-full.qcow2') -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        { Update-DirtyBitmap -Node two -Name b -Manifest $r.Manifest -ErrorAction Stop } |
            Should -Throw -ErrorId 'DigestManifestMismatch,BitmapBackup.UpdateDirtyBitmapCommand' -ExpectedMessage '*was made from image*'
        { Update-DirtyBitmap -Node one -Name fine -Manifest $r.Manifest -ErrorAction Stop } |
            Should -Throw -ErrorId 'DigestManifestMismatch,BitmapBackup.UpdateDirtyBitmapCommand' -ExpectedMessage '*granularity 65536*'
        Resize-BlockNode -Node one -Size 32MB
        { Update-DirtyBitmap -Node one -Name b -ErrorAction Stop } |
            Should -Throw -ErrorId 'DigestManifestMismatch,BitmapBackup.UpdateDirtyBitmapCommand' -ExpectedMessage '*16777216 bytes*'
        { Update-DirtyBitmap -Node two -Name b -ErrorAction Stop } |
            Should -Throw -ErrorId 'DigestManifestNotFound,BitmapBackup.UpdateDirtyBitmapCommand'
        (Get-DirtyBitmap -Node two -Name b).Busy | Should -BeFalse
    }

    It 'refuses a busy bitmap' {
        $path = Join-Path $dir 'busy.qcow2'
        $null = New-BlockImage -Path $path -Size 16MB
        $null = Open-BlockNode -Path $path -Name bz
        Write-BlockNode -Node bz -Offset 0 -Pattern 3 -Length 4MB
        $null = New-DirtyBitmap -Node bz -Name b
        $null = Start-IncrementalBackup -Node bz -Target (Join-Path $dir 'f.qcow2') -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        Write-BlockNode -Node bz -Offset 0 -Pattern 4 -Length 4MB
        $job = Start-IncrementalBackup -Node bz -Target (Join-Path $dir 'i.qcow2') -Sync Incremental -Bitmap b -BackingFile f.qcow2 -BytesPerSecond 1MB
        try {
            { Update-DirtyBitmap -Node bz -Name b -ErrorAction Stop } | Should -Throw -ErrorId 'BitmapBusy,BitmapBackup.UpdateDirtyBitmapCommand'
        }
        finally { $job | Stop-Job; $job | Remove-Job -Force }
    }

    It 'rebuilds an inconsistent bitmap after kill -9 with exactly the clusters written, and the chain goes on with an incremental (<Format>)' -ForEach @(
        @{ Format = 'Qcow2'; Extension = '.qcow2' }, @{ Format = 'Raw'; Extension = '.img' }
    ) {
        $path = Join-Path $dir "k$Extension"
        $ready = Join-Path $dir 'ready'
        $null = New-BlockImage -Path $path -Size 32MB -Format $Format
        $child = Start-FaultChild -Directory $dir -Name killed -Script @"
`$null = Open-BlockNode -Path '$path' -Name k
Write-BlockNode -Node k -Offset 0 -Pattern 1 -Length 6MB
`$null = New-DirtyBitmap -Node k -Name daily -Persistent
`$null = Start-IncrementalBackup -Node k -Target '$(Join-Path $dir 'full.qcow2')' -Sync Full -Bitmap daily -BitmapMode OnSuccess -Wait
Write-BlockNode -Node k -Offset 2MB -Pattern 2 -Length 4KB
Write-BlockNode -Node k -Offset 20MB -Pattern 3 -Length 200KB
Write-BlockNode -Node k -Offset 5MB -Zero -Length 64KB
Sync-BlockNode -Node k
Set-Content -Path '$ready' -Value ready
Start-Sleep -Seconds 120
"@
        try { Wait-FaultFile -Path $ready -Process $child | Should -BeTrue -Because "the child gets ready ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))" }
        finally { Stop-FaultChild $child }
        $null = Open-BlockNode -Path $path -Name k
        (Get-DirtyBitmap -Node k -Name daily).Inconsistent | Should -BeTrue
        { Start-IncrementalBackup -Node k -Target (Join-Path $dir 'inc.qcow2') -Sync Incremental -Bitmap daily -BackingFile full.qcow2 -Wait -ErrorAction Stop } |
            Should -Throw -ErrorId 'BitmapInconsistent,BitmapBackup.StartIncrementalBackupCommand' -ExpectedMessage '*Update-DirtyBitmap*'
        $u = Update-DirtyBitmap -Node k -Name daily
        $u.WasInconsistent | Should -BeTrue
        $u.ClustersDiffering | Should -Be 6
        $b = Get-DirtyBitmap -Node k -Name daily
        $b.Inconsistent | Should -BeFalse
        $b.Recording | Should -BeTrue
        Get-DirtyClusterText k daily | Should -Be @('2097152+65536', '5242880+65536', '20971520+262144')
        $r = Start-IncrementalBackup -Node k -Target (Join-Path $dir 'inc.qcow2') -Sync Incremental -Bitmap daily -BackingFile full.qcow2 -Wait
        $r.BytesCopied | Should -Be (6 * 64KB)
        Close-BlockNode k
        Assert-QemuImageEqual -Path $r.Target -Reference $path
        (Test-IncrementalBackup -Path $r.Target -Manifest $r.Manifest).Passed | Should -BeTrue
    }

    It 'catches writes made while the image was closed, by qemu-io (qcow2) and by dd conv=notrunc (raw)' -ForEach @(
        @{ Format = 'Qcow2'; Extension = '.qcow2' }, @{ Format = 'Raw'; Extension = '.img' }
    ) {
        $path = Join-Path $dir "w$Extension"
        $null = New-BlockImage -Path $path -Size 16MB -Format $Format
        $null = Open-BlockNode -Path $path -Name w
        Write-BlockNode -Node w -Offset 0 -Pattern 5 -Length 2MB
        $null = New-DirtyBitmap -Node w -Name b -Persistent
        $full = Start-IncrementalBackup -Node w -Target (Join-Path $dir 'full.qcow2') -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        Close-BlockNode w
        if ($Format -eq 'Qcow2') {
            & qemu-io -f qcow2 -c 'write -P 0x61 1M 4k' -c 'write -P 0x62 9M 64k' $path | Out-Null
        }
        else {
            & dd if=/dev/urandom of=$path bs=4096 seek=256 count=1 conv=notrunc 2>$null
            & dd if=/dev/urandom of=$path bs=65536 seek=144 count=1 conv=notrunc 2>$null
        }
        $null = Open-BlockNode -Path $path -Name w
        # qemu-io records into a qcow2 image's persistent "auto" bitmaps as QEMU does; nothing tracks dd on a raw file
        (Get-DirtyBitmap -Node w -Name b).Count | Should -Be ($(if ($Format -eq 'Raw') { 0 } else { 2 * 64KB }))
        $u = Update-DirtyBitmap -Node w -Name b
        $u.ClustersDiffering | Should -Be 2
        Get-DirtyClusterText w b | Should -Be @('1048576+65536', '9437184+65536')
        $r = Start-IncrementalBackup -Node w -Target (Join-Path $dir 'inc.qcow2') -Sync Incremental -Bitmap b -BackingFile full.qcow2 -Wait
        Close-BlockNode w
        Assert-QemuImageEqual -Path $r.Target -Reference $path
    }

    It 'a crash while a manifest is being replaced leaves the previous one or the new one, never a torn one (kill -9 at random instants)' {
        $path = Join-Path $dir 'c.qcow2'
        $null = New-BlockImage -Path $path -Size 16MB
        $null = Open-BlockNode -Path $path -Name c
        Write-BlockNode -Node c -Offset 0 -Pattern 1 -Length 16MB
        $null = New-DirtyBitmap -Node c -Name b -Persistent
        $full = Start-IncrementalBackup -Node c -Target (Join-Path $dir 'full.qcow2') -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
        Write-BlockNode -Node c -Offset 0 -Pattern 2 -Length 16MB
        Close-BlockNode c
        $seed = Get-Random; $rng = [Random]::new($seed)
        foreach ($run in 1..4) {
            $target = Join-Path $dir "inc$run.qcow2"
            $started = Join-Path $dir "started$run"
            $child = Start-FaultChild -Directory $dir -Name killed -Script @"
`$null = Open-BlockNode -Path '$path' -Name c
Set-Content -Path '$started' -Value go
`$null = Start-IncrementalBackup -Node c -Target '$target' -Sync Full -Bitmap b -BitmapMode OnSuccess -BytesPerSecond 16MB -Wait
Start-Sleep -Seconds 120
"@
            try {
                Wait-FaultFile -Path $started -Process $child | Should -BeTrue -Because "the backup starts ($(Get-Content -Raw $child.Err -ErrorAction SilentlyContinue))"
                Start-Sleep -Milliseconds (900 + $rng.Next(0, 900))   # about the copy's end, where the commit and the manifest's rename happen
            }
            finally { Stop-FaultChild $child }
            $manifest = "$target.digests"
            if (Test-Path $manifest) {
                Test-Path $target | Should -BeTrue -Because "a manifest is named only after its backup committed (run $run, seed $seed)"
                (Test-IncrementalBackup -Path $target -Manifest $manifest).Passed | Should -BeTrue -Because "run $run, seed $seed"
            }
            (Test-IncrementalBackup -Path $full.Target -Manifest $full.Manifest).Passed | Should -BeTrue
            Get-ChildItem $dir -Filter '*.digests.tmp' | Remove-Item   # what a crash may leave: never read, never named as a manifest
        }
    }
}
