# QEMU's image locks with real QEMU processes on both sides (issue 16): qemu-io and qemu-storage-daemon holding an
# image against our opens; our nodes, backup targets and restore destinations against qemu-io and qemu-img; the
# locks gone after Close-BlockNode, Remove-Module and kill -9. And special files (issue 17): a FIFO, a socket,
# /dev/zero and a folder refused with their own ids at once, in a child pwsh under a timeout so that a
# regression cannot hang the suite.
BeforeDiscovery {
    $script:Missing = @('qemu-io', 'qemu-img', 'qemu-storage-daemon', 'timeout', 'mkfifo') | Where-Object { -not (Get-Command $_ -ErrorAction SilentlyContinue) }
    if ($script:Missing) {
        Write-Warning "ImageLocks.Tests.ps1: $($script:Missing -join ', ') not on PATH: their tests are skipped (install qemu-utils and qemu-system-common; CI has them)."
    }
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    $script:Open = 'BitmapBackup.OpenBlockNodeCommand'
    $script:Missing = @('qemu-io', 'qemu-img', 'qemu-storage-daemon', 'timeout', 'mkfifo') | Where-Object { -not (Get-Command $_ -ErrorAction SilentlyContinue) }
    $script:Pwsh = Join-Path $PSHOME 'pwsh.dll'

    function Skip-WithoutQemu {
        <# Mark the current test skipped, with the reason, when a tool it needs is missing; returns $true then. #>
        if ($script:Missing) {
            Set-ItResult -Skipped -Because "$($script:Missing -join ', ') not installed (qemu-utils, qemu-system-common)"
            return $true
        }
        return $false
    }

    function New-LockTestImage {
        <# A new 4 MiB qcow2 image (New-BlockImage) in a new folder; returns its path. #>
        param([string] $Format = 'Qcow2')
        $dir = New-TestDirectory
        $path = Join-Path $dir $(if ($Format -eq 'Qcow2') { 'disk.qcow2' } else { 'disk.img' })
        $null = New-BlockImage -Path $path -Size 4MB -Format $Format -Confirm:$false
        return $path
    }

    function Get-OfdLockedByte {
        <# The bytes of the file that open file descriptions hold shared OFD locks on, from /proc/locks (sorted, repeats kept). #>
        param([Parameter(Mandatory)] [string] $Path)
        $inode = (& stat -L -c %i $Path).Trim()
        $bytes = foreach ($line in Get-Content /proc/locks) {
            $f = $line -split '\s+' | Where-Object { $_ }
            if ($f.Count -ge 8 -and $f[1] -eq 'OFDLCK' -and $f[3] -eq 'READ' -and $f[5] -like "*:$inode") {
                for ($b = [long]$f[6]; $b -le [long]$f[7]; $b++) { [int]$b }
            }
        }
        return [int[]]@($bytes | Sort-Object)
    }

    function Start-QemuHolder {
        <#
        A QEMU process that holds the image until Stop-QemuHolder: qemu-io (reading commands from a pipe kept open;
        -ReadOnly adds -r) or qemu-storage-daemon with a qcow2 node on the file (read-only=on with -ReadOnly).
        Waits until its locks show in /proc/locks.
        #>
        param([Parameter(Mandatory)] [string] $Path, [ValidateSet('qemu-io', 'qemu-storage-daemon')] [string] $Tool = 'qemu-io', [switch] $ReadOnly)
        $psi = [Diagnostics.ProcessStartInfo]::new($Tool)
        $psi.UseShellExecute = $false
        $psi.RedirectStandardInput = $true
        $psi.RedirectStandardOutput = $true
        $psi.RedirectStandardError = $true
        if ($Tool -eq 'qemu-io') {
            $arguments = @(if ($ReadOnly) { '-r' }) + @('-f', 'qcow2', $Path)
        }
        else {
            $ro = if ($ReadOnly) { ',read-only=on' } else { '' }
            $arguments = @('--blockdev', "driver=file,filename=$($Path -replace ',', ',,'),node-name=f$ro", '--blockdev', "driver=qcow2,file=f,node-name=q$ro")
        }
        foreach ($a in $arguments) { $psi.ArgumentList.Add($a) }
        $process = [Diagnostics.Process]::Start($psi)
        $deadline = [DateTime]::UtcNow.AddSeconds(20)
        while (@(Get-OfdLockedByte -Path $Path).Count -eq 0) {
            if ($process.HasExited -or [DateTime]::UtcNow -gt $deadline) {
                $err = if ($process.HasExited) { $process.StandardError.ReadToEnd() } else { '' }
                Stop-QemuHolder $process
                throw "$Tool did not lock '$Path': $err"
            }
            Start-Sleep -Milliseconds 20
        }
        return $process
    }

    function Stop-QemuHolder {
        param([Parameter(Mandatory)] [Diagnostics.Process] $Process)
        if (-not $Process.HasExited) {
            if ($Process.StartInfo.FileName -eq 'qemu-io') { $Process.StandardInput.Close() }   # qemu-io quits at the end of its input
            if ($Process.StartInfo.FileName -ne 'qemu-io' -or -not $Process.WaitForExit(3000)) { $Process.Kill() }
            $null = $Process.WaitForExit(10000)
        }
        $Process.Dispose()
    }

    function Invoke-QemuIo {
        <# Run qemu-io non-interactively; returns ExitCode and Output (stdout and stderr). qemu-io reports a failed command on stdout. #>
        param([Parameter(Mandatory, ValueFromRemainingArguments)] [string[]] $ArgumentList)
        $lines = & qemu-io @ArgumentList 2>&1 | ForEach-Object { "$_" }
        return [pscustomobject]@{ ExitCode = $LASTEXITCODE; Output = ($lines -join "`n").Trim() }
    }

    function Assert-QemuIoWrites {
        <# qemu-io writes the qcow2 image: exit code 0 and "wrote" in its output. #>
        param([Parameter(Mandatory)] [string] $Path)
        $r = Invoke-QemuIo -f qcow2 -c 'write -P 0x5a 0 64k' $Path
        $r.ExitCode | Should -Be 0 -Because $r.Output
        $r.Output | Should -BeLike '*wrote 65536/65536 bytes*'
    }

    function Assert-QemuLockError {
        <# A QEMU tool's result: it failed with QEMU's lock error naming -Lock ('"write"' or 'shared "write"') and the image. #>
        param([Parameter(Mandatory)] $Result, [Parameter(Mandatory)] [string] $Lock, [Parameter(Mandatory)] [string] $Path)
        $Result.ExitCode | Should -Not -Be 0 -Because "the image is locked, yet it said: $($Result.Output)"
        $Result.Output | Should -BeLike "*Failed to get $Lock lock*"
        $Result.Output | Should -BeLike "*Is another process using the image ``[$Path``]*"
    }

    function Invoke-TimedChildPwsh {
        <#
        Run a script in a fresh pwsh that imports the module, killed by timeout(1) after -Seconds; returns ExitCode
        and Output. A child that hangs fails the test instead of the suite.
        #>
        param([Parameter(Mandatory)] [string] $Script, [int] $Seconds = 30)
        $full = "`$ErrorActionPreference = 'Stop'; Import-Module '$(Get-BitmapBackupModulePath)'; $Script"
        $out = & timeout -s KILL $Seconds dotnet $script:Pwsh -NoProfile -NonInteractive -Command $full 2>&1 | ForEach-Object { "$_" }
        return [pscustomobject]@{ ExitCode = $LASTEXITCODE; Output = @($out) }
    }
}

