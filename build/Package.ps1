#!/usr/bin/env pwsh
<#
.SYNOPSIS
    Makes the module's NuGet package (.nupkg) with PSResourceGet, the way the PowerShell Gallery gets one.
.DESCRIPTION
    Always run in a fresh pwsh whose HOME (and XDG folders) is a scratch folder, as build.ps1 Package and the Pester
    package test run it: PSResourceGet keeps its repositories under the user's home, and the build must neither read
    nor change the user's. The script checks the manifest (Test-ModuleManifest, no warning allowed), registers a
    temporary file repository, publishes the staged module folder into it (Publish-PSResource) and copies the package
    to -OutputPath. Prints the package's path.
.EXAMPLE
    dotnet "$PSHOME/pwsh.dll" -NoProfile -NonInteractive -File build/Package.ps1 -ModulePath out/BitmapBackup -OutputPath artifacts
#>
[CmdletBinding()]
param(
    # The staged module folder (out/BitmapBackup).
    [Parameter(Mandatory)]
    [string] $ModulePath,

    # Where the .nupkg goes (created if missing; an older package of the same version is replaced).
    [Parameter(Mandatory)]
    [string] $OutputPath
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$PSStyle.OutputRendering = 'PlainText'

$module = (Resolve-Path -LiteralPath $ModulePath).ProviderPath
$name = Split-Path -Leaf $module
$manifestPath = Join-Path $module "$name.psd1"
$warnings = @()
$info = Test-ModuleManifest -Path $manifestPath -WarningVariable warnings -WarningAction SilentlyContinue
if ($warnings.Count -gt 0) { throw "Test-ModuleManifest warns about '$manifestPath': $($warnings -join ' ')" }
foreach ($field in 'Description', 'Author') {
    if (-not $info.$field) { throw "The manifest '$manifestPath' has no $field." }
}
foreach ($field in 'ProjectUri', 'LicenseUri', 'ReleaseNotes') {
    if (-not $info.$field) { throw "The manifest '$manifestPath' has no $field (PrivateData.PSData)." }
}

$repositoryName = 'BitmapBackupBuild' + [guid]::NewGuid().ToString('N').Substring(0, 8)
$repository = Join-Path ([IO.Path]::GetTempPath()) $repositoryName
$null = New-Item -ItemType Directory -Path $repository
try {
    Register-PSResourceRepository -Name $repositoryName -Uri $repository -Trusted
    try {
        Publish-PSResource -Path $module -Repository $repositoryName -WarningVariable warnings -WarningAction SilentlyContinue
        if ($warnings.Count -gt 0) { throw "Publish-PSResource warns: $($warnings -join ' ')" }
    }
    finally { Unregister-PSResourceRepository -Name $repositoryName }
    $package = Get-ChildItem -LiteralPath $repository -Filter "$name.*.nupkg" | Select-Object -First 1
    if (-not $package) { throw "Publish-PSResource made no package of '$module' in '$repository'." }
    $null = New-Item -ItemType Directory -Path $OutputPath -Force
    $target = Join-Path (Resolve-Path -LiteralPath $OutputPath).ProviderPath $package.Name
    Copy-Item -LiteralPath $package.FullName -Destination $target -Force
    $target
}
finally {
    Remove-Item -LiteralPath $repository -Recurse -Force -ErrorAction SilentlyContinue
}
