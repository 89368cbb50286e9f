# Chain retention (issue 12, part 1): Merge-BackupChain -Keep / -Into. Every remaining image must read its own point in
# time (qemu-img compare with a raw snapshot of the node taken at each backup) and pass qemu-img check, at every step,
# after a Stop-Job, and after kill -9 of a child pwsh at every named instant of the merge and at random instants.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    function Assert-ChainSound {
        <#
        The chain of the top opens, every image of it passes qemu-img check, the top reads its point in time, and every
        backup of the original chain that still exists reads its own point in time (a crash may leave older images
        beside the merged chain: they must still be a valid chain). Returns the chain's paths.
        #>
        param([Parameter(Mandatory)] $Chain, [string] $Because = '')
        $paths = @(Get-BackupChain -Path $Chain.Top -ErrorAction Stop | ForEach-Object Path)
        foreach ($p in $paths) { $null = Assert-QemuImageCheck -Path $p }
        for ($i = 0; $i -lt $Chain.Images.Count; $i++) {
            if (Test-Path $Chain.Images[$i]) {
                $r = Compare-QemuImage -Path $Chain.Images[$i] -Reference $Chain.References[$i]
                $r.ExitCode | Should -Be 0 -Because "b$i must read its own point in time $Because ($($r.Output))"
            }
        }
        return $paths
    }

    function Get-Leftover([string] $Dir) {
        <# Files a merge must not leave behind once it has completed. #>
        @(Get-ChildItem -Path $Dir -File | Where-Object Name -match '\.(merging|partial|merge-journal|merge-journal\.tmp|digests\.tmp)$' | ForEach-Object Name)
    }

    function Start-ChildPwsh {
        <# A fresh pwsh (pwsh.dll itself, so that kill -9 kills PowerShell) running a script file that imports the module. #>
        param([Parameter(Mandatory)] [string] $Script)
        $file = Join-Path (New-TestDirectory) 'child.ps1'
        Set-Content -Path $file -Value "`$ErrorActionPreference = 'Stop'; Import-Module '$(Get-BitmapBackupModulePath)'`n$Script"
        return Start-Process -FilePath dotnet -ArgumentList @((Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-File', $file) -PassThru
    }

    function Wait-ForFile([string] $Path, $Child, [int] $TimeoutSeconds = 60) {
        $deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
        while (-not (Test-Path $Path)) {
            if ($Child.HasExited) { throw "the child pwsh exited ($($Child.ExitCode)) before writing '$Path'" }
            if ([DateTime]::UtcNow -gt $deadline) { throw "the child pwsh did not write '$Path' within $TimeoutSeconds s" }
            Start-Sleep -Milliseconds 20
        }
    }

    function Stop-ChildHard($Child) { & kill -9 $Child.Id 2>$null; $Child.WaitForExit() }
}

Describe 'Merge-BackupChain -Keep' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'keeps the newest <Keep> of 6 images; each remaining one reads its own point in time and passes qemu-img check' -ForEach @(
        @{ Keep = 1 }, @{ Keep = 2 }, @{ Keep = 3 }, @{ Keep = 4 }, @{ Keep = 5 }
    ) {
        $chain = New-TestBackupChain -Dir (New-TestDirectory)
        $r = Merge-BackupChain -Path $chain.Top -Keep $Keep -Wait -Confirm:$false
        $k = 6 - $Keep
        $r.Succeeded | Should -BeTrue
        $r.ImagesBefore | Should -Be 6
        $r.ImagesAfter | Should -Be $Keep
        $r.MergedImage | Should -Be $chain.Images[$k]
        $r.Chain | Should -Be @($chain.Images[$k..5])
        $r.BytesCopied | Should -Be $r.BytesTotal
        $r.BytesCopied | Should -BeGreaterThan 0
        $expectedRemoved = @(for ($j = $k - 1; $j -ge 0; $j--) { "$($chain.Images[$j]).digests"; $chain.Images[$j] })
        $r.Removed | Should -Be $expectedRemoved
        foreach ($j in 0..($k - 1)) { Test-Path $chain.Images[$j] | Should -BeFalse; Test-Path "$($chain.Images[$j]).digests" | Should -BeFalse }

        $paths = @(Assert-ChainSound -Chain $chain)
        $paths | Should -Be @($chain.Images[$k..5])
        # the merged image stands alone now, and the next image still names it as its backing file
        (Get-BackupChain -Path $chain.Images[$k])[0].BackingFile | Should -BeNullOrEmpty
        if ($k -lt 5) { (Get-BackupChain -Path $chain.Images[$k + 1])[-1].BackingFile | Should -Be "b$k.qcow2" }
        # every manifest that stays still describes its backup
        foreach ($j in $k..5) {
            (Test-IncrementalBackup -Path $chain.Images[$j] -Manifest "$($chain.Images[$j]).digests").Passed | Should -BeTrue -Because "the manifest of b$j follows the merge"
        }
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty
    }

    It 'merges at every step of a 6-image chain (Keep 5, 4, 3, 2, 1): qemu-img compare equal and check clean after each' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Seed 99
        foreach ($keep in 5, 4, 3, 2, 1) {
            $r = Merge-BackupChain -Path $chain.Top -Keep $keep -Wait -Confirm:$false
            $r.ImagesAfter | Should -Be $keep
            $paths = @(Assert-ChainSound -Chain $chain -Because "after -Keep $keep")
            $paths.Count | Should -Be $keep
            Assert-QemuImageEqual -Path $chain.Top -Reference $chain.References[5]
        }
        $r = Merge-BackupChain -Path $chain.Top -Keep 1 -Wait -Confirm:$false
        $r.ImagesAfter | Should -Be 1
        $r.MergedImage | Should -BeNullOrEmpty -Because 'a chain of one image has nothing to merge'
        (Test-IncrementalBackup -Path $chain.Top -Manifest "$($chain.Top).digests").Passed | Should -BeTrue
    }

    It 'leaves a chain with no more images than -Keep as it is' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        $before = Get-ChildItem $chain.Dir | ForEach-Object { '{0} {1}' -f $_.Name, (Get-FileHash $_.FullName).Hash }
        $r = Merge-BackupChain -Path $chain.Top -Keep 3 -Wait -Confirm:$false
        $r.ImagesBefore | Should -Be 3
        $r.ImagesAfter | Should -Be 3
        $r.MergedImage | Should -BeNullOrEmpty
        $r.Removed | Should -BeNullOrEmpty
        $r.BytesTotal | Should -Be 0
        Merge-BackupChain -Path $chain.Top -Keep 10 -Wait -Confirm:$false | ForEach-Object ImagesAfter | Should -Be 3
        Get-ChildItem $chain.Dir | ForEach-Object { '{0} {1}' -f $_.Name, (Get-FileHash $_.FullName).Hash } | Should -Be $before
    }

    It 'gives the merged image the permissions of the image it replaces' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        & chmod 640 $chain.Images[1]
        $null = Merge-BackupChain -Path $chain.Top -Keep 2 -Wait -Confirm:$false
        (Get-Item $chain.Images[1]).UnixMode | Should -Be '-rw-r-----'
    }

    It 'takes a wildcard -Path that matches the top alone; one that matches several images is PathMatchesSeveralFiles, nothing merged' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        Assert-BlockError { Merge-BackupChain -Path (Join-Path $chain.Dir 'b*.qcow2') -Keep 2 -Wait -Confirm:$false -ErrorAction Stop } -ErrorId 'PathMatchesSeveralFiles,BitmapBackup.MergeBackupChainCommand'
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 3
        $pattern = Join-Path $chain.Dir ((Split-Path -Leaf $chain.Top) -replace '\.qcow2$', '.qcow?')
        $r = Merge-BackupChain -Path $pattern -Keep 2 -Wait -Confirm:$false
        $r.Path | Should -Be $chain.Top
        $r.ImagesAfter | Should -Be 2
    }

    It 'takes the top from the pipeline (a backup''s result) and -WhatIf changes nothing' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        Merge-BackupChain -Path $chain.Top -Keep 1 -WhatIf
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 3
        $r = [pscustomobject]@{ Target = $chain.Top } | Merge-BackupChain -Keep 2 -Wait -Confirm:$false
        $r.ImagesAfter | Should -Be 2
        $null = Assert-ChainSound -Chain $chain
    }

    It 'takes a top whose name has wildcard characters with -LiteralPath, and from Get-Item (PSPath binds there)' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 4
        $literal = Join-Path $chain.Dir 'top[1].qcow2'
        Move-Item -LiteralPath $chain.Top -Destination $literal
        if (Test-Path -LiteralPath "$($chain.Top).digests") { Move-Item -LiteralPath "$($chain.Top).digests" -Destination "$literal.digests" }
        $r = Get-Item -LiteralPath $literal | Merge-BackupChain -Keep 3 -Wait -Confirm:$false
        $r.Path | Should -Be $literal
        $r.ImagesAfter | Should -Be 3
        $r = Merge-BackupChain -LiteralPath $literal -Keep 2 -Wait -Confirm:$false
        $r.ImagesAfter | Should -Be 2
        @(Get-BackupChain -LiteralPath $literal).Count | Should -Be 2
        (Invoke-QemuImg check $literal).ExitCode | Should -Be 0
    }
}