Describe 'A QEMU process holding an image (<Tool>)' -ForEach @(
    @{ Tool = 'qemu-io' }
    @{ Tool = 'qemu-storage-daemon' }
) {
    AfterEach { Close-TestNode }

    It 'refuses our writable and read-only opens with ImageInUse in QEMU''s words; -ReadOnly -ForceShare opens it, with a warning' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $qemu = Start-QemuHolder -Path $path -Tool $Tool
        try {
            $name = New-TestName
            Assert-BlockError { Open-BlockNode -Path $path -Name $name -ErrorAction Stop } -ErrorId "ImageInUse,$Open" `
                -MessageContains 'Failed to get "write" lock', 'another process holds the image', "'$path'" -Category ResourceBusy
            Assert-BlockError { Open-BlockNode -Path $path -Name $name -ReadOnly -ErrorAction Stop } -ErrorId "ImageInUse,$Open" `
                -MessageContains 'Failed to get shared "write" lock', "'$path'"
            @(Get-BlockNode).Count | Should -Be 0
            $node = Open-BlockNode -Path $path -Name $name -ReadOnly -ForceShare -WarningVariable warned -WarningAction SilentlyContinue -ErrorAction Stop
            $node.ReadOnly | Should -BeTrue
            $node.Format | Should -Be 'Qcow2'
            "$warned" | Should -BeLike "*-ForceShare: '$path' is read without image locks*may be changing*"
            (Read-BlockNode -Node $name -Offset 0 -Length 512).Length | Should -Be 512
            Close-BlockNode -Node $name -Confirm:$false
        }
        finally { Stop-QemuHolder $qemu }
        (Open-BlockNode -Path $path -Name (New-TestName) -ErrorAction Stop).ReadOnly | Should -BeFalse   # free again
    }

    It 'refuses the read-only cmdlets too, unless -ForceShare' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $qemu = Start-QemuHolder -Path $path -Tool $Tool
        try {
            Assert-BlockError { Get-BlockImage -Path $path -ErrorAction Stop } -ErrorId 'ImageInUse,BitmapBackup.GetBlockImageCommand' -MessageContains 'Failed to get shared "write" lock'
            Assert-BlockError { Get-DirtyBitmap -Path $path -ErrorAction Stop } -ErrorId 'ImageInUse,BitmapBackup.GetDirtyBitmapCommand'
            Assert-BlockError { Get-BackupChain -Path $path -ErrorAction Stop } -ErrorId 'ImageInUse,BitmapBackup.GetBackupChainCommand'
            Assert-BlockError { Test-IncrementalBackup -Path $path -ReferencePath $path -ErrorAction Stop } -ErrorId 'ImageInUse,BitmapBackup.TestIncrementalBackupCommand'

            (Get-BlockImage -Path $path -ForceShare -WarningAction SilentlyContinue -ErrorAction Stop).Size | Should -Be 4MB
            @(Get-DirtyBitmap -Path $path -ForceShare -WarningAction SilentlyContinue -ErrorAction Stop).Count | Should -Be 0
            (Get-BackupChain -Path $path -ForceShare -WarningAction SilentlyContinue -ErrorAction Stop).Path | Should -Be $path
            $v = Test-IncrementalBackup -Path $path -ReferencePath $path -ForceShare -WarningVariable warned -WarningAction SilentlyContinue -ErrorAction Stop
            $v.Equal | Should -BeTrue
            "$warned" | Should -BeLike '*-ForceShare*'
        }
        finally { Stop-QemuHolder $qemu }
    }

    It 'held read-only, it lets us read the image but not write it' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $qemu = Start-QemuHolder -Path $path -Tool $Tool -ReadOnly
        try {
            Assert-BlockError { Open-BlockNode -Path $path -Name (New-TestName) -ErrorAction Stop } -ErrorId "ImageInUse,$Open" -MessageContains 'Failed to get "write" lock'
            $node = Open-BlockNode -Path $path -Name (New-TestName) -ReadOnly -ErrorAction Stop
            (Get-OfdLockedByte -Path $path) | Should -Be @(100, 100, 201, 201, 203, 203)   # two readers, the same bytes
            Close-BlockNode -Node $node.Name -Confirm:$false
        }
        finally { Stop-QemuHolder $qemu }
    }
}

