<#
.SYNOPSIS
    Runs the Pester suite against the staged module (BITMAPBACKUP_MODULE) and writes a count summary.
    Started by build.ps1 in a fresh pwsh after each build, since a binary module cannot be reloaded.
#>
param(
    [Parameter(Mandatory)] [string] $PesterModule,
    [Parameter(Mandatory)] [string] $SummaryPath,
    [Parameter(Mandatory)] [string] $ResultsPath,
    [string[]] $Path = @(Join-Path $PSScriptRoot 'Pester'),
    [string[]] $ExcludeTag = @()
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$PSStyle.OutputRendering = 'PlainText'

# pwsh -File passes "a,b" as one string: split lists here.
$Path = @($Path | ForEach-Object { $_ -split ',' } | Where-Object { $_ })
$ExcludeTag = @($ExcludeTag | ForEach-Object { $_ -split ',' } | Where-Object { $_ })

Import-Module $PesterModule -Force
$c = New-PesterConfiguration
$c.Run.Path = $Path
$c.Run.PassThru = $true
if ($ExcludeTag) { $c.Filter.ExcludeTag = $ExcludeTag }
$c.Output.Verbosity = 'Detailed'
$c.Output.RenderMode = 'Plaintext'
$c.TestResult.Enabled = $true
$c.TestResult.OutputFormat = 'JUnitXml'
$c.TestResult.OutputPath = $ResultsPath
$r = Invoke-Pester -Configuration $c
if ($null -eq $r) {
    [pscustomobject]@{ Passed = 0; Failed = 1; Skipped = 0 } | ConvertTo-Json | Set-Content -Path $SummaryPath
    'Pester did not run'
    exit 1
}
$failed = $r.FailedCount + $r.FailedContainersCount
[pscustomobject]@{ Passed = $r.PassedCount; Failed = $failed; Skipped = $r.SkippedCount } |
    ConvertTo-Json | Set-Content -Path $SummaryPath
"Pester: $($r.PassedCount) passed, $failed failed, $($r.SkippedCount) skipped"
exit ([int]($failed -gt 0))
