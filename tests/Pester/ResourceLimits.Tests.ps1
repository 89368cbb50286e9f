# Limits a long-lived session or a big schedule meets (issue 23): running out of file descriptors has its own error id,
# finished jobs do not keep their images in memory, and a thousand persistent bitmaps cost what their tables cost.
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
}