Describe 'Our node holding an image' {
    AfterEach { Close-TestNode }

    It 'refuses qemu-io writes, qemu-img info and qemu-img check; qemu-img info -U works; after Close-BlockNode qemu-io writes it' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $name = New-TestName
        $null = Open-BlockNode -Path $path -Name $name -ErrorAction Stop
        $null = New-DirtyBitmap -Node $name -Name b
        (Get-OfdLockedByte -Path $path) | Should -Be @(100, 101, 103, 201, 203)

        Assert-QemuLockError -Result (Invoke-QemuIo -f qcow2 -c 'write -P 0x5a 0 64k' $path) -Lock '"write"' -Path $path
        Assert-QemuLockError -Result (Invoke-QemuImg info $path) -Lock 'shared "write"' -Path $path
        Assert-QemuLockError -Result (Invoke-QemuImg check $path) -Lock 'shared "write"' -Path $path
        $u = Invoke-QemuImg info -U $path
        $u.ExitCode | Should -Be 0 -Because $u.Output
        $u.Output | Should -BeLike '*file format: qcow2*'
        (Get-DirtyBitmap -Node $name -Name b).Count | Should -Be 0   # nothing bypassed the bitmap

        Close-BlockNode -Node $name -Confirm:$false
        @(Get-OfdLockedByte -Path $path).Count | Should -Be 0
        Assert-QemuIoWrites -Path $path
    }

    It 'read-only, it shares the image with qemu-img info and qemu-io -r, but not with a qemu-io writer' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $name = New-TestName
        $null = Open-BlockNode -Path $path -Name $name -ReadOnly -ErrorAction Stop
        (Get-OfdLockedByte -Path $path) | Should -Be @(100, 201, 203)
        (Invoke-QemuImg info $path).ExitCode | Should -Be 0
        $r = Invoke-QemuIo -r -f qcow2 -c 'read 0 64k' $path
        $r.ExitCode | Should -Be 0 -Because $r.Output
        Assert-QemuLockError -Result (Invoke-QemuIo -f qcow2 -c 'write 0 64k' $path) -Lock '"write"' -Path $path
    }

    It 'releases the locks when PowerShell is killed (kill -9), and qemu-io then writes the image' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $marker = Join-Path (Split-Path $path) 'ready'
        $script = @"
