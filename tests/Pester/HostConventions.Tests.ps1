# The conventions a PowerShell user checks in the first hour (issue 20, points 5 to 9): jobs belong to the runspace
# that started them, a backup that waits for Complete-IncrementalBackup is Blocked, sizes the filesystem cannot hold,
# provider paths, and the smaller binding and naming points. Cases that touch other runspaces or process state run
# in a child pwsh; each child script writes one JSON object of facts that the test then checks.

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $ModulePath = (Resolve-Path (Get-BitmapBackupModulePath)).Path

    function Invoke-ChildFacts {
        <#
        Run -Script in a child pwsh (-File) with the module imported and the current location in -Directory; the
        script's output is converted to JSON there and returned as an object here. Throws with the child's stderr when
        it fails or writes no facts; kills it after -TimeoutSeconds.
        #>
        param([Parameter(Mandatory)] [string] $Script, [Parameter(Mandatory)] [string] $Directory, [int] $TimeoutSeconds = 90)
        $file = Join-Path $Directory ('child-' + (New-TestName 's') + '.ps1')
        $body = @"
`$ErrorActionPreference = 'Stop'
Import-Module '$ModulePath'
Set-Location -LiteralPath '$Directory'
`$facts = & {
$Script
}
'FACTS:' + (`$facts | ConvertTo-Json -Depth 4 -Compress)
"@
        Set-Content -LiteralPath $file -Value $body
        $psi = [System.Diagnostics.ProcessStartInfo]::new('dotnet')
        foreach ($a in (Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-File', $file) { $psi.ArgumentList.Add($a) }
        $psi.RedirectStandardOutput = $true
        $psi.RedirectStandardError = $true
        $psi.Environment['NO_COLOR'] = '1'
        $process = [System.Diagnostics.Process]::Start($psi)
        $stdout = $process.StandardOutput.ReadToEndAsync()
        $stderr = $process.StandardError.ReadToEndAsync()
        if (-not $process.WaitForExit($TimeoutSeconds * 1000)) {
            $process.Kill($true)
            $process.WaitForExit()
            throw "child pwsh did not end within $TimeoutSeconds s: $($stdout.Result) $($stderr.Result)"
        }
        $process.WaitForExit()
        $line = @($stdout.Result -split "`n" | Where-Object { $_.StartsWith('FACTS:') }) | Select-Object -Last 1
        if ($process.ExitCode -ne 0 -or -not $line) {
            throw "child pwsh failed (exit $($process.ExitCode)): $($stdout.Result) $($stderr.Result)"
        }
        return $line.Substring(6) | ConvertFrom-Json
    }

    # A 16 MiB qcow2 image opened as node 'vm' with 4 MiB written, in the child's current folder.
    $NodeSetup = @'
$null = New-BlockImage vm.qcow2 -Size 16MB -Format qcow2
$null = Open-BlockNode vm.qcow2 -Name vm
Write-BlockNode vm -Offset 0 -Pattern 7 -Length 4MB -Confirm:$false
'@
}

