# Limits a long-lived session or a big schedule meets (issue 23): running out of file descriptors has its own error id,
# finished jobs do not keep their images in memory, a thousand persistent bitmaps cost what their tables cost, and a
# backup chain has no fixed depth: a 1,000-image chain made by qemu-img is listed, checked and restored as qemu-img
# reads it, also under a hard limit of 256 open files.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE

    function Invoke-ChildScript {
        <# Run a script file in a fresh pwsh (optionally under a shell ulimit); returns its output lines, throws on failure. #>
        param([Parameter(Mandatory)] [string] $Script, [int] $FileLimit)
        $file = Join-Path (New-TestDirectory) 'child.ps1'
        Set-Content -Path $file -Value "`$ErrorActionPreference = 'Stop'; Import-Module '$env:BITMAPBACKUP_MODULE'`n$Script"
        $pwsh = Join-Path $PSHOME 'pwsh.dll'
        $out = if ($FileLimit) { & bash -c "ulimit -n $FileLimit && exec dotnet '$pwsh' -NoProfile -NonInteractive -File '$file'" 2>&1 }
               else { & dotnet $pwsh -NoProfile -NonInteractive -File $file 2>&1 }
        if ($LASTEXITCODE -ne 0) { throw "child pwsh failed ($LASTEXITCODE): $out" }
        return @($out | ForEach-Object { "$_" })
    }
}