Describe 'Merge-BackupChain -Into' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'writes a synthetic full that reads like the top, leaves the chain alone, copies the manifest, and takes incrementals on top' {
        $dir = New-TestDirectory
        $chain = New-TestBackupChain -Dir $dir -Count 4
        $before = Get-ChildItem $dir | ForEach-Object { '{0} {1}' -f $_.Name, (Get-FileHash $_.FullName).Hash }
        $into = Join-Path $dir 'synthetic.qcow2'
        $r = Merge-BackupChain -Path $chain.Top -Into $into -Wait -Confirm:$false
        $r.Succeeded | Should -BeTrue
        $r.Into | Should -Be $into
        $r.MergedImage | Should -Be $into
        $r.ImagesAfter | Should -Be 4
        $r.Removed | Should -BeNullOrEmpty
        Get-ChildItem $dir | Where-Object Name -notlike 'synthetic*' | ForEach-Object { '{0} {1}' -f $_.Name, (Get-FileHash $_.FullName).Hash } | Should -Be $before
        $null = Assert-QemuImageCheck -Path $into
        Assert-QemuImageEqual -Path $into -Reference $chain.References[3]
        ((Invoke-QemuImg info --output=json $into).Output | ConvertFrom-Json).PSObject.Properties.Name | Should -Not -Contain 'backing-filename'
        (Test-IncrementalBackup -Path $into -Manifest "$into.digests").Passed | Should -BeTrue
        Get-Leftover $dir | Should -BeNullOrEmpty

        # -Into needs a new file
        Assert-BlockError { Merge-BackupChain -Path $chain.Top -Into $into -Wait -Confirm:$false } -ErrorId 'ImageAlreadyExists,BitmapBackup.MergeBackupChainCommand'
    }

    It 'flattens a chain of one raw image into qcow2' {
        $dir = New-TestDirectory
        $raw = New-TestImage -Directory $dir -Size 2MB
        $node = Open-BlockNode -Path $raw
        Write-BlockNode -Node $node.Name -Offset 300KB -Pattern 9 -Length 100KB -Confirm:$false
        Close-BlockNode -Node $node.Name
        $into = Join-Path $dir 'flat.qcow2'
        $null = Merge-BackupChain -Path $raw -Into $into -Wait -Confirm:$false
        $null = Assert-QemuImageCheck -Path $into
        Assert-QemuImageEqual -Path $into -Reference $raw
    }
}