Describe 'A backup job belongs to the runspace that started it' {
    It 'is neither seen nor removed by Get-Job | Remove-Job -Force in a <Kind>' -ForEach @(
        @{ Kind = 'ThreadJob'; Other = 'Start-ThreadJob { Import-Module $using:m; @(Get-Job).Count; Get-Job | Remove-Job -Force } | Receive-Job -Wait -AutoRemoveJob' }
        @{ Kind = 'ForEach-Object -Parallel runspace'; Other = '1 | ForEach-Object -Parallel { Import-Module $using:m; @(Get-Job).Count; Get-Job | Remove-Job -Force }' }
    ) {
        $dir = New-TestDirectory
        $facts = Invoke-ChildFacts -Directory $dir -Script @"
$NodeSetup
`$m = '$ModulePath'
`$j = Start-IncrementalBackup vm full.qcow2 -Sync Full -BytesPerSecond 1MB
`$seen = $Other
`$stateAfter = [string]`$j.JobStateInfo.State
`$listed = @(Get-Job -Id `$j.Id).Count
`$j | Stop-Job
`$j | Remove-Job
@{ SeenThere = [int]`$seen; StateAfter = `$stateAfter; ListedHere = `$listed; Partial = (Test-Path full.qcow2.partial) }
"@
        $facts.SeenThere | Should -Be 0
        $facts.StateAfter | Should -Be 'Running'
        $facts.ListedHere | Should -Be 1
        $facts.Partial | Should -BeFalse
    }

    It 'a job started in a ThreadJob is that runspace''s, not the starting one''s' {
        $dir = New-TestDirectory
        $facts = Invoke-ChildFacts -Directory $dir -Script @"
$NodeSetup
`$m = '$ModulePath'
`$r = Start-ThreadJob { Import-Module `$using:m; `$j = Start-IncrementalBackup vm there.qcow2 -Sync Full; `$null = `$j | Wait-Job; @(Get-Job).Count; `$j | Remove-Job } | Receive-Job -Wait -AutoRemoveJob
@{ SeenThere = [int]`$r; SeenHere = @(Get-Job | Where-Object PSJobTypeName -eq 'BitmapBackupJob').Count; Target = (Test-Path there.qcow2) }
"@
        $facts.SeenThere | Should -Be 1
        $facts.SeenHere | Should -Be 0
        $facts.Target | Should -BeTrue
    }
}

Describe 'A backup that waits for Complete-IncrementalBackup is Blocked' {
    BeforeAll {
        Close-TestNode
    }

    It 'with <Case>: State Blocked, Receive-Job leaves it Blocked, Wait-Job ends at once with BlockedJobsDeadlockWithWaitJob, Complete-IncrementalBackup completes it' -ForEach @(
        @{ Case = '-AutoFinalize $false'; Options = @{ Sync = 'Full'; AutoFinalize = $false }; Status = 'Pending' }
        @{ Case = '-Sync None'; Options = @{ Sync = 'None' }; Status = 'Running' }
    ) {
        $dir = New-TestDirectory
        $node = New-TestNode -Size 4MB
        $job = Start-IncrementalBackup -Node $node.Name -Target (Join-Path $dir 'b.qcow2') @Options
        try {
            Wait-BackupStatus $job $Status
            while ($job.JobStateInfo.State -ne 'Blocked') { Start-Sleep -Milliseconds 10 }
            $null = Receive-Job $job -Keep
            $job.JobStateInfo.State | Should -Be 'Blocked'
            { $job | Wait-Job -Timeout 60 -ErrorAction Stop } | Should -Throw -ErrorId 'BlockedJobsDeadlockWithWaitJob,Microsoft.PowerShell.Commands.WaitJobCommand'
            $job.JobStateInfo.State | Should -Be 'Blocked'
            $job | Complete-IncrementalBackup -Wait -Confirm:$false
            ($job | Wait-Job).JobStateInfo.State | Should -Be 'Completed'
            ($job | Receive-Job).Succeeded | Should -BeTrue
        }
        finally {
            $job | Remove-Job -Force
            Close-TestNode
        }
    }

    It 'Wait-Job -Any returns the other job that finishes; Stop-Job ends a Blocked job' {
        $dir = New-TestDirectory
        $node = New-TestNode -Size 4MB
        $blocked = Start-IncrementalBackup -Node $node.Name -Target (Join-Path $dir 'b.qcow2') -Sync None
        try {
            while ($blocked.JobStateInfo.State -ne 'Blocked') { Start-Sleep -Milliseconds 10 }
            $other = Start-ThreadJob { 'done' }
            Wait-Job -Job $blocked, $other -Any | Should -Be $other
            $other | Remove-Job
            $blocked | Stop-Job
            $blocked.JobStateInfo.State | Should -Be 'Stopped'
            Test-Path (Join-Path $dir 'b.qcow2') | Should -BeFalse
        }
        finally {
            $blocked | Remove-Job -Force
            Close-TestNode
        }
    }
}