`$ErrorActionPreference = 'Stop'; Import-Module '$(Get-BitmapBackupModulePath)'
`$null = Open-BlockNode -Path '$path' -Name disk
Write-BlockNode -Node disk -Offset 0 -Pattern 1 -Length 64KB
Set-Content -Path '$marker' -Value ready
Start-Sleep -Seconds 120
"@
        $child = Start-Process -FilePath dotnet -ArgumentList @($script:Pwsh, '-NoProfile', '-NonInteractive', '-Command', $script) -PassThru
        try {
            $deadline = [DateTime]::UtcNow.AddSeconds(60)
            while (-not (Test-Path $marker) -and [DateTime]::UtcNow -lt $deadline -and -not $child.HasExited) { Start-Sleep -Milliseconds 100 }
            Test-Path $marker | Should -BeTrue
            Assert-QemuLockError -Result (Invoke-QemuIo -f qcow2 -c 'write 0 64k' $path) -Lock '"write"' -Path $path
        }
        finally {
            & kill -9 $child.Id
            $child.WaitForExit()
        }
        @(Get-OfdLockedByte -Path $path).Count | Should -Be 0
        Assert-QemuIoWrites -Path $path
    }

    It 'releases the locks at Remove-Module' {
        if (Skip-WithoutQemu) { return }
        $path = New-LockTestImage
        $r = Invoke-TimedChildPwsh @"
`$null = Open-BlockNode -Path '$path' -Name disk
& qemu-io -f qcow2 -c 'write 0 64k' '$path' 2>&1 | Out-Null; "while open: `$LASTEXITCODE"
Remove-Module BitmapBackup
& qemu-io -f qcow2 -c 'write 0 64k' '$path' 2>&1 | Out-Null; "after Remove-Module: `$LASTEXITCODE"
"@
        $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
        $r.Output | Should -Contain 'while open: 1'
        $r.Output | Should -Contain 'after Remove-Module: 0'
    }
}