Describe 'Merge-BackupChain as a job' -Skip:$NoQemu {
    AfterEach { Close-TestNode; Get-Job | Where-Object PSJobTypeName -eq 'BitmapBackupMergeJob' | Remove-Job -Force }

    It 'returns a job with progress that Wait-Job and Receive-Job finish' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Size 16MB -FirstData 12MB
        $job = Merge-BackupChain -Path $chain.Top -Keep 2 -BytesPerSecond 16MB -JobName ret-job -Confirm:$false
        $job | Should -BeOfType ([BitmapBackup.MergePSJob])
        $job.PSJobTypeName | Should -Be 'BitmapBackupMergeJob'
        (Get-Job -Name ret-job).Id | Should -Be $job.Id
        $null = $job | Wait-Job -Timeout 60
        $job.State | Should -Be 'Completed'
        # the progress records (Receive-Job would take them)
        @($job.Progress).Count | Should -BeGreaterThan 1
        $job.Progress[-1].RecordType | Should -Be 'Completed'
        $job.Progress[-1].PercentComplete | Should -Be 100
        @($job.Progress | Where-Object { $_.StatusDescription -like 'Copying:*' }).Count | Should -BeGreaterThan 0
        $result = $job | Receive-Job
        $result.ImagesAfter | Should -Be 2
        $job | Remove-Job
        $null = Assert-ChainSound -Chain $chain
    }

    It 'Stop-Job while it copies leaves the chain as it was, without the merged image' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Size 32MB -FirstData 24MB
        $job = Merge-BackupChain -Path $chain.Top -Keep 3 -BytesPerSecond 4MB -Confirm:$false
        $deadline = [DateTime]::UtcNow.AddSeconds(30)
        while ($job.BytesCopied -eq 0 -and [DateTime]::UtcNow -lt $deadline) { Start-Sleep -Milliseconds 20 }
        $job.Status | Should -Be 'Copying'
        Test-Path "$($chain.Images[3]).merging" | Should -BeTrue
        $job | Stop-Job
        $job.State | Should -Be 'Stopped'
        $result = $job | Receive-Job
        $result.Succeeded | Should -BeFalse
        $result.ErrorId | Should -Be 'MergeCancelled'
        $result.ImagesAfter | Should -Be 6
        @(Assert-ChainSound -Chain $chain).Count | Should -Be 6
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty
    }
}

