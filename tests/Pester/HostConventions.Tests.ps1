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

Describe 'Binding, naming and help conventions' {
    BeforeAll {
        Close-TestNode
    }
    AfterEach {
        Get-Job | Where-Object PSJobTypeName -eq 'BitmapBackupJob' | Remove-Job -Force
        Close-TestNode
    }

    It 'Get-DirtyBitmap takes the node at position 0 and the bitmap name at position 1, as the other bitmap cmdlets' {
        $node = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name daily
        $null = New-DirtyBitmap -Node $node.Name -Name weekly
        (Get-DirtyBitmap $node.Name).Name | Should -Be @('daily', 'weekly')
        (Get-DirtyBitmap $node.Name week*).Name | Should -Be 'weekly'
        (Get-Command Get-DirtyBitmap).Parameters['Node'].ParameterSets['Node'].Position | Should -Be 0
    }

    It 'Get-BlockNode a | Clear-DirtyBitmap does not take the node''s name for a bitmap''s: BitmapNameRequired, nothing cleared' {
        $node = New-TestNode -Name (New-TestName 'n')
        $null = New-DirtyBitmap -Node $node.Name -Name $node.Name   # a bitmap named like its node: the wrong binding would clear it
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 64KB -Confirm:$false
        $record = { Get-BlockNode -Name $node.Name | Clear-DirtyBitmap -Confirm:$false -ErrorAction Stop } | Should -Throw -PassThru
        $record.FullyQualifiedErrorId | Should -BeExactly 'BitmapNameRequired,BitmapBackup.ClearDirtyBitmapCommand'
        $record.Exception.Message | Should -BeLike "*-Name*"
        (Get-DirtyBitmap -Node $node.Name -Name $node.Name).Count | Should -Be 65536
        Get-BlockNode -Name $node.Name | Clear-DirtyBitmap -Name $node.Name -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name $node.Name).Count | Should -Be 0
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 64KB -Confirm:$false
        Get-DirtyBitmap -Node $node.Name | Clear-DirtyBitmap -Confirm:$false   # bitmap objects bind node and name
        (Get-DirtyBitmap -Node $node.Name -Name $node.Name).Count | Should -Be 0
    }

    It 'Start-IncrementalBackup -Wait | Get-BlockImage finds the target (alias Target)' {
        $node = New-TestNode -Size 1MB
        $target = Join-Path (New-TestDirectory) 'full.qcow2'
        $info = Start-IncrementalBackup -Node $node.Name -Target $target -Sync Full -Wait | Get-BlockImage
        $info.Path | Should -Be $target
        (Get-Command Get-BlockImage).Parameters.Values.Aliases | Should -Contain 'Target'
    }

    It '<Verb>-IncrementalBackup takes -Name (wildcards) and -Id of this runspace''s backup jobs; an unknown one is JobNotFound' -ForEach @(
        @{ Verb = 'Suspend' }, @{ Verb = 'Resume' }, @{ Verb = 'Complete' }
    ) {
        $node = New-TestNode -Size 4MB
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 3 -Length 4MB -Confirm:$false
        $dir = New-TestDirectory
        $name = New-TestName 'job'
        $options = if ($Verb -eq 'Complete') { @{ Sync = 'None' } } else { @{ Sync = 'Full'; BytesPerSecond = 64KB } }
        $job = Start-IncrementalBackup -Node $node.Name -Target (Join-Path $dir 'b.qcow2') -JobName $name @options
        switch ($Verb) {
            'Suspend' {
                (Suspend-IncrementalBackup -Name $name -PassThru -Confirm:$false).InstanceId | Should -Be $job.InstanceId
                $job.JobStateInfo.State | Should -Be 'Suspended'
            }
            'Resume' {
                Suspend-IncrementalBackup -Id $job.Id -Confirm:$false
                $job.JobStateInfo.State | Should -Be 'Suspended'
                (Resume-IncrementalBackup ($name.Substring(0, 5) + '*') -PassThru -Confirm:$false).InstanceId | Should -Be $job.InstanceId
                $job.JobStateInfo.State | Should -Be 'Running'
            }
            'Complete' {
                Complete-IncrementalBackup -Id $job.Id -Wait -Confirm:$false
                $job.JobStateInfo.State | Should -Be 'Completed'
            }
        }
        $command = "$Verb-IncrementalBackup"
        $cmdlet = "BitmapBackup.$($Verb)IncrementalBackupCommand"
        { & $command -Name 'nosuchjob' -Confirm:$false -ErrorAction Stop } | Should -Throw -ErrorId "JobNotFound,$cmdlet"
        { & $command -Id 987654 -Confirm:$false -ErrorAction Stop } | Should -Throw -ErrorId "JobNotFound,$cmdlet"
        @(& $command -Name 'nosuch*' -Confirm:$false -PassThru).Count | Should -Be 0 -Because 'a pattern that matches nothing is no error, as Get-Job'
    }

    It 'Test-IncrementalBackup -Quiet writes only $true or $false' {
        $node = New-TestNode -Size 1MB
        $dir = New-TestDirectory
        $target = Join-Path $dir 'full.qcow2'
        $null = Start-IncrementalBackup -Node $node.Name -Target $target -Sync Full -Wait
        $ok = @(Test-IncrementalBackup -Path $target -Node $node.Name -Quiet)
        $ok.Count | Should -Be 1
        $ok[0] | Should -BeOfType [bool]
        $ok[0] | Should -BeTrue
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 9 -Length 512 -Confirm:$false
        Test-IncrementalBackup -Path $target -Node $node.Name -Quiet | Should -BeFalse
        $missing = @(Test-IncrementalBackup -Path (Join-Path $dir 'none.qcow2') -Node $node.Name -Quiet -ErrorVariable errors)
        $missing | Should -Be @($false)
        $errors | Should -BeNullOrEmpty
    }

    It 'format views at 80 columns keep the identifying column and whole node names of 31 characters' {
        $name = 'n' + ('x' * 29) + 'z'
        $name.Length | Should -Be 31
        $dir = New-TestDirectory
        $image = Join-Path $dir 'a.qcow2'
        $null = New-BlockImage -Path $image -Size 1MB
        $null = Open-BlockNode -Path $image -Name $name
        $null = New-DirtyBitmap -Node $name -Name daily
        Write-BlockNode -Node $name -Offset 0 -Pattern 1 -Length 512 -Confirm:$false
        $node = Get-BlockNode -Name $name | Out-String -Width 80
        $node | Should -Match "\b$name\b"
        $node | Should -Match '\bPath\b'
        (Get-DirtyBitmap -Node $name | Out-String -Width 80) | Should -Match "\b$name\s+daily\b"
        (Get-DirtyBitmapRange -Node $name -Name daily | Out-String -Width 80) | Should -Match "\b$name\s+daily\s+0\s+65536\b"
        $result = Start-IncrementalBackup -Node $name -Target (Join-Path $dir 'f.qcow2') -Sync Full -Wait | Out-String -Width 80
        $result | Should -Match "\b$name\b"
        $result | Should -Match '\bTarget\b'
        $result | Should -Match 'f\.qcow2|…'
        $image = Get-BlockImage -Path (Join-Path $dir 'f.qcow2') | Out-String -Width 80
        $image | Should -Match '\bPath\b'
        foreach ($text in $node, $result, $image) {
            ($text -split "`n" | Measure-Object -Property Length -Maximum).Maximum | Should -BeLessOrEqual 80
        }
    }

    It 'Get-Help about_BitmapBackup is found; the job cmdlets'' online help is not about_Jobs' {
        $about = Get-Help about_BitmapBackup | Out-String
        $about | Should -Match 'Complete-IncrementalBackup'
        $about | Should -Match 'Blocked'
        foreach ($c in 'Start-IncrementalBackup', 'Suspend-IncrementalBackup', 'Resume-IncrementalBackup', 'Complete-IncrementalBackup', 'Restore-IncrementalBackup') {
            "$((Get-Command $c).HelpUri)" | Should -Not -Match 'about_jobs' -Because "$c's online help is its own"
        }
        (Get-Help Start-IncrementalBackup).relatedLinks.navigationLink.linkText | Should -Contain 'about_Jobs'
    }

    It 'an image open as a node in this session is named as such, not as "another process"' {
        $dir = New-TestDirectory
        $image = Join-Path $dir 'a.qcow2'
        $null = New-BlockImage -Path $image -Size 1MB
        $name = New-TestName 'n'
        $null = Open-BlockNode -Path $image -Name $name
        $record = Assert-BlockError { Get-BackupChain -Path $image -ErrorAction Stop } -ErrorId 'ImageInUse,BitmapBackup.GetBackupChainCommand' -MessageContains "node '$name'", 'in this session'
        $record.Exception.Message | Should -Not -Match 'another process'
        Close-TestNode
        @(Get-BackupChain -Path $image).Count | Should -Be 1
    }

    It 'a folder is "a folder, not an image" also as -BackingFile' {
        $dir = New-TestDirectory
        $null = New-Item -ItemType Directory -Path (Join-Path $dir 'base.qcow2')
        $null = Assert-BlockError { New-BlockImage -Path (Join-Path $dir 'top.qcow2') -BackingFile 'base.qcow2' -ErrorAction Stop } -ErrorId 'ImageIsFolder,BitmapBackup.NewBlockImageCommand' `
            -MessageContains 'is a folder', 'not an image'
        Test-Path -LiteralPath (Join-Path $dir 'top.qcow2') | Should -BeFalse
        $null = Assert-BlockError { Get-BlockImage -Path (Join-Path $dir 'base.qcow2') -ErrorAction Stop } -ErrorId 'ImageIsFolder,BitmapBackup.GetBlockImageCommand' -MessageContains 'is a folder, not an image'
    }
}

Describe 'Provider paths' {
    BeforeAll {
        Close-TestNode
    }
    AfterEach {
        Close-TestNode
    }

    It 'New-BlockImage <Path> is refused with ReadWriteFileNotFileSystemProvider and writes nothing to the process''s folder' -ForEach @(
        @{ Path = 'Env:/bbx.raw' }, @{ Path = 'Alias:/bbx.raw' }, @{ Path = 'Variable:/bbx.raw' }
    ) {
        $before = @(Get-ChildItem -LiteralPath ([Environment]::CurrentDirectory) -Filter 'bbx.raw*')
        $null = Assert-BlockError { New-BlockImage -Path $Path -Size 1MB -ErrorAction Stop } -ErrorId 'ReadWriteFileNotFileSystemProvider,BitmapBackup.NewBlockImageCommand' -Category InvalidArgument
        @(Get-ChildItem -LiteralPath ([Environment]::CurrentDirectory) -Filter 'bbx.raw*').Count | Should -Be $before.Count
        Test-Path -LiteralPath (Join-Path ([Environment]::CurrentDirectory) 'bbx.raw') | Should -BeFalse
    }

    It 'a relative path while the location is on Env: is refused too, for new images and backup targets' {
        $node = New-TestNode
        Push-Location Env:
        try {
            $null = Assert-BlockError { New-BlockImage -Path 'bby.raw' -Size 1MB -ErrorAction Stop } -ErrorId 'ReadWriteFileNotFileSystemProvider,BitmapBackup.NewBlockImageCommand'
            $null = Assert-BlockError { Start-IncrementalBackup -Node $node.Name -Target 'bby.qcow2' -Sync Full -Wait } -ErrorId 'ReadWriteFileNotFileSystemProvider,BitmapBackup.StartIncrementalBackupCommand'
        }
        finally {
            Pop-Location
        }
        Test-Path -LiteralPath (Join-Path ([Environment]::CurrentDirectory) 'bby.raw') | Should -BeFalse
        Test-Path -LiteralPath (Join-Path ([Environment]::CurrentDirectory) 'bby.qcow2.partial') | Should -BeFalse
    }

    It '-BackingFile <Kind> is resolved as a PowerShell path and stored as the absolute path qemu-img reads' -ForEach @(
        @{ Kind = 'on a drive (BB:/base.qcow2)' }, @{ Kind = 'under ~ (~/base.qcow2)' }
    ) {
        $baseDir = New-TestDirectory
        $base = Join-Path $baseDir 'base.qcow2'
        $null = New-BlockImage -Path $base -Size 1MB
        $topDir = New-TestDirectory
        $fileSystem = Get-PSProvider FileSystem
        $home0 = $fileSystem.Home
        $null = New-PSDrive -Name BB -PSProvider FileSystem -Root $baseDir
        try {
            $fileSystem.Home = $baseDir
            $name = if ($Kind -like '*~*') { '~/base.qcow2' } else { 'BB:/base.qcow2' }
            $top = New-BlockImage -Path (Join-Path $topDir 'top.qcow2') -BackingFile $name
            $top.BackingFile | Should -Be $base
            $node = Open-BlockNode -Path (Join-Path $topDir 'node.raw' | ForEach-Object { $null = New-BlockImage -Path $_ -Size 1MB; $_ })
            $r = Start-IncrementalBackup -Node $node.Name -Target (Join-Path $topDir 'inc.qcow2') -Sync Top -BackingFile $name -Wait
            $r.Succeeded | Should -BeTrue
            (Get-BlockImage -Path (Join-Path $topDir 'inc.qcow2')).BackingFile | Should -Be $base
        }
        finally {
            $fileSystem.Home = $home0
            Remove-PSDrive -Name BB
        }
        if (Get-Command qemu-img -ErrorAction SilentlyContinue) {
            (& qemu-img info --output=json (Join-Path $topDir 'top.qcow2') | ConvertFrom-Json).'full-backing-filename' | Should -Be $base
        }
    }

    It 'a bare relative -BackingFile stays relative to the new image''s folder, as qemu-img stores it' {
        $dir = New-TestDirectory
        $null = New-BlockImage -Path (Join-Path $dir 'base.qcow2') -Size 1MB
        $sub = Join-Path $dir 'sub'
        $null = New-Item -ItemType Directory -Path $sub
        (New-BlockImage -Path (Join-Path $sub 'top.qcow2') -BackingFile '../base.qcow2').BackingFile | Should -Be '../base.qcow2'
    }

    It 'Get-BlockImage a, nodrive:/x, b reports the bad drive and goes on' {
        $dir = New-TestDirectory
        $a = (New-BlockImage -Path (Join-Path $dir 'a.qcow2') -Size 1MB).Path
        $b = (New-BlockImage -Path (Join-Path $dir 'b.qcow2') -Size 1MB).Path
        $out = @(Get-BlockImage -Path $a, 'nodrive:/x.qcow2', 'Env:/x', $b -ErrorVariable errors -ErrorAction SilentlyContinue)
        $out.Path | Should -Be @($a, $b)
        @($errors.FullyQualifiedErrorId) | Should -Be @('DriveNotFound,BitmapBackup.GetBlockImageCommand', 'ReadWriteFileNotFileSystemProvider,BitmapBackup.GetBlockImageCommand')
    }

    It '-Path takes wildcards, -LiteralPath takes names as they are, and Get-ChildItem output binds (PSPath)' {
        $dir = New-TestDirectory
        $a = (New-BlockImage -Path (Join-Path $dir 'a.qcow2') -Size 1MB).Path
        $b = (New-BlockImage -Path (Join-Path $dir 'b.qcow2') -Size 1MB).Path
        $c = (New-BlockImage -Path (Join-Path $dir 'c[1].qcow2') -Size 1MB).Path   # a new file's name is never a pattern
        $c | Should -Be (Join-Path $dir 'c[1].qcow2')
        (Get-BlockImage -Path (Join-Path $dir '*.qcow2')).Path | Should -Be @($a, $b, $c)
        (Get-BlockImage -Path (Join-Path $dir '?.qcow2')).Path | Should -Be @($a, $b)
        @(Get-BlockImage -Path (Join-Path $dir 'none*.qcow2')).Count | Should -Be 0
        (Get-BlockImage -Path $c).Path | Should -Be $c -Because 'a name that exists as it is is taken as it is'
        (Get-BlockImage -LiteralPath $c).Path | Should -Be $c
        (Get-ChildItem -LiteralPath $dir -Filter *.qcow2 | Get-BlockImage).Path | Should -Be @($a, $b, $c)
        (Get-ChildItem -LiteralPath $dir -Filter 'c*.qcow2' | Get-BackupChain).Path | Should -Be $c
        $nodes = @(Get-ChildItem -LiteralPath $dir | Where-Object Name -in 'a.qcow2', 'b.qcow2' | Open-BlockNode -ReadOnly)
        $nodes.Path | Should -Be @($a, $b)
        Close-TestNode
        $nodes = @(Open-BlockNode -Path (Join-Path $dir '[ab].qcow2') -ReadOnly)
        $nodes.Path | Should -Be @($a, $b)
        Close-TestNode
        (Open-BlockNode -LiteralPath $c -ReadOnly).Path | Should -Be $c
    }

    It 'Restore-IncrementalBackup and Get-DirtyBitmap take -Path with wildcards and -LiteralPath; Restore needs exactly one match' {
        $dir = New-TestDirectory
        $a = (New-BlockImage -Path (Join-Path $dir 'a[1].qcow2') -Size 1MB).Path
        $null = New-BlockImage -Path (Join-Path $dir 'b.qcow2') -Size 1MB
        $node = Open-BlockNode -LiteralPath $a
        $null = New-DirtyBitmap -Node $node.Name -Name p -Persistent
        Close-TestNode
        (Get-DirtyBitmap -Path (Join-Path $dir '*.qcow2')).Path | Should -Be $a
        (Get-DirtyBitmap -LiteralPath $a).Name | Should -Be 'p'
        (Get-ChildItem -LiteralPath $dir -Filter '*.qcow2' | Get-DirtyBitmap).Name | Should -Be 'p'
        $r = Restore-IncrementalBackup -LiteralPath $a -Destination (Join-Path $dir 'r1.raw') -Wait
        $r.Succeeded | Should -BeTrue
        $r = Get-ChildItem -LiteralPath (Join-Path $dir 'b.qcow2') | Restore-IncrementalBackup -Destination (Join-Path $dir 'r2.raw') -Wait
        $r.Succeeded | Should -BeTrue
        $r = Restore-IncrementalBackup -Path (Join-Path $dir 'a*.qcow2') -Destination (Join-Path $dir 'r3.raw') -Wait
        $r.Succeeded | Should -BeTrue
        $null = Assert-BlockError { Restore-IncrementalBackup -Path (Join-Path $dir '*.qcow2') -Destination (Join-Path $dir 'r4.raw') -Wait } -ErrorId 'PathMatchesSeveralFiles,BitmapBackup.RestoreIncrementalBackupCommand'
        $null = Assert-BlockError { Restore-IncrementalBackup -Path (Join-Path $dir 'none*.qcow2') -Destination (Join-Path $dir 'r4.raw') -Wait } -ErrorId 'ImageNotFound,BitmapBackup.RestoreIncrementalBackupCommand'
        Test-Path -LiteralPath (Join-Path $dir 'r4.raw') | Should -BeFalse
    }

    It 'Test-IncrementalBackup takes -Path with wildcards and -LiteralPath, and BackupResult and Get-ChildItem output bind' {
        $node = New-TestNode -Size 1MB
        $dir = New-TestDirectory
        $full = Join-Path $dir 'f[1].qcow2'
        $r = Start-IncrementalBackup -Node $node.Name -Target $full -Sync Full -Wait
        $null = Start-IncrementalBackup -Node $node.Name -Target (Join-Path $dir 'g.qcow2') -Sync Full -Wait
        (Test-IncrementalBackup -LiteralPath $full -Node $node.Name).Passed | Should -BeTrue
        ($r | Test-IncrementalBackup -Node $node.Name).Path | Should -Be $full
        @(Test-IncrementalBackup -Path (Join-Path $dir '*.qcow2') -Node $node.Name -Quiet) | Should -Be @($true, $true)
        (Get-ChildItem -LiteralPath $dir -Filter 'g.qcow2' | Test-IncrementalBackup -ReferencePath $full).Passed | Should -BeTrue
    }
}
