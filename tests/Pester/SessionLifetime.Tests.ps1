# The module in a real PowerShell host: the end of the process while a backup runs (pwsh -File ending, exit,
# [Environment]::Exit, exit at a prompt fed on stdin), and Remove-Module / Import-Module -Force in other runspaces.
# Every case runs in a child pwsh, since it ends a process or removes the module; the next process's view of the
# images is checked here, and with qemu-img.

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $ModulePath = (Resolve-Path (Get-BitmapBackupModulePath)).Path
    $QemuImg = Get-Command qemu-img -CommandType Application -ErrorAction SilentlyContinue

    function Invoke-ChildPwsh {
        <#
        Run a child pwsh (-File of a script written from -Script, or -Command, or commands fed on stdin to
        -Command -) and wait at most -TimeoutSeconds (then kill it). Returns ExitCode, Output (stdout), Errors
        (stderr) and Seconds.
        #>
        param(
            [Parameter(Mandatory)] [string] $Script,
            [ValidateSet('File', 'Command', 'Stdin')] [string] $Mode = 'File',
            [int] $TimeoutSeconds = 90
        )
        $psi = [System.Diagnostics.ProcessStartInfo]::new('dotnet')
        $psi.ArgumentList.Add((Join-Path $PSHOME 'pwsh.dll'))
        foreach ($a in '-NoProfile', '-NonInteractive') { $psi.ArgumentList.Add($a) }
        switch ($Mode) {
            'File' {
                $file = Join-Path (New-TestDirectory) 'script.ps1'
                Set-Content -Path $file -Value $Script
                $psi.ArgumentList.Add('-File'); $psi.ArgumentList.Add($file)
            }
            'Command' { $psi.ArgumentList.Add('-Command'); $psi.ArgumentList.Add($Script) }
            'Stdin' { $psi.ArgumentList.Add('-Command'); $psi.ArgumentList.Add('-'); $psi.RedirectStandardInput = $true }
        }
        $psi.RedirectStandardOutput = $true
        $psi.RedirectStandardError = $true
        $psi.Environment['NO_COLOR'] = '1'
        $watch = [Diagnostics.Stopwatch]::StartNew()
        $process = [System.Diagnostics.Process]::Start($psi)
        $stdout = $process.StandardOutput.ReadToEndAsync()
        $stderr = $process.StandardError.ReadToEndAsync()
        if ($Mode -eq 'Stdin') {
            foreach ($line in $Script -split "`n") { $process.StandardInput.WriteLine($line.TrimEnd("`r")) }
            $process.StandardInput.Close()
        }
        if (-not $process.WaitForExit($TimeoutSeconds * 1000)) {
            $process.Kill($true)
            $process.WaitForExit()
            throw "child pwsh did not end within $TimeoutSeconds s; output: $($stdout.Result) $($stderr.Result)"
        }
        $process.WaitForExit()
        return [pscustomobject]@{ ExitCode = $process.ExitCode; Output = $stdout.Result; Errors = $stderr.Result; Seconds = $watch.Elapsed.TotalSeconds }
    }

    function Get-BackupPrelude {
        <#
        A 16 MiB qcow2 node 'vm' with the persistent bitmap 'daily' anchored by a full backup, 6 MiB written since,
        and an incremental backup job 'nightly' throttled to 1 MiB/s, so that it still runs when the script ends.
        #>
        param([Parameter(Mandatory)] [string] $Directory)
        return @"
`$ErrorActionPreference = 'Stop'
Import-Module '$ModulePath'
`$null = New-BlockImage -Path '$Directory/vm.qcow2' -Size 16MB
`$null = Open-BlockNode -Path '$Directory/vm.qcow2' -Name vm
`$null = New-DirtyBitmap -Node vm -Name daily -Persistent
Write-BlockNode -Node vm -Offset 0 -Pattern 0x11 -Length 2MB
`$null = Start-IncrementalBackup -Node vm -Target '$Directory/full.qcow2' -Sync Full -Bitmap daily -BitmapMode OnSuccess -Wait
Write-BlockNode -Node vm -Offset 4MB -Pattern 0x22 -Length 6MB
`$job = Start-IncrementalBackup -Node vm -Target '$Directory/inc1.qcow2' -Sync Incremental -Bitmap daily -BackingFile full.qcow2 -BytesPerSecond 1MB -JobName nightly
'job ' + `$job.Name + ' is ' + `$job.Status
"@
    }

    function Assert-NextProcessSeesConsistentChain {
        <#
        In this process (the next one): no partial file; 'daily' stored cleanly and loaded consistent with every
        dirty byte of the stopped backup; the incremental taken now, on the full backup, equals the node.
        #>
        param([Parameter(Mandatory)] [string] $Directory)
        @(Get-ChildItem -Path $Directory -Filter '*.partial' | ForEach-Object Name) | Should -BeNullOrEmpty -Because 'the stopped backup deleted its partial target'
        Test-Path (Join-Path $Directory 'inc1.qcow2') | Should -BeFalse
        $stored = Get-DirtyBitmap -Path (Join-Path $Directory 'vm.qcow2') -Name daily
        $stored.InUse | Should -BeFalse -Because 'the bitmap was stored at a clean close'
        $null = Open-BlockNode -Path (Join-Path $Directory 'vm.qcow2') -Name vm
        try {
            $daily = Get-DirtyBitmap -Node vm -Name daily
            $daily.Inconsistent | Should -BeFalse
            $daily.Count | Should -BeGreaterOrEqual 6MB
            Get-RangeText -Node vm -Name daily | Should -Be @('4194304+6291456') -Because 'every byte written since the full backup is still dirty'
            $result = Start-IncrementalBackup -Node vm -Target (Join-Path $Directory 'inc1.qcow2') -Sync Incremental -Bitmap daily -BackingFile full.qcow2 -Wait
            $result.Succeeded | Should -BeTrue
        }
        finally { Close-BlockNode -Node vm -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue }
        if (-not $QemuImg) {
            Set-ItResult -Skipped -Because 'qemu-img is not installed: the chain was checked through the module only'
            return
        }
        Assert-QemuImageCheck -Path (Join-Path $Directory 'inc1.qcow2')
        Assert-QemuImageEqual -Path (Join-Path $Directory 'inc1.qcow2') -Reference (Join-Path $Directory 'vm.qcow2')
    }
}

