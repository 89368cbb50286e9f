# The runbook example (issue 12): examples/Invoke-NightlyBackup.ps1 run as a job runner would run it, in a fresh pwsh that
# imports the module by name, on two small qcow2 disks, night after night: one grouped transaction across the disks,
# retention, verification, exit code 0; exit code 1 and nothing backed up when a disk is held by another process; a
# bitmap left inconsistent by a crash rebuilt from the chain's manifest.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $script:Runbook = (Resolve-Path (Join-Path $PSScriptRoot '../../examples/Invoke-NightlyBackup.ps1')).ProviderPath

    function Invoke-Runbook {
        <# Run the runbook in a fresh pwsh (-File, as a job runner does) that finds the staged module by name. Returns ExitCode and Output lines. #>
        param([Parameter(Mandatory)] [string[]] $ArgumentList)
        $saved = $env:PSModulePath
        try {
            $env:PSModulePath = (Split-Path (Split-Path (Get-BitmapBackupModulePath))) + [IO.Path]::PathSeparator + $saved
            $out = & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -File $script:Runbook @ArgumentList 2>&1 | ForEach-Object { "$_" }
            return [pscustomobject]@{ ExitCode = $LASTEXITCODE; Output = @($out) }
        }
        finally { $env:PSModulePath = $saved }
    }

    function Write-Disk([string] $Path, [long] $Offset, [int] $Pattern, [long] $Length) {
        <# Change a disk between runs, as its machine would. #>
        $node = Open-BlockNode -Path $Path
        Write-BlockNode -Node $node.Name -Offset $Offset -Pattern $Pattern -Length $Length -Confirm:$false
        Close-BlockNode -Node $node.Name -WarningAction SilentlyContinue
    }

    function Get-Backup([string] $Folder) { @(Get-ChildItem -Path $Folder -Filter '*.qcow2' -File | Sort-Object Name | ForEach-Object FullName) }
}

