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
