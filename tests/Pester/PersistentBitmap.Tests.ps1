# Persistent bitmaps across PowerShell processes: stored at a clean close, inconsistent after a crash.
BeforeDiscovery { }

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE

    function Invoke-ChildPwsh {
        <# Run a script in a fresh pwsh that imports the module; returns its output, throws on failure. #>
        param([Parameter(Mandatory)] [string] $Script)
        $full = "`$ErrorActionPreference = 'Stop'; Import-Module '$env:BITMAPBACKUP_MODULE'; $Script"
        $out = & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -Command $full 2>&1
        if ($LASTEXITCODE -ne 0) { throw "child pwsh failed ($LASTEXITCODE): $out" }
        return $out
    }
}

Describe 'Persistent bitmaps across processes (<Format>)' -ForEach @(
    @{ Format = 'Raw'; Extension = '.img' }
    @{ Format = 'Qcow2'; Extension = '.qcow2' }
) {
    BeforeEach {
        $dir = New-TestDirectory
        $path = Join-Path $dir "disk$Extension"
        $null = New-BlockImage -Path $path -Size 8MB -Format $Format
    }
    AfterEach { Close-TestNode }

    It 'keeps the count and the dirty ranges identical in a new process' {
        $first = Invoke-ChildPwsh @"
`$n = Open-BlockNode -Path '$path' -Name disk
`$null = New-DirtyBitmap -Node disk -Name pers -Persistent -Granularity 4KB
`$null = New-DirtyBitmap -Node disk -Name off -Persistent -Disabled
Write-BlockNode -Node disk -Offset 12345 -Pattern 7 -Length 100000
Write-BlockNode -Node disk -Offset 5MB -Zero -Length 64KB
(Get-DirtyBitmapRange -Node disk -Name pers | ForEach-Object { '{0}+{1}' -f `$_.Offset, `$_.Length }) -join ';'
(Get-DirtyBitmap -Node disk -Name pers).Count
Close-BlockNode disk
"@
        $node = Open-BlockNode -Path $path -Name disk
        $pers = Get-DirtyBitmap -Node disk -Name pers
        $pers.Persistent | Should -BeTrue
        $pers.Inconsistent | Should -BeFalse
        $pers.Recording | Should -BeTrue
        (Get-RangeText -Node disk -Name pers) -join ';' | Should -Be $first[0]
        $pers.Count | Should -Be ([long]$first[1])
        $pers.Count | Should -Be ((25 + 16) * 4KB)   # clusters 3..27 of the pattern, 16 of the zeroes
        (Get-DirtyBitmap -Node disk -Name off).Recording | Should -BeFalse
        (Get-DirtyBitmap -Node disk -Name off).Count | Should -Be 0
    }

    It 'lists stored bitmaps of a closed image with Get-DirtyBitmap -Path without changing it' {
        $null = Invoke-ChildPwsh @"
`$null = Open-BlockNode -Path '$path' -Name disk
`$null = New-DirtyBitmap -Node disk -Name pers -Persistent
Write-BlockNode -Node disk -Offset 0 -Pattern 1 -Length 1
Close-BlockNode disk
"@
        $before = Get-ChildItem $dir | ForEach-Object { "$($_.Name):$($_.Length):$($_.LastWriteTimeUtc.Ticks)" }
        $stored = Get-DirtyBitmap -Path $path
        $stored.Name | Should -Be 'pers'
        $stored.Count | Should -Be 64KB
        $stored.Flags | Should -Be @('auto')
        $stored.InUse | Should -BeFalse
        Get-ChildItem $dir | ForEach-Object { "$($_.Name):$($_.Length):$($_.LastWriteTimeUtc.Ticks)" } | Should -Be $before
    }

    It 'leaves the bitmap inconsistent, never silently clean, when the process is killed (kill -9)' {
        $marker = Join-Path $dir 'ready'
        $script = @"
`$ErrorActionPreference = 'Stop'; Import-Module '$env:BITMAPBACKUP_MODULE'
`$null = Open-BlockNode -Path '$path' -Name disk
`$null = New-DirtyBitmap -Node disk -Name pers -Persistent
Write-BlockNode -Node disk -Offset 0 -Pattern 1 -Length 1MB
Set-Content -Path '$marker' -Value ready
Start-Sleep -Seconds 120
"@
        $child = Start-Process -FilePath dotnet -ArgumentList @((Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-Command', $script) -PassThru
        try {
            $deadline = [DateTime]::UtcNow.AddSeconds(60)
            while (-not (Test-Path $marker) -and [DateTime]::UtcNow -lt $deadline -and -not $child.HasExited) { Start-Sleep -Milliseconds 100 }
            Test-Path $marker | Should -BeTrue
        }
        finally {
            & kill -9 $child.Id
            $child.WaitForExit()
        }
        (Get-DirtyBitmap -Path $path).InUse | Should -BeTrue
        $null = Open-BlockNode -Path $path -Name disk
        $b = Get-DirtyBitmap -Node disk -Name pers
        $b.Inconsistent | Should -BeTrue
        $b.Recording | Should -BeFalse
        { Enable-DirtyBitmap -Node disk -Name pers -ErrorAction Stop } | Should -Throw -ErrorId 'BitmapInconsistent,BitmapBackup.EnableDirtyBitmapCommand'
        { Clear-DirtyBitmap -Node disk -Name pers -ErrorAction Stop } | Should -Throw -ErrorId 'BitmapInconsistent,BitmapBackup.ClearDirtyBitmapCommand'
        Close-BlockNode disk
        # Still inconsistent after a clean close; removing it is the way out.
        $null = Open-BlockNode -Path $path -Name disk
        (Get-DirtyBitmap -Node disk -Name pers).Inconsistent | Should -BeTrue
        Remove-DirtyBitmap -Node disk -Name pers
        Close-BlockNode disk
        @(Get-DirtyBitmap -Path $path).Count | Should -Be 0
    }
}

Describe 'Persistent qcow2 bitmaps and QEMU' -Skip:(-not (Get-Command qemu-img -ErrorAction SilentlyContinue)) {
    BeforeEach {
        $dir = New-TestDirectory
        $path = Join-Path $dir 'disk.qcow2'
    }
    AfterEach { Close-TestNode }

    It 'reads a bitmap added by qemu-img and dirtied by qemu-io, and an incremental backup from it verifies' {
        & qemu-img create -q -f qcow2 $path 16M
        & qemu-io -f qcow2 -c 'write -q -P 0x41 0 4M' $path | Out-Null
        & qemu-img convert -f qcow2 -O qcow2 $path (Join-Path $dir 'full.qcow2')   # the "full backup"
        & qemu-img bitmap --add -g 65536 $path qb
        & qemu-io -f qcow2 -c 'write -q -P 0x42 1M 100k' -c 'write -q -P 0x43 9M 4k' -c 'write -q -z 12M 64k' $path | Out-Null
        $stored = Get-DirtyBitmap -Path $path -Name qb
        $stored.Flags | Should -Be @('auto')
        $null = Open-BlockNode -Path $path -Name disk
        Get-RangeText -Node disk -Name qb | Should -Be @('1048576+131072', '9437184+65536', '12582912+65536')
        $r = Start-IncrementalBackup -Node disk -Target (Join-Path $dir 'inc.qcow2') -Sync Incremental -Bitmap qb -BackingFile full.qcow2 -Wait
        $r.Succeeded | Should -BeTrue
        (Get-DirtyBitmap -Node disk -Name qb).Count | Should -Be 0
        Close-BlockNode disk
        Assert-QemuImageEqual -Path (Join-Path $dir 'inc.qcow2') -Reference $path
        $null = Assert-QemuImageCheck -Path (Join-Path $dir 'inc.qcow2')
        $null = Assert-QemuImageCheck -Path $path
    }

    It 'stores bitmaps that qemu-img lists, merges and removes, clean after every step' {
        $null = New-BlockImage -Path $path -Size 16MB
        $null = Open-BlockNode -Path $path -Name disk
        $null = New-DirtyBitmap -Node disk -Name ours -Persistent
        $null = New-DirtyBitmap -Node disk -Name other -Persistent -Disabled -Granularity 128KB
        Write-BlockNode -Node disk -Offset 2MB -Pattern 1 -Length 1MB
        Close-BlockNode disk
        $null = Assert-QemuImageCheck -Path $path
        $bitmaps = (& qemu-img info --output=json $path | ConvertFrom-Json).'format-specific'.data.bitmaps
        ($bitmaps | Where-Object name -eq ours).flags | Should -Be @('auto')
        ($bitmaps | Where-Object name -eq other).flags | Should -BeNullOrEmpty
        ($bitmaps | Where-Object name -eq other).granularity | Should -Be 131072
        & qemu-img bitmap --merge ours $path other; $LASTEXITCODE | Should -Be 0
        $null = Assert-QemuImageCheck -Path $path
        (Get-DirtyBitmap -Path $path -Name other).Count | Should -Be 1MB
        & qemu-img bitmap --remove $path ours; $LASTEXITCODE | Should -Be 0
        $null = Assert-QemuImageCheck -Path $path
        @(Get-DirtyBitmap -Path $path).Name | Should -Be @('other')
        $null = Open-BlockNode -Path $path -Name disk
        Get-RangeText -Node disk -Name other | Should -Be @('2097152+1048576')
    }

    It 'keeps an incremental chain right across three processes (full; writes, close; reopen, incremental; ...)' {
        $null = New-BlockImage -Path $path -Size 32MB
        $steps = @(
            "`$null = Open-BlockNode -Path '$path' -Name disk; Write-BlockNode -Node disk -Offset 0 -Pattern 1 -Length 8MB; `$null = New-DirtyBitmap -Node disk -Name b -Persistent; `$null = Start-IncrementalBackup -Node disk -Target '$dir/full.qcow2' -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait; Write-BlockNode -Node disk -Offset 3MB -Pattern 2 -Length 1MB; Close-BlockNode disk"
            "`$null = Open-BlockNode -Path '$path' -Name disk; `$null = Start-IncrementalBackup -Node disk -Target '$dir/inc1.qcow2' -Sync Incremental -Bitmap b -BackingFile full.qcow2 -Wait; Write-BlockNode -Node disk -Offset 20MB -Pattern 3 -Length 64KB; Write-BlockNode -Node disk -Offset 0 -Zero -Length 64KB; Close-BlockNode disk"
            "`$null = Open-BlockNode -Path '$path' -Name disk; `$r = Start-IncrementalBackup -Node disk -Target '$dir/inc2.qcow2' -Sync Incremental -Bitmap b -BackingFile inc1.qcow2 -Wait; `$r.BytesCopied; Close-BlockNode disk"
        )
        $out = foreach ($step in $steps) { Invoke-ChildPwsh $step }
        [long]($out | Select-Object -Last 1) | Should -Be (2 * 64KB)
        Assert-QemuImageEqual -Path "$dir/inc2.qcow2" -Reference $path
        foreach ($f in 'full', 'inc1', 'inc2') { $null = Assert-QemuImageCheck -Path "$dir/$f.qcow2" }
        $null = Assert-QemuImageCheck -Path $path
        (Get-DirtyBitmap -Path $path -Name b).Count | Should -Be 0
    }
}