Describe 'The nightly backup runbook (examples/Invoke-NightlyBackup.ps1)' -Skip:$NoQemu {
    BeforeEach {
        $dir = New-TestDirectory
        $root = Join-Path $dir 'backup'
        $os = Join-Path $dir 'web-os.qcow2'
        $data = Join-Path $dir 'web-data.qcow2'
        foreach ($d in $os, $data) { $null = New-BlockImage -Path $d -Size 4MB -Confirm:$false }
        Write-Disk $os 0 0x11 1MB
        Write-Disk $data 1MB 0x22 512KB
    }
    AfterEach { Close-TestNode }

    It 'backs up both disks at one instant, keeps -Keep backups per disk, verifies every chain, exits 0 (three nights)' {
        $transcript = Join-Path $dir 'runbook.log'
        $reports = Join-Path $dir 'reports'
        $r = Invoke-Runbook @('-Disk', "$os,$data", '-BackupRoot', $root, '-Keep', '2', '-TranscriptPath', $transcript, '-ReportFolder', $reports)
        $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
        $r.Output | ForEach-Object { $_ | Should -Match '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ' -Because 'every line is a time-stamped log line' }
        $r.Output[0] | Should -BeLike "* Nightly backup * of 2 disk(s) to '$root', keeping 2 backup(s) per disk."
        ($r.Output -join "`n") | Should -BeLike "*``[web-os``] new persistent bitmap 'nightly': this run takes a full backup.*"
        ($r.Output -join "`n") | Should -BeLike "*``[web-os``] Dirty bitmap 'nightly' of node 'web-os': *"
        ($r.Output -join "`n") | Should -BeLike '*Started 2 backup(s) at one point in time.*'
        ($r.Output -join "`n") | Should -BeLike "*``[web-data``] full backup '*': succeeded*"
        ($r.Output -join "`n") | Should -BeLike '*`[web-data`] verified: the chain of 1 image(s) is sound*'
        $r.Output[-1] | Should -BeLike '* done: 2 disk(s) backed up, merged and verified.'
        $first = @{ os = @(Get-Backup (Join-Path $root 'web-os')); data = @(Get-Backup (Join-Path $root 'web-data')) }
        $first.os.Count | Should -Be 1
        $first.data.Count | Should -Be 1
        (Split-Path -Leaf $first.os[0]) -replace '^web-os', '' | Should -Be ((Split-Path -Leaf $first.data[0]) -replace '^web-data', '') -Because 'both disks were backed up in the same run, at one point in time'
        Assert-QemuImageEqual -Path $first.os[0] -Reference $os
        Assert-QemuImageEqual -Path $first.data[0] -Reference $data
        @(Get-ChildItem $reports -Filter '*.svg').Count | Should -Be 2
        Get-Content -Raw $transcript | Should -BeLike '* done: 2 disk(s) backed up, merged and verified.*'

        foreach ($night in 2, 3) {
            Start-Sleep -Milliseconds 1100   # the backups' names carry the second of their run
            Write-Disk $os ($night * 512KB) (0x30 + $night) 128KB
            Write-Disk $data 0 (0x40 + $night) 64KB
            $r = Invoke-Runbook @('-Disk', "$os,$data", '-BackupRoot', $root, '-Keep', '2')
            $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
            ($r.Output -join "`n") | Should -BeLike "*``[web-os``] incremental backup '*': succeeded*"
            foreach ($pair in @(@($os, 'web-os'), @($data, 'web-data'))) {
                $backups = @(Get-Backup (Join-Path $root $pair[1]))
                $backups.Count | Should -Be 2 -Because "night $night keeps 2 backups of $($pair[1])"
                foreach ($b in $backups) { $null = Assert-QemuImageCheck -Path $b }
                Assert-QemuImageEqual -Path $backups[-1] -Reference $pair[0]
                @(Get-BackupChain -Path $backups[-1]).Count | Should -Be 2
            }
        }
        ($r.Output -join "`n") | Should -BeLike "*``[web-os``] retention: 3 -> 2 backups; '*' now holds the merged ones; 2 file(s) deleted.*"
    }

    It 'exits 1 and backs up nothing when another process holds a disk for writing' {
        $qemu = Start-QemuIoHolder $data
        try { $r = Invoke-Runbook @('-Disk', "$os,$data", '-BackupRoot', $root) }
        finally { Stop-QemuIoHolder $qemu }
        $r.ExitCode | Should -Be 1
        $r.Output[-1] | Should -BeLike '* FAILED: *(ImageInUse)'
        @(Get-ChildItem -Path $root -Recurse -Filter '*.qcow2*' -ErrorAction SilentlyContinue).Count | Should -Be 0
        # the disk it opened first was closed again: it opens here
        $node = Open-BlockNode -Path $os
        Close-BlockNode -Node $node.Name
    }

    It 'rebuilds a bitmap that a crash left inconsistent from the chain''s manifest, and goes on with an incremental' {
        $r = Invoke-Runbook @('-Disk', $os, '-BackupRoot', $root)
        $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
        # qemu-io writes a cluster behind the runbook's back (QEMU records it in the bitmap), then a writer of the disk is
        # killed: the persistent bitmap stays marked in use, and loads inconsistent
        $null = & qemu-io -f qcow2 -c 'write -P 0x66 2M 64k' $os
        Stop-QemuIoHolder (Start-QemuIoHolder $os) -Kill
        (Get-DirtyBitmap -Path $os -Name nightly).InUse | Should -BeTrue
        Start-Sleep -Milliseconds 1100
        $r = Invoke-Runbook @('-Disk', $os, '-BackupRoot', $root)
        $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
        ($r.Output -join "`n") | Should -BeLike "*``[web-os``] bitmap 'nightly' was inconsistent (a crash); rebuilt from '*.digests': 1 cluster(s) changed since that backup.*"
        ($r.Output -join "`n") | Should -BeLike "*``[web-os``] incremental backup '*': succeeded*"
        $backups = @(Get-Backup (Join-Path $root 'web-os'))
        $backups.Count | Should -Be 2
        Assert-QemuImageEqual -Path $backups[-1] -Reference $os
    }
}