Describe 'Merge-BackupChain refusals' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'InvalidKeepCount: -Keep <Keep>' -ForEach @(@{ Keep = 0 }, @{ Keep = -3 }) {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 2
        Assert-BlockError { Merge-BackupChain -Path $chain.Top -Keep $Keep -Wait -Confirm:$false } -ErrorId 'InvalidKeepCount,BitmapBackup.MergeBackupChainCommand' -MessageContains "-Keep $Keep" -Category InvalidArgument
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 2
    }

    It 'ImageInUse: an image of the chain is open as a writable node (the message names it)' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 4
        $node = Open-BlockNode -Path $chain.Images[1] -Name (New-TestName 'w')
        $e = Assert-BlockError { Merge-BackupChain -Path $chain.Top -Keep 2 -Wait -Confirm:$false } -ErrorId 'ImageInUse,BitmapBackup.MergeBackupChainCommand' -MessageContains "'$($node.Name)'" -Category ResourceBusy
        $e.TargetObject | Should -Be $chain.Images[1]
        Close-BlockNode -Node $node.Name
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 4
        # a read-only node shares the chain: the merge goes on, and the node still reads its (unchanged) point in time
        $ro = Open-BlockNode -Path $chain.Images[1] -ReadOnly
        $null = Merge-BackupChain -Path $chain.Top -Keep 2 -Wait -Confirm:$false
        (Test-IncrementalBackup -Path $chain.Top -ReferencePath $chain.References[3]).Passed | Should -BeTrue
        Close-BlockNode -Node $ro.Name
    }

    It 'ImageInUse: another process (qemu-io) holds an image of the chain for writing' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        $qemu = Start-QemuIoHolder $chain.Images[2]
        try {
            Assert-BlockError { Merge-BackupChain -Path $chain.Top -Keep 1 -Wait -Confirm:$false } -ErrorId 'ImageInUse,BitmapBackup.MergeBackupChainCommand' -MessageContains 'Failed to get'
        }
        finally { Stop-QemuIoHolder $qemu }
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 3
    }

    It 'BackupChainBroken: an image of the chain is missing' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 4
        Remove-Item $chain.Images[1]
        Assert-BlockError { Merge-BackupChain -Path $chain.Top -Keep 1 -Wait -Confirm:$false } -ErrorId 'BackupChainBroken,BitmapBackup.MergeBackupChainCommand' -MessageContains 'b1.qcow2' -Category InvalidData
        Test-Path $chain.Images[0] | Should -BeTrue
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty
    }

    It 'BackupChainBroken: qemu-img check would find an image of the chain corrupt' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        # give the header cluster of b1 refcount 0: the image still opens, but qemu-img check reports a corruption
        (Get-QemuImageCheck -Path $chain.Images[1]).ExitCode | Should -Be 0
        $bytes = Get-FileBytes -Path $chain.Images[1] -Offset 48 -Length 8
        [Array]::Reverse($bytes)
        $table = [BitConverter]::ToInt64($bytes, 0)
        $bytes = Get-FileBytes -Path $chain.Images[1] -Offset $table -Length 8
        [Array]::Reverse($bytes)
        $block = [BitConverter]::ToInt64($bytes, 0)
        $fs = [IO.File]::Open($chain.Images[1], 'Open', 'ReadWrite')
        try { $fs.Position = $block; $fs.Write([byte[]](0, 0), 0, 2) }
        finally { $fs.Dispose() }
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 3 -Because 'the damage does not stop the chain from opening'
        (Get-QemuImageCheck -Path $chain.Images[1]).ExitCode | Should -Not -Be 0
        Assert-BlockError { Merge-BackupChain -Path $chain.Top -Keep 1 -Wait -Confirm:$false } -ErrorId 'BackupChainBroken,BitmapBackup.MergeBackupChainCommand' -MessageContains 'b1.qcow2', 'corrupt'
        Test-Path $chain.Images[0] | Should -BeTrue
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty
    }

    It 'BackupChainShared: an image to delete is the backing file of another chain in its folder' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 4
        $other = Join-Path $chain.Dir 'other.qcow2'
        $null = New-BlockImage -Path $other -Size 4MB -BackingFile 'b0.qcow2' -Confirm:$false
        Assert-BlockError { Merge-BackupChain -Path $chain.Top -Keep 2 -Wait -Confirm:$false } -ErrorId 'BackupChainShared,BitmapBackup.MergeBackupChainCommand' -MessageContains 'other.qcow2'
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 4
        # an image that depends on a kept image does not stop the merge
        Remove-Item $other
        $null = New-BlockImage -Path $other -Size 4MB -BackingFile 'b2.qcow2' -Confirm:$false
        $null = Merge-BackupChain -Path $chain.Top -Keep 2 -Wait -Confirm:$false
        Assert-QemuImageEqual -Path $other -Reference $chain.References[2]
    }

    It 'ImageNotFound: the top does not exist' {
        Assert-BlockError { Merge-BackupChain -Path (Join-Path (New-TestDirectory) 'none.qcow2') -Keep 1 -Wait -Confirm:$false } -ErrorId 'ImageNotFound,BitmapBackup.MergeBackupChainCommand'
    }
}