Describe 'Backup targets and restore destinations are locked as writers' {
    BeforeEach {
        $dir = New-TestDirectory
        $source = Join-Path $dir 'source.qcow2'
        $null = New-BlockImage -Path $source -Size 4MB -Confirm:$false
        $name = New-TestName
        $null = Open-BlockNode -Path $source -Name $name
        foreach ($mib in 0..3) { Write-BlockNode -Node $name -Offset ($mib * 1MB) -Pattern (0x30 + $mib) -Length 1MB -Confirm:$false }
    }
    AfterEach {
        Get-Job | Where-Object PSJobTypeName -eq 'BitmapBackupJob' | Remove-Job -Force
        Close-TestNode
    }

    It 'qemu-img info refuses the .partial file of a running backup, -U reads it, and the finished backup reads' {
        if (Skip-WithoutQemu) { return }
        $target = Join-Path $dir 'full.qcow2'
        $job = Start-IncrementalBackup -Node $name -Target $target -Sync Full -BytesPerSecond 1MB
        try {
            Suspend-IncrementalBackup -Job $job -Confirm:$false   # paused, the target stays open: time to look at it
            [string]$job.Status | Should -BeExactly 'Paused'
            Assert-QemuLockError -Result (Invoke-QemuImg info "$target.partial") -Lock 'shared "write"' -Path "$target.partial"
            Assert-QemuLockError -Result (Invoke-QemuIo -f qcow2 -c 'write 0 4k' "$target.partial") -Lock '"write"' -Path "$target.partial"
            (Invoke-QemuImg info -U "$target.partial").ExitCode | Should -Be 0
            $job.Backup.BytesPerSecond = 0   # the rest at full speed
            Resume-IncrementalBackup -Job $job -Confirm:$false
            $null = $job | Wait-Job -Timeout 60
            (Receive-Job -Job $job).Succeeded | Should -BeTrue
        }
        finally { $job | Stop-Job }
        @(Get-OfdLockedByte -Path $target).Count | Should -Be 0
        $null = Assert-QemuImageCheck -Path $target
        Close-BlockNode -Node $name -Confirm:$false   # qemu-img reads the source only once our node lets go of it
        Assert-QemuImageEqual -Path $target -Reference $source
    }

    It 'a .partial file another process holds is not taken for a crash''s leftover: ImageInUse; once let go, it is replaced' {
        if (Skip-WithoutQemu) { return }
        $target = Join-Path $dir 'next.qcow2'
        $null = New-BlockImage -Path "$target.partial" -Size 4MB -Format Qcow2 -Confirm:$false
        $qemu = Start-QemuHolder -Path "$target.partial"   # stands for a backup to the same target in another process
        try {
            Assert-BlockError { Start-IncrementalBackup -Node $name -Target $target -Sync Full -Wait } `
                -ErrorId 'ImageInUse,BitmapBackup.StartIncrementalBackupCommand' -MessageContains "'$target.partial' is being written by another process"
            Test-Path -LiteralPath "$target.partial" | Should -BeTrue
        }
        finally { Stop-QemuHolder $qemu }
        (Start-IncrementalBackup -Node $name -Target $target -Sync Full -Wait).Succeeded | Should -BeTrue
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
    }

    It 'qemu-img info refuses the destination of a running restore, and reads it once restored' {
        if (Skip-WithoutQemu) { return }
        $backup = Join-Path $dir 'full.qcow2'
        $null = Start-IncrementalBackup -Node $name -Target $backup -Sync Full -Wait
        Close-TestNode
        $destination = Join-Path $dir 'restored.qcow2'
        $job = Restore-IncrementalBackup -Path $backup -Destination $destination -Format Qcow2 -BytesPerSecond 1MB -Confirm:$false
        try {
            Suspend-IncrementalBackup -Job $job -Confirm:$false
            [string]$job.Status | Should -BeExactly 'Paused'
            Assert-QemuLockError -Result (Invoke-QemuImg info "$destination.partial") -Lock 'shared "write"' -Path "$destination.partial"
            Assert-QemuLockError -Result (Invoke-QemuIo -f qcow2 -c 'write 0 4k' $backup) -Lock '"write"' -Path $backup   # the chain is held for reading
            $job.Backup.BytesPerSecond = 0
            Resume-IncrementalBackup -Job $job -Confirm:$false
            $null = $job | Wait-Job -Timeout 60
            (Receive-Job -Job $job).Succeeded | Should -BeTrue
        }
        finally { $job | Stop-Job }
        Assert-QemuImageEqual -Path $destination -Reference $backup
    }
}

Describe 'Paths that are not images' {
    It 'refuses a FIFO, a socket, /dev/zero and a folder with their own ids in under a second, and opens a qcow2 image right after' {
        if (Skip-WithoutQemu) { return }
        $dir = New-TestDirectory
        $fifo = Join-Path $dir 'pipe'
        & mkfifo $fifo
        $socketPath = Join-Path $dir 'sock'
        $folder = New-Item -ItemType Directory -Path (Join-Path $dir 'folder')
        $image = New-LockTestImage
        # In a child pwsh killed after 20 s: with the old engine the FIFO open blocked forever, and every open after it.
        $r = Invoke-TimedChildPwsh -Seconds 20 @"
`$socket = [Net.Sockets.Socket]::new([Net.Sockets.AddressFamily]::Unix, [Net.Sockets.SocketType]::Stream, [Net.Sockets.ProtocolType]::Unspecified)
`$socket.Bind([Net.Sockets.UnixDomainSocketEndPoint]::new('$socketPath'))
foreach (`$p in '$fifo', '$socketPath', '/dev/zero', '$($folder.FullName)') {
    `$watch = [Diagnostics.Stopwatch]::StartNew()
    try { `$null = Open-BlockNode -Path `$p -ErrorAction Stop; "`$p opened" }
    catch { '{0}|{1}|{2}' -f `$p, `$_.FullyQualifiedErrorId, `$watch.ElapsedMilliseconds }
}
`$node = Open-BlockNode -Path '$image' -Name after
"qcow2 opened: `$(`$node.Format)"
"@
        $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
        $expected = [ordered]@{ $fifo = 'ImageIsFifo'; $socketPath = 'ImageIsSocket'; '/dev/zero' = 'ImageIsCharacterDevice'; $folder.FullName = 'ImageIsFolder' }
        $lines = @($r.Output | Where-Object { $_ -like '*|*|*' })
        $lines.Count | Should -Be 4 -Because ($r.Output -join "`n")
        foreach ($line in $lines) {
            $p, $id, $ms = $line -split '\|'
            $id | Should -BeExactly "$($expected[$p]),$Open"
            [int]$ms | Should -BeLessThan 1000
        }
        $r.Output | Should -Contain 'qcow2 opened: Qcow2'
    }

    It 'refuses -ForceShare without -ReadOnly with ForceShareRequiresReadOnly, opening nothing' {
        $path = New-LockTestImage -Format Raw
        Assert-BlockError { Open-BlockNode -Path $path -Name (New-TestName) -ForceShare -ErrorAction Stop } `
            -ErrorId "ForceShareRequiresReadOnly,$Open" -MessageContains '-ForceShare can only be used with -ReadOnly' -Category InvalidArgument
        @(Get-BlockNode).Count | Should -Be 0
    }
}