Describe 'Resource limits' {
    It 'reports running out of file descriptors as TooManyOpenFiles with the limit, never as ImageInUse' {
        $dir = New-TestDirectory
        $out = Invoke-ChildScript -FileLimit 300 @"
`$i = 0
try {
    while (`$true) {
        `$p = Join-Path '$dir' "i`$i.img"
        `$null = New-BlockImage -Path `$p -Size 1MB
        `$null = Open-BlockNode -Path `$p -Name "n`$i"
        `$i++
        if (`$i -gt 5000) { throw 'no limit reached' }
    }
}
catch {
    `$_.FullyQualifiedErrorId
    `$_.CategoryInfo.Category
    `$_.Exception.Message
}
Get-BlockNode | Close-BlockNode
"@
        $out[0] | Should -Match '^TooManyOpenFiles,BitmapBackup\.(NewBlockImage|OpenBlockNode)Command$'
        $out[1] | Should -Be 'LimitsExceeded'
        $out[2] | Should -Match 'limit of 300 open files'
    }

    It 'keeps a finished job small: 300 finished backups held in Get-Job grow the GC heap by less than 5 MB' -Skip:$NoQemu {
        $dir = New-TestDirectory
        $out = Invoke-ChildScript @"
`$null = New-BlockImage -Path '$dir/src.qcow2' -Size 8MB
`$null = Open-BlockNode -Path '$dir/src.qcow2' -Name src
Write-BlockNode -Node src -Offset 0 -Pattern 1 -Length 2MB
`$null = New-DirtyBitmap -Node src -Name b
`$null = Start-IncrementalBackup -Node src -Target '$dir/full.qcow2' -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait
function Take(`$n) {
    Write-BlockNode -Node src -Offset ((`$n % 100) * 64KB) -Pattern 2 -Length 4KB
    Start-IncrementalBackup -Node src -Target "$dir/inc`$n.qcow2" -Sync Incremental -Bitmap b -BackingFile full.qcow2 | Wait-Job | Receive-Job | Out-Null
}
foreach (`$n in 1..20) { Take `$n }   # warm up: code, caches, pools
[GC]::Collect(); [GC]::WaitForPendingFinalizers(); [GC]::Collect()
`$before = [GC]::GetTotalMemory(`$true)
foreach (`$n in 21..320) { Take `$n }
[GC]::Collect(); [GC]::WaitForPendingFinalizers(); [GC]::Collect()
`$after = [GC]::GetTotalMemory(`$true)
@(Get-Job).Count
`$after - `$before
"@
        [int]$out[-2] | Should -Be 320 -Because 'the jobs are still held in Get-Job'
        [long]$out[-1] | Should -BeLessThan 5MB
    }

    It 'stores a thousand persistent bitmaps for about their tables, and gives the clusters back when they are removed' -Skip:$NoQemu {
        $dir = New-TestDirectory
        $path = Join-Path $dir 'many.qcow2'
        $null = New-BlockImage -Path $path -Size 64MB
        $null = Open-BlockNode -Path $path -Name many
        Write-BlockNode -Node many -Offset 0 -Pattern 1 -Length 22MB
        Close-BlockNode many
        $baseline = (Get-QemuImageCheck -Path $path).'allocated-clusters'
        $sizeBefore = (Get-Item $path).Length
        $null = Open-BlockNode -Path $path -Name many
        foreach ($i in 1..1000) { $null = New-DirtyBitmap -Node many -Name "b$i" -Persistent }
        Close-BlockNode many
        $growth = (Get-Item $path).Length - $sizeBefore
        $growth | Should -BeLessThan (1000 * 64KB + 2MB) -Because 'one bitmap table cluster each (QEMU needs a table for every bitmap), plus the directory'
        (Get-QemuImageCheck -Path $path).ExitCode | Should -Be 0
        @((& qemu-img info --output=json $path | ConvertFrom-Json).'format-specific'.data.bitmaps).Count | Should -Be 1000
        $null = Open-BlockNode -Path $path -Name many
        foreach ($i in 1..1000) { Remove-DirtyBitmap -Node many -Name "b$i" -Confirm:$false }
        Close-BlockNode many
        $check = Get-QemuImageCheck -Path $path
        $check.ExitCode | Should -Be 0
        $check.'allocated-clusters' | Should -Be $baseline -Because 'every table and directory cluster is free again'
    }

    Context 'A backup chain 1,000 images deep (an hourly schedule for six weeks)' {
        BeforeAll {
            # c0000 is a full backup (clusters 0-15 hold 0xB0); c0100·k stores cluster k (byte k), k = 1-9; the other
            # 990 store nothing, like backups of an idle hour. qemu-img makes the images: the data layers one by one,
            # the empty ones as copies of one empty layer with the backing name (same length for every layer) patched,
            # which is what qemu-img rebase -u writes (running qemu-img 1,000 times costs a minute).
            $script:chainDir = New-TestDirectory
            $script:depth = 1000
            function Name([int] $i) { 'c{0:d4}.qcow2' -f $i }
            & qemu-img create -q -f qcow2 -o cluster_size=4096 (Join-Path $chainDir (Name 0)) 4M
            & qemu-io -f qcow2 -c 'write -q -P 0xb0 0 64k' (Join-Path $chainDir (Name 0)) | Out-Null
            $template = Join-Path $chainDir 'template.qcow2'
            & qemu-img create -q -f qcow2 -o cluster_size=4096 -u -b (Name 0) -F qcow2 $template 4M
            $bytes = [IO.File]::ReadAllBytes($template)
            function BigEndian([int] $at, [int] $count) { $v = [uint64]0; foreach ($b in $bytes[$at..($at + $count - 1)]) { $v = $v * 256 + $b }; $v }
            $nameOffset = BigEndian 8 8
            $nameLength = BigEndian 16 4
            $nameLength | Should -Be (Name 0).Length
            foreach ($i in 1..($depth - 1)) {
                $path = Join-Path $chainDir (Name $i)
                if ($i % 100 -eq 0) {
                    & qemu-img create -q -f qcow2 -o cluster_size=4096 $path 4M
                    & qemu-io -f qcow2 -c "write -q -P $($i / 100) $(($i / 100) * 4096) 4k" $path | Out-Null
                    & qemu-img rebase -u -b (Name ($i - 1)) -F qcow2 $path
                }
                else {
                    [Text.Encoding]::ASCII.GetBytes((Name ($i - 1))).CopyTo($bytes, [int]$nameOffset)
                    [IO.File]::WriteAllBytes($path, $bytes)
                }
            }
            $script:top = Join-Path $chainDir (Name ($depth - 1))
            $script:reference = Join-Path $chainDir 'reference.raw'
            & qemu-img convert -O raw $top $reference
            $LASTEXITCODE | Should -Be 0
        }

        It 'lists the chain as qemu-img info --backing-chain lists it' {
            $chain = @(Get-BackupChain -Path $top)
            $qemu = @(& qemu-img info --backing-chain --output=json $top | ConvertFrom-Json)
            $chain.Count | Should -Be $depth
            $qemu.Count | Should -Be $depth
            # Ours: base first (Depth 0); qemu-img: top first.
            $ours = @($chain | Sort-Object Depth -Descending | ForEach-Object { $_.Path })
            $theirs = @($qemu | ForEach-Object { [IO.Path]::GetFullPath($_.filename, $chainDir) })
            $ours | Should -Be $theirs
            ($chain | Measure-Object DataBytes -Sum).Sum | Should -Be (64KB + 9 * 4KB)
        }

        It 'checks the chain and compares it with what qemu-img convert reads' {
            $r = Test-IncrementalBackup -Path $top -ReferencePath $reference
            $r.ChainValid | Should -BeTrue
            $r.Equal | Should -BeTrue
            $r.Passed | Should -BeTrue
            # One byte changed in the reference, in the cluster the base holds under 999 images: found where it is.
            $changed = Join-Path $chainDir 'changed.raw'
            Copy-Item $reference $changed
            $fs = [IO.File]::OpenWrite($changed); $fs.Position = 12345 + 40KB; $fs.WriteByte(0x01); $fs.Dispose()
            $d = Test-IncrementalBackup -Path $top -ReferencePath $changed
            $d.Passed | Should -BeFalse
            $d.FirstDifference | Should -Be (12345 + 40KB)
        }

        It 'restores the chain to what qemu-img convert makes of it' {
            $restored = Join-Path $chainDir 'restored.raw'
            $null = Restore-IncrementalBackup -Path $top -Destination $restored -Wait
            & qemu-img compare -f raw -F raw $restored $reference | Out-Null
            $LASTEXITCODE | Should -Be 0
            Remove-Item $restored
        }

        It 'lists, checks and restores it under a hard limit of 256 open files (the budget of open backing files keeps 64)' {
            $out = Invoke-ChildScript -FileLimit 256 @"
@(Get-BackupChain -Path '$top').Count
(Test-IncrementalBackup -Path '$top' -ReferencePath '$reference').Passed
`$null = Restore-IncrementalBackup -Path '$top' -Destination '$chainDir/limited.raw' -Wait
"restored"
"@
            $out[-3] | Should -Be $depth
            $out[-2] | Should -Be 'True'
            $out[-1] | Should -Be 'restored'
            & qemu-img compare -f raw -F raw "$chainDir/limited.raw" $reference | Out-Null
            $LASTEXITCODE | Should -Be 0
        }
    }
}