Describe 'Sizes the file system cannot hold' {
    BeforeAll {
        $BigDir = New-TestDirectory
        $FileSystem = (& df --output=fstype $BigDir | Select-Object -Last 1).Trim()
        $HasLimit = $FileSystem -in 'ext2', 'ext3', 'ext4'
        $Skip = "the test folder is on $FileSystem, which has no 16 TiB file size limit (ext2/3/4 with 4 KiB blocks do)"
    }
    AfterEach {
        Close-TestNode
    }

    It 'New-BlockImage of a 20 TB raw image: ImageTooLargeForFileSystem naming the file system, no file left, a retry works' {
        if (-not $HasLimit) { Set-ItResult -Skipped -Because $Skip; return }
        $path = Join-Path $BigDir 'big.raw'
        $record = Assert-BlockError { New-BlockImage -Path $path -Size 20TB -ErrorAction Stop } -ErrorId 'ImageTooLargeForFileSystem,BitmapBackup.NewBlockImageCommand' `
            -MessageContains "'$path'", "($FileSystem)", '17592186040320 bytes (16 TiB)' -Category InvalidArgument
        $record.Exception.Message | Should -BeLike '*21990232555520 bytes (20 TiB)*'
        Test-Path -LiteralPath $path | Should -BeFalse
        (New-BlockImage -Path $path -Size 1MB).Size | Should -Be 1MB
    }

    It 'New-BlockImage of the largest size ext4 takes (16 TiB less 4 KiB) works, one 512-byte sector more does not' {
        if (-not $HasLimit) { Set-ItResult -Skipped -Because $Skip; return }
        $path = Join-Path $BigDir 'edge.raw'
        (New-BlockImage -Path $path -Size (16TB - 4KB)).Size | Should -Be (16TB - 4KB)
        Remove-Item -LiteralPath $path
        $null = Assert-BlockError { New-BlockImage -Path $path -Size (16TB - 3584) -ErrorAction Stop } -ErrorId 'ImageTooLargeForFileSystem,BitmapBackup.NewBlockImageCommand'
        Test-Path -LiteralPath $path | Should -BeFalse
    }

    It 'Resize-BlockNode of a raw node to 1 PB: ImageTooLargeForFileSystem, the node and its file keep their size and data' {
        if (-not $HasLimit) { Set-ItResult -Skipped -Because $Skip; return }
        $path = Join-Path $BigDir 'small.raw'
        $null = New-BlockImage -Path $path -Size 1MB
        $node = Open-BlockNode -Path $path -Name (New-TestName 'n')
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 0x5a -Length 1MB -Confirm:$false
        $null = Assert-BlockError { Resize-BlockNode -Node $node.Name -Size 1PB -Confirm:$false -ErrorAction Stop } -ErrorId 'ImageTooLargeForFileSystem,BitmapBackup.ResizeBlockNodeCommand' `
            -MessageContains "($FileSystem)", '1 PiB'
        (Get-BlockNode -Name $node.Name).Size | Should -Be 1MB
        Close-TestNode
        (Get-Item -LiteralPath $path).Length | Should -Be 1MB
        @([Linq.Enumerable]::Distinct([byte[]][IO.File]::ReadAllBytes($path))) | Should -Be @(0x5a)
    }

    It 'a raw backup target of a 20 TB node: ImageTooLargeForFileSystem, no .partial left, the node can still be backed up' {
        if (-not $HasLimit) { Set-ItResult -Skipped -Because $Skip; return }
        $source = Join-Path $BigDir 'huge.qcow2'
        $null = New-BlockImage -Path $source -Size 20TB -Format Qcow2
        $node = Open-BlockNode -Path $source -Name (New-TestName 'n')
        $target = Join-Path $BigDir 'huge-full.raw'
        $null = Assert-BlockError { Start-IncrementalBackup -Node $node.Name -Target $target -Sync Full -TargetFormat Raw } -ErrorId 'ImageTooLargeForFileSystem,BitmapBackup.StartIncrementalBackupCommand' `
            -MessageContains "($FileSystem)"
        Test-Path -LiteralPath $target | Should -BeFalse
        Test-Path -LiteralPath "$target.partial" | Should -BeFalse
        $r = Start-IncrementalBackup -Node $node.Name -Target (Join-Path $BigDir 'huge-full.qcow2') -Sync Full -Wait
        $r.Succeeded | Should -BeTrue
    }
}