Describe 'Merge-BackupChain after kill -9' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'a kill at <Point> leaves a restorable chain (<Expected> images), and the next merge finishes or drops what it left' -ForEach @(
        @{ Point = 'merge:copying'; Expected = 6 },
        @{ Point = 'merge:copied'; Expected = 6 },
        @{ Point = 'merge:journaled'; Expected = 6 },
        @{ Point = 'merge:switched'; Expected = 3 },
        @{ Point = 'merge:deleted'; Expected = 3 },
        @{ Point = 'merge:cleaned'; Expected = 3 }
    ) {
        $chain = New-TestBackupChain -Dir (New-TestDirectory)
        $marker = Join-Path $chain.Dir 'reached'
        $child = Start-ChildPwsh @"
[BitmapBackup.Core.Testing.CrashPoints]::PauseAt('$Point', '$marker')
`$null = Merge-BackupChain -Path '$($chain.Top)' -Keep 3 -Wait -Confirm:`$false
"@
        try { Wait-ForFile -Path $marker -Child $child }
        finally { Stop-ChildHard $child }
        Remove-Item $marker
        $paths = @(Assert-ChainSound -Chain $chain -Because "after a kill at $Point")
        $paths.Count | Should -Be $Expected
        foreach ($p in $paths) {
            if (Test-Path "$p.digests") { (Test-IncrementalBackup -Path $p -Manifest "$p.digests").Passed | Should -BeTrue -Because "$p keeps a valid manifest after a kill at $Point" }
        }

        $r = Merge-BackupChain -Path $chain.Top -Keep 3 -Wait -Confirm:$false
        $r.ImagesAfter | Should -Be 3
        @(Assert-ChainSound -Chain $chain) | Should -Be @($chain.Images[3..5])
        foreach ($j in 0..2) { Test-Path $chain.Images[$j] | Should -BeFalse; Test-Path "$($chain.Images[$j]).digests" | Should -BeFalse }
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty
    }

    It 'a kill at a random instant of a slow merge leaves a restorable chain (run <Run>)' -ForEach @(@{ Run = 1 }, @{ Run = 2 }, @{ Run = 3 }) {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Size 16MB -FirstData 12MB -Seed (40 + $Run)
        $started = Join-Path $chain.Dir 'started'
        $child = Start-ChildPwsh @"
Set-Content -Path '$started' -Value go
`$null = Merge-BackupChain -Path '$($chain.Top)' -Keep 2 -BytesPerSecond 8MB -Wait -Confirm:`$false
Set-Content -Path '$started.done' -Value done
Start-Sleep -Seconds 60
"@
        $delay = Get-Random -Minimum 300 -Maximum 2600
        try {
            Wait-ForFile -Path $started -Child $child
            Start-Sleep -Milliseconds $delay
        }
        finally { Stop-ChildHard $child }
        $paths = @(Assert-ChainSound -Chain $chain -Because "after a kill $delay ms into the merge")
        $paths.Count | Should -BeIn @(6, 2) -Because "after a kill $delay ms into the merge (seed $(40 + $Run))"
        $null = Merge-BackupChain -Path $chain.Top -Keep 2 -Wait -Confirm:$false
        @(Assert-ChainSound -Chain $chain -Because "the merge after a kill $delay ms into the first") | Should -Be @($chain.Images[4..5]) -Because "the merge after a kill $delay ms into the first"
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty -Because "the merge after a kill $delay ms into the first leaves nothing behind"
    }

    It 'a merge running when PowerShell exits is stopped, and the chain is as it was' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Size 16MB -FirstData 12MB
        $script = "`$null = Merge-BackupChain -Path '$($chain.Top)' -Keep 2 -BytesPerSecond 2MB -Confirm:`$false; Start-Sleep -Milliseconds 500"
        $out = & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -Command "Import-Module '$(Get-BitmapBackupModulePath)'; $script" 2>&1 | ForEach-Object { "$_" }
        ($out -join "`n") | Should -BeLike "*Merge job 'merge*' of the chain of '$($chain.Top)' was stopped because PowerShell is exiting: the chain is as it was.*"
        @(Assert-ChainSound -Chain $chain).Count | Should -Be 6
        Get-Leftover $chain.Dir | Should -BeNullOrEmpty
    }
}

Describe 'Merge-BackupChain output' {
    It 'has a table view for BackupChainMergeResult' {
        $data = Get-FormatData -TypeName BitmapBackup.BackupChainMergeResult
        $data.FormatViewDefinition[0].Control | Should -BeOfType [System.Management.Automation.TableControl]
    }
}