Describe 'The end of PowerShell while a backup runs' {
    BeforeEach { $dir = New-TestDirectory }
    AfterEach { Close-TestNode }

    It 'a -File script that ends: the backup is stopped and named in a warning, its bits and the chain are intact' {
        $r = Invoke-ChildPwsh -Mode File -Script (Get-BackupPrelude $dir)
        $r.ExitCode | Should -Be 0 -Because "the script ran: $($r.Output) $($r.Errors)"
        $r.Output | Should -Match 'job nightly is Running' -Because 'the backup still ran when the script ended'
        $r.Output | Should -Match "WARNING: Backup job 'nightly' \(node 'vm' to '.*inc1\.qcow2'\) was stopped because PowerShell is exiting"
        $r.Output | Should -Match "bitmap 'daily' keeps every dirty bit"
        $r.Errors | Should -BeNullOrEmpty -Because 'the warning is written once, through the host'
        Assert-NextProcessSeesConsistentChain -Directory $dir
    }

    It 'exit in -Command: the same, and the exit code is kept' {
        $r = Invoke-ChildPwsh -Mode Command -Script ((Get-BackupPrelude $dir) + "`nexit 3")
        $r.ExitCode | Should -Be 3 -Because "exit 3 ends it: $($r.Output) $($r.Errors)"
        $r.Output | Should -Match "WARNING: Backup job 'nightly' .* was stopped because PowerShell is exiting"
        Assert-NextProcessSeesConsistentChain -Directory $dir
    }

    It 'exit at a prompt fed on stdin (-Command -): the same' {
        $r = Invoke-ChildPwsh -Mode Stdin -Script ((Get-BackupPrelude $dir) + "`nexit 5")
        $r.ExitCode | Should -Be 5 -Because "exit 5 ends it: $($r.Output) $($r.Errors)"
        $r.Output | Should -Match 'job nightly is Running'
        $r.Output | Should -Match "WARNING: Backup job 'nightly' .* was stopped because PowerShell is exiting"
        Assert-NextProcessSeesConsistentChain -Directory $dir
    }

    It '[Environment]::Exit: the same at process exit, the warning on stderr (no host is left)' {
        $r = Invoke-ChildPwsh -Mode Command -Script ((Get-BackupPrelude $dir) + "`n[Environment]::Exit(4)")
        $r.ExitCode | Should -Be 4 -Because "[Environment]::Exit(4) ends it: $($r.Output) $($r.Errors)"
        $r.Errors | Should -Match "WARNING: Backup job 'nightly' .* was stopped because PowerShell is exiting"
        Assert-NextProcessSeesConsistentChain -Directory $dir
    }

    It 'a backup that does not stop holds the exit for 5 seconds at most; the other nodes are still closed cleanly' {
        # The script holds the node's write gate, which the stopping backup needs to detach from it: it is wedged.
        $script = (Get-BackupPrelude $dir) + @"

`$null = New-BlockImage -Path '$dir/other.img' -Size 1MB
`$null = Open-BlockNode -Path '$dir/other.img' -Name other
`$null = New-DirtyBitmap -Node other -Name kept -Persistent
Write-BlockNode -Node other -Offset 0 -Pattern 1 -Length 1
`$held = [BitmapBackup.Core.Nodes.BlockEngine]::Default.Find('vm').Quiesce()
"@
        $r = Invoke-ChildPwsh -Mode File -Script $script -TimeoutSeconds 60
        $r.ExitCode | Should -Be 0 -Because "the script ran: $($r.Output) $($r.Errors)"
        $r.Output | Should -Match "WARNING: Backup job 'nightly' \(node 'vm'\) did not stop within 5 seconds of PowerShell exiting: node 'vm' is left as it is"
        $r.Seconds | Should -BeLessThan 45 -Because 'the exit waits 5 seconds for the backups, not for ever'
        (Get-DirtyBitmap -Path (Join-Path $dir 'other.img') -Name kept).InUse | Should -BeFalse -Because 'the other node was closed and its bitmap stored'
        (Get-DirtyBitmap -Path (Join-Path $dir 'other.img') -Name kept).Count | Should -Be 64KB
        (Get-DirtyBitmap -Path (Join-Path $dir 'vm.qcow2') -Name daily).InUse | Should -BeTrue -Because 'the wedged node was left as it was: its bitmap loads inconsistent'
    }

    It 'a script that ends with no backup running writes no warning' {
        $r = Invoke-ChildPwsh -Mode File -Script @"
`$ErrorActionPreference = 'Stop'
Import-Module '$ModulePath'
`$null = New-BlockImage -Path '$dir/a.img' -Size 1MB
`$null = Open-BlockNode -Path '$dir/a.img' -Name a
`$null = New-DirtyBitmap -Node a -Name p -Persistent
`$null = New-DirtyBitmap -Node a -Name t
Write-BlockNode -Node a -Offset 0 -Pattern 1 -Length 1
`$null = Start-IncrementalBackup -Node a -Target '$dir/done.img' -Sync Full -TargetFormat Raw -Wait
'done'
"@
        $r.ExitCode | Should -Be 0
        $r.Output.Trim() | Should -BeExactly 'done'
        $r.Errors | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Path (Join-Path $dir 'a.img') -Name p).InUse | Should -BeFalse
    }
}

