#!/usr/bin/env pwsh
<#
.SYNOPSIS
    Every task of the BitmapBackup repository: Build, Help, Test, Faults, Demo, Bench, Package.
.DESCRIPTION
    Run with the repository's own PowerShell (dotnet tool restore; dotnet pwsh ./build.ps1 <Task>).
    Build stages a ready module folder in out/BitmapBackup, its help (from docs/help) included. Package makes
    artifacts/BitmapBackup.<version>.nupkg (PSResourceGet) and a zip of the module. Test runs the xunit suite of Core and the Pester
    suite of the cmdlets (in a fresh child pwsh, since a binary module cannot be reloaded) and ends with one
    line "N passed, N failed, N skipped"; it exits non-zero on any failure. Faults runs only the fault campaign
    (tests/Pester/Faults.Tests.ps1: real ENOSPC on small tmpfs mounts, kill -9 of child processes; needs root) with many
    seeds and a fine sweep of free space, in a fresh child pwsh; a failing test names its seed, and
    BITMAPBACKUP_FAULT_SEED=<seed> replays it.
.EXAMPLE
    dotnet pwsh -NoProfile -NonInteractive ./build.ps1 Test
#>
[CmdletBinding()]
param(
    # Tasks to run, in order; comma-separated strings are split (pwsh -File passes "A,B" as one string).
    [Parameter(Position = 0)]
    [string[]] $Task = @('Build', 'Help', 'Test'),

    [ValidateSet('Release', 'Debug')]
    [string] $Configuration = 'Release',

    # Pester version from NuGet (5.7.1 default; 6.2.0 also works).
    [string] $PesterVersion = '5.7.1',

    # Extra arguments for the bench program (suite names).
    [string[]] $BenchArgs = @(),

    # Faults: how many seeds the campaign runs (BITMAPBACKUP_FAULT_SEEDS, when set, wins).
    [int] $FaultSeeds = 4
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$PSStyle.OutputRendering = 'PlainText'

$Root = $PSScriptRoot
$ModuleName = 'BitmapBackup'
$OutDir = Join-Path $Root 'out'
$ModuleDir = Join-Path $OutDir $ModuleName
$Artifacts = Join-Path $Root 'artifacts'
$Solution = Join-Path $Root 'BitmapBackup.slnx'
$ValidTasks = 'Build', 'Help', 'HelpScaffold', 'Test', 'Faults', 'Demo', 'Bench', 'Package', 'Clean'

$Task = @($Task | ForEach-Object { $_ -split ',' } | ForEach-Object { $_.Trim() } | Where-Object { $_ })
foreach ($t in $Task) {
    if ($t -notin $ValidTasks) { throw "Unknown task '$t'. Tasks: $($ValidTasks -join ', ')." }
}

function Invoke-Native {
    # Runs a native command, streams its output to the host and throws on a non-zero exit code.
    param([string] $FilePath, [string[]] $ArgumentList)
    & $FilePath @ArgumentList | Out-Host
    if ($LASTEXITCODE -ne 0) { throw "'$FilePath $($ArgumentList -join ' ')' failed with exit code $LASTEXITCODE." }
}

function Invoke-ChildPwsh {
    # Runs a script in a fresh pwsh (under 'dotnet pwsh' the process is dotnet, so start pwsh.dll) and returns its exit code.
    param([string] $File, [string[]] $ArgumentList = @())
    & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -File $File @ArgumentList | Out-Host
    return $LASTEXITCODE
}

function Get-NuGetRoot {
    $line = & dotnet nuget locals global-packages --list
    return ($line -replace '^global-packages:\s*', '').Trim()
}

$Completed = [System.Collections.Generic.HashSet[string]]::new()

function Invoke-Task([string] $Name) {
    if (-not $Completed.Add($Name)) { return }
    Write-Host "== $Name" -ForegroundColor Cyan
    & "Task-$Name"
}

function Task-Clean {
    foreach ($d in $OutDir, $Artifacts) { if (Test-Path $d) { Remove-Item $d -Recurse -Force } }
}

function Task-Build {
    Invoke-Native dotnet @('build', $Solution, '-c', $Configuration, '-nologo', '-v', 'q', '-clp:NoSummary')
    if (Test-Path $ModuleDir) { Remove-Item $ModuleDir -Recurse -Force }
    $null = New-Item -ItemType Directory -Path $ModuleDir
    $bin = Join-Path $Root "src/Cmdlets/bin/$Configuration/net10.0"
    foreach ($f in 'BitmapBackup.Cmdlets.dll', 'BitmapBackup.Cmdlets.pdb', 'BitmapBackup.Core.dll', 'BitmapBackup.Core.pdb', 'System.IO.Hashing.dll', 'ZstdSharp.dll') {
        Copy-Item (Join-Path $bin $f) $ModuleDir
    }
    Copy-Item (Join-Path $Root 'Module/*') $ModuleDir -Recurse   # en-US/about_BitmapBackup.help.txt too
    $null = Test-ModuleManifest (Join-Path $ModuleDir "$ModuleName.psd1")
    # The staged module is complete: Get-Help reads the MAML built from docs/help (strict: a stale page fails the build).
    $code = Invoke-ChildPwsh (Join-Path $Root 'build/Help.ps1') @('-Mode', 'Maml', '-Strict', '-ModulePath', (Join-Path $ModuleDir "$ModuleName.psd1"), '-DocsPath', (Join-Path $Root 'docs/help'))
    if ($code -ne 0) { throw "Help generation failed (exit code $code)." }
    Write-Host "Module staged in $ModuleDir, help included"
}

function Task-Help {
    # Help is part of every build; the task stays for scripts that name it.
    Invoke-Task Build
}

function Task-HelpScaffold {
    Invoke-Task Build
    $code = Invoke-ChildPwsh (Join-Path $Root 'build/Help.ps1') @('-Mode', 'Scaffold', '-ModulePath', (Join-Path $ModuleDir "$ModuleName.psd1"), '-DocsPath', (Join-Path $Root 'docs/help'))
    if ($code -ne 0) { throw "Help scaffolding failed (exit code $code)." }
}

function Get-JUnitCounts([string[]] $Files) {
    $c = [ordered]@{ Passed = 0; Failed = 0; Skipped = 0 }
    foreach ($f in $Files) {
        [xml] $x = Get-Content -Raw $f
        foreach ($s in $x.SelectNodes('//testsuite')) {
            $tests = [int]$s.tests; $failures = [int]$s.failures; $errors = [int]$s.errors
            $skipped = if ($s.HasAttribute('skipped')) { [int]$s.skipped } else { 0 }
            $c.Failed += $failures + $errors; $c.Skipped += $skipped
            $c.Passed += $tests - $failures - $errors - $skipped
        }
    }
    return $c
}

function Write-JUnitFailures([string[]] $Files) {
    # The failed cases with the first lines of their messages, printed just above the count line: CI shows
    # only the tail of the output, and a flaky case must be named there to be found again.
    foreach ($f in $Files) {
        [xml] $x = Get-Content -Raw $f
        foreach ($case in $x.SelectNodes('//testcase[failure or error]')) {
            $node = $case.SelectSingleNode('failure|error')
            $text = (@($node.GetAttribute('message'), $node.InnerText) | Where-Object { $_ }) -join ' '
            $text = ($text -replace '\s+', ' ').Trim()
            if ($text.Length -gt 400) { $text = $text.Substring(0, 400) + '...' }
            Write-Host "FAILED: $($case.GetAttribute('classname')) :: $($case.GetAttribute('name')): $text"
        }
    }
}

function Task-Test {
    Invoke-Task Build
    Invoke-Task Help
    $results = Join-Path $Artifacts 'test-results'
    if (Test-Path $results) { Remove-Item $results -Recurse -Force }
    $null = New-Item -ItemType Directory -Path $results -Force

    # xunit (Core)
    & dotnet test --solution $Solution -c $Configuration --no-build --report-xunit-junit --results-directory $results | Out-Host
    $xunitExit = $LASTEXITCODE
    $xunit = Get-JUnitCounts @(Get-ChildItem $results -Filter '*.junit.xml' -Recurse | ForEach-Object FullName)
    if ($xunitExit -ne 0 -and $xunit.Failed -eq 0) { $xunit.Failed = 1; Write-Host "xunit exited with $xunitExit" }
    Write-Host "xunit: $($xunit.Passed) passed, $($xunit.Failed) failed, $($xunit.Skipped) skipped"

    # Pester (cmdlets), in a fresh pwsh that loads the staged module
    Invoke-Native dotnet @('restore', (Join-Path $Root 'build/tools.csproj'), '-nologo', '-v', 'q')
    $pesterModule = Join-Path (Get-NuGetRoot) "pester/$PesterVersion/tools/Pester.psd1"
    $summary = Join-Path $results 'pester-summary.json'
    $env:BITMAPBACKUP_MODULE = Join-Path $ModuleDir "$ModuleName.psd1"
    $null = Invoke-ChildPwsh (Join-Path $Root 'tests/Invoke-Pester.ps1') @('-PesterModule', $pesterModule, '-SummaryPath', $summary, '-ResultsPath', (Join-Path $results 'pester.junit.xml'))
    $pester = if (Test-Path $summary) { Get-Content -Raw $summary | ConvertFrom-Json } else { [pscustomobject]@{ Passed = 0; Failed = 1; Skipped = 0 } }
    Write-Host "Pester: $($pester.Passed) passed, $($pester.Failed) failed, $($pester.Skipped) skipped"

    $passed = $xunit.Passed + $pester.Passed
    $failed = $xunit.Failed + $pester.Failed
    $skipped = $xunit.Skipped + $pester.Skipped
    $script:TestFailed = $failed -gt 0
    Write-JUnitFailures @(Get-ChildItem $results -Filter '*.junit.xml' -Recurse | ForEach-Object FullName)
    Write-Host "$passed passed, $failed failed, $skipped skipped"
}

function Task-Faults {
    # The standing fault campaign alone, longer than in Test: many seeds (from a printed base, so any run can be
    # replayed), free space swept finely, more instants and rounds per seed.
    Invoke-Task Build
    $results = Join-Path $Artifacts 'fault-results'
    if (Test-Path $results) { Remove-Item $results -Recurse -Force }
    $null = New-Item -ItemType Directory -Path $results -Force
    Invoke-Native dotnet @('restore', (Join-Path $Root 'build/tools.csproj'), '-nologo', '-v', 'q')
    $pesterModule = Join-Path (Get-NuGetRoot) "pester/$PesterVersion/tools/Pester.psd1"
    $summary = Join-Path $results 'pester-summary.json'
    $env:BITMAPBACKUP_MODULE = Join-Path $ModuleDir "$ModuleName.psd1"
    if (-not $env:BITMAPBACKUP_FAULT_SEED) {
        if (-not $env:BITMAPBACKUP_FAULT_SEEDS) { $env:BITMAPBACKUP_FAULT_SEEDS = "$FaultSeeds" }
        if (-not $env:BITMAPBACKUP_FAULT_SEED_BASE) { $env:BITMAPBACKUP_FAULT_SEED_BASE = "$(Get-Random -Minimum 1000 -Maximum 1000000)" }
        Write-Host "Fault campaign: $env:BITMAPBACKUP_FAULT_SEEDS seeds from $env:BITMAPBACKUP_FAULT_SEED_BASE (BITMAPBACKUP_FAULT_SEED=<seed> replays one)"
    }
    else { Write-Host "Fault campaign: seed $env:BITMAPBACKUP_FAULT_SEED" }
    if (-not $env:BITMAPBACKUP_FAULT_SWEEP) { $env:BITMAPBACKUP_FAULT_SWEEP = 'Full' }
    $null = Invoke-ChildPwsh (Join-Path $Root 'tests/Invoke-Pester.ps1') @('-PesterModule', $pesterModule, '-SummaryPath', $summary,
        '-ResultsPath', (Join-Path $results 'faults.junit.xml'), '-Path', (Join-Path $Root 'tests/Pester/Faults.Tests.ps1'))
    $r = if (Test-Path $summary) { Get-Content -Raw $summary | ConvertFrom-Json } else { [pscustomobject]@{ Passed = 0; Failed = 1; Skipped = 0 } }
    $script:TestFailed = $r.Failed -gt 0
    Write-Host "$($r.Passed) passed, $($r.Failed) failed, $($r.Skipped) skipped"
}

function Task-Demo {
    Invoke-Task Build
    $env:BITMAPBACKUP_MODULE = Join-Path $ModuleDir "$ModuleName.psd1"
    $code = Invoke-ChildPwsh (Join-Path $Root 'demo/Demo.ps1')
    if ($code -ne 0) { throw "The demo failed (exit code $code)." }
}

function Task-Bench {
    Invoke-Native dotnet @('build', (Join-Path $Root 'bench/BitmapBackup.Bench'), '-c', 'Release', '-nologo', '-v', 'q', '-clp:NoSummary')
    Invoke-Native dotnet (@('run', '--no-build', '-c', 'Release', '--project', (Join-Path $Root 'bench/BitmapBackup.Bench'), '--') + $BenchArgs)
}

function Invoke-IsolatedPwsh {
    <#
    Runs a script in a fresh pwsh whose home and XDG folders are the scratch folder -HomePath, with no PSModulePath
    inherited: PSResourceGet keeps its repositories and CurrentUser installs under the home, and the build must neither
    read nor change the user's. Returns the script's output lines; throws on a non-zero exit code.
    #>
    param([string] $File, [string[]] $ArgumentList = @(), [string] $HomePath)
    $names = 'HOME', 'XDG_DATA_HOME', 'XDG_CONFIG_HOME', 'XDG_CACHE_HOME', 'PSModulePath'
    $saved = @{}
    foreach ($n in $names) { $saved[$n] = [Environment]::GetEnvironmentVariable($n) }
    # The folders must exist: .NET gives an empty path for a special folder that does not, and PSResourceGet and NuGet
    # would then write their settings relative to the working folder.
    $folders = @{ XDG_DATA_HOME = '.local/share'; XDG_CONFIG_HOME = '.config'; XDG_CACHE_HOME = '.cache' }
    foreach ($f in $folders.Values) { $null = New-Item -ItemType Directory -Path (Join-Path $HomePath $f) -Force }
    Push-Location $HomePath
    try {
        $env:HOME = $HomePath
        foreach ($n in $folders.Keys) { [Environment]::SetEnvironmentVariable($n, (Join-Path $HomePath $folders[$n])) }
        $env:PSModulePath = $null
        $lines = @(& dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -File $File @ArgumentList)
        $code = $LASTEXITCODE
    }
    finally {
        foreach ($n in $names) { [Environment]::SetEnvironmentVariable($n, $saved[$n]) }
        Pop-Location
    }
    $lines | Out-Host
    if ($code -ne 0) { throw "'$File' failed with exit code $code." }
    return $lines
}

function Task-Package {
    # The module as a NuGet package that Install-PSResource installs from a file repository (artifacts/*.nupkg), and as a zip.
    Invoke-Task Build
    $null = New-Item -ItemType Directory -Path $Artifacts -Force
    $version = (Import-PowerShellDataFile (Join-Path $ModuleDir "$ModuleName.psd1")).ModuleVersion
    $zip = Join-Path $Artifacts "$ModuleName-$version.zip"
    Compress-Archive -Path $ModuleDir -DestinationPath $zip -Force
    Write-Host "Packaged $zip"
    $scratch = Join-Path ([IO.Path]::GetTempPath()) ('bb-package-' + [guid]::NewGuid().ToString('N').Substring(0, 12))
    $null = New-Item -ItemType Directory -Path $scratch
    try {
        $lines = @(Invoke-IsolatedPwsh -File (Join-Path $Root 'build/Package.ps1') -ArgumentList @('-ModulePath', $ModuleDir, '-OutputPath', $Artifacts) -HomePath $scratch)
        Write-Host "Packaged $($lines[-1]) (Register-PSResourceRepository -Name local -Uri $Artifacts -Trusted; Install-PSResource BitmapBackup -Repository local)"
    }
    finally {
        Remove-Item -LiteralPath $scratch -Recurse -Force -ErrorAction SilentlyContinue
    }
}

$script:TestFailed = $false
foreach ($t in $Task) { Invoke-Task $t }
if ($script:TestFailed) { exit 1 }
exit 0