Describe 'Remove-Module and Import-Module -Force in other runspaces' {
    BeforeEach { $dir = New-TestDirectory }
    AfterEach { Close-TestNode }

    It 'leave the nodes of the process open with their bits; the last Remove-Module closes them with the warning' {
        $r = Invoke-ChildPwsh -Mode File -Script @"
`$ErrorActionPreference = 'Stop'
`$m = '$ModulePath'
Import-Module `$m
`$null = New-BlockImage -Path '$dir/a.img' -Size 4MB
`$null = Open-BlockNode -Path '$dir/a.img' -Name vm
`$null = New-DirtyBitmap -Node vm -Name b
`$null = New-DirtyBitmap -Node vm -Name p -Persistent
Write-BlockNode -Node vm -Offset 0 -Pattern 1 -Length 1MB
1 | ForEach-Object -Parallel { Import-Module `$using:m; Remove-Module BitmapBackup }
'parallel remove: ' + (Get-DirtyBitmap -Node vm -Name b).Count
1 | ForEach-Object -Parallel { Import-Module `$using:m -Force; Import-Module `$using:m -Force; Remove-Module BitmapBackup }
'parallel force: ' + (Get-DirtyBitmap -Node vm -Name b).Count
Import-Module `$m -Force
'main force: ' + (Get-DirtyBitmap -Node vm -Name b).Count
Start-ThreadJob { Import-Module `$using:m; 'thread job sees ' + (Get-BlockNode).Name } | Receive-Job -Wait -AutoRemoveJob
`$gate = [System.Threading.ManualResetEventSlim]::new(`$false)
`$holder = Start-ThreadJob { Import-Module `$using:m; `$null = (`$using:gate).Wait(60000) }
while (`$holder.State -eq 'NotStarted' -or -not (Get-Module BitmapBackup)) { Start-Sleep -Milliseconds 20 }
Start-Sleep -Milliseconds 500
`$warnings = @(Remove-Module BitmapBackup 3>&1)
'remove while a thread job imports it: ' + `$warnings.Count + ' warnings'
Import-Module `$m
'still open: ' + (Get-DirtyBitmap -Node vm -Name b).Count
`$gate.Set(); `$null = `$holder | Wait-Job; `$holder | Remove-Job
`$warnings = @(Remove-Module BitmapBackup 3>&1)
'last remove: ' + (`$warnings -join ' | ')
Import-Module `$m
'nodes after: ' + @(Get-BlockNode).Count
"@
        $r.ExitCode | Should -Be 0 -Because "the script ran: $($r.Output) $($r.Errors)"
        $lines = $r.Output -split "`r?`n"
        $lines | Should -Contain 'parallel remove: 1048576'
        $lines | Should -Contain 'parallel force: 1048576'
        $lines | Should -Contain 'main force: 1048576'
        $lines | Should -Contain 'thread job sees vm'
        $lines | Should -Contain 'remove while a thread job imports it: 0 warnings'
        $lines | Should -Contain 'still open: 1048576'
        $lines | Should -Contain "last remove: Node 'vm' closed; its bitmaps 'b' (1048576 dirty bytes) were not persistent and are gone."
        $lines | Should -Contain 'nodes after: 0'
        (Get-DirtyBitmap -Path (Join-Path $dir 'a.img') -Name p).InUse | Should -BeFalse -Because 'the last removal stored the persistent bitmap'
        (Get-DirtyBitmap -Path (Join-Path $dir 'a.img') -Name p).Count | Should -Be 1MB
    }

    It 'the last Remove-Module leaves a node with a running backup open, with a warning; the backup goes on' {
        $r = Invoke-ChildPwsh -Mode File -Script @"
`$ErrorActionPreference = 'Stop'
`$m = '$ModulePath'
Import-Module `$m
`$null = New-BlockImage -Path '$dir/a.img' -Size 8MB
`$null = Open-BlockNode -Path '$dir/a.img' -Name vm
Write-BlockNode -Node vm -Offset 0 -Pattern 1 -Length 4MB
`$job = Start-IncrementalBackup -Node vm -Target '$dir/b.img' -Sync Full -TargetFormat Raw -BytesPerSecond 1MB
'remove: ' + (@(Remove-Module BitmapBackup 3>&1) -join ' | ')
Import-Module `$m
'after: ' + (Get-BlockNode).Name + ' ' + `$job.Status
`$job | Stop-Job
Close-BlockNode -Node vm
"@
        $r.ExitCode | Should -Be 0 -Because "the script ran: $($r.Output) $($r.Errors)"
        $lines = $r.Output -split "`r?`n"
        $lines | Should -Contain "remove: Node 'vm' stays open after the module's removal: Node 'vm' cannot be closed while a backup of it is running; stop the job (Stop-Job) or wait for it."
        $lines | Should -Contain 'after: vm Running'
    }
}
