# The installable package (issue 12, part 2): build/Package.ps1 (what build.ps1 Package runs) makes a .nupkg of the staged
# module with PSResourceGet; a child pwsh whose home is a scratch folder registers a file repository, installs the
# package with Install-PSResource -Scope CurrentUser, and a fresh pwsh with the same home finds the module by name,
# loads it by command auto-loading and Import-Module, shows its full help, and uses it (a backup with its digest
# manifest, which needs System.IO.Hashing.dll; a DSC class; the DSC v3 command).
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $script:ModuleFolder = Split-Path (Get-BitmapBackupModulePath)

    function Invoke-IsolatedPwsh {
        <#
        Run a script file in a fresh pwsh whose HOME and XDG folders are -HomePath and which inherits no PSModulePath:
        what a new user on a new machine starts with. Returns ExitCode and Output (stdout and stderr lines).
        #>
        param([Parameter(Mandatory)] [string] $HomePath, [Parameter(Mandatory)] [string] $Script, [string[]] $ArgumentList = @())
        $file = Join-Path $HomePath ('script-' + [guid]::NewGuid().ToString('N').Substring(0, 8) + '.ps1')
        Set-Content -Path $file -Value $Script
        $psi = [Diagnostics.ProcessStartInfo]::new('dotnet')
        foreach ($a in @((Join-Path $PSHOME 'pwsh.dll'), '-NoProfile', '-NonInteractive', '-File', $file) + $ArgumentList) { $psi.ArgumentList.Add($a) }
        $psi.UseShellExecute = $false
        $psi.RedirectStandardOutput = $true; $psi.RedirectStandardError = $true
        $psi.WorkingDirectory = $HomePath
        # the folders must exist: .NET gives an empty path for a special folder that does not, and PSResourceGet and
        # NuGet would then write their settings relative to the working folder
        $psi.Environment['HOME'] = $HomePath
        foreach ($pair in @(@('XDG_DATA_HOME', '.local/share'), @('XDG_CONFIG_HOME', '.config'), @('XDG_CACHE_HOME', '.cache'))) {
            $folder = Join-Path $HomePath $pair[1]
            $null = New-Item -ItemType Directory -Path $folder -Force
            $psi.Environment[$pair[0]] = $folder
        }
        $psi.Environment['NO_COLOR'] = '1'
        $null = $psi.Environment.Remove('PSModulePath')
        $null = $psi.Environment.Remove('BITMAPBACKUP_MODULE')
        $process = [Diagnostics.Process]::Start($psi)
        try {
            $stdout = $process.StandardOutput.ReadToEndAsync()
            $stderr = $process.StandardError.ReadToEndAsync()
            if (-not $process.WaitForExit(300000)) { $process.Kill(); throw "the isolated pwsh did not end: $file" }
            $process.WaitForExit()
            $lines = @(($stdout.Result + $stderr.Result) -split "`r?`n" | Where-Object { $_ -ne '' })
            return [pscustomobject]@{ ExitCode = $process.ExitCode; Output = $lines }
        }
        finally { $process.Dispose() }
    }

    function Get-Value([string[]] $Lines, [string] $Key) {
        <# The value of the line 'Key: value' the child printed. #>
        $line = @($Lines | Where-Object { $_.StartsWith("${Key}: ") })
        $line.Count | Should -Be 1 -Because "the child prints '$Key' once: $($Lines -join "`n")"
        return $line[0].Substring($Key.Length + 2)
    }
}

Describe 'The module manifest' {
    It 'passes Test-ModuleManifest without a warning and has the metadata a gallery shows' {
        $warnings = @()
        $info = Test-ModuleManifest -Path (Get-BitmapBackupModulePath) -WarningVariable warnings -ErrorAction Stop
        $warnings | Should -BeNullOrEmpty
        $info.Description | Should -Not -BeNullOrEmpty
        $info.Author | Should -Not -BeNullOrEmpty
        $info.PowerShellVersion | Should -Be ([version]'7.6')
        @($info.CompatiblePSEditions) | Should -Be @('Core')
        $info.ProjectUri.IsAbsoluteUri | Should -BeTrue
        $info.LicenseUri.IsAbsoluteUri | Should -BeTrue
        $info.ReleaseNotes | Should -BeLike "*$($info.Version)*Merge-BackupChain*"
        @($info.Tags) | Should -Contain 'qcow2'
        @($info.Tags) | Should -Contain 'DSC'
        @((Import-PowerShellDataFile (Get-BitmapBackupModulePath)).DscResourcesToExport) | Should -Be @('DirtyBitmap', 'BackupChainRetention')
        @((Get-Module -Name BitmapBackup).ExportedDscResources) | Should -Be @('DirtyBitmap', 'BackupChainRetention')
        foreach ($tag in $info.Tags) { $tag | Should -Match '^[\w.-]+$' -Because 'gallery tags have no spaces' }
    }
}

Describe 'The package' -Skip:$NoQemu {
    BeforeAll {
        $script:Home1 = New-TestDirectory
        $script:Repository = Join-Path $script:Home1 'repository'
        $packageScript = Join-Path $PSScriptRoot '../../build/Package.ps1'
        $r = Invoke-IsolatedPwsh -HomePath $script:Home1 -Script "& '$packageScript' -ModulePath '$script:ModuleFolder' -OutputPath '$script:Repository'"
        $r.ExitCode | Should -Be 0 -Because ($r.Output -join "`n")
        $script:Package = $r.Output[-1]
    }

    It 'is a .nupkg with the whole module folder: both assemblies, System.IO.Hashing.dll, the help, the DSC files' {
        $script:Package | Should -BeLike '*/BitmapBackup.*.nupkg'
        $version = (Import-PowerShellDataFile (Get-BitmapBackupModulePath)).ModuleVersion
        Split-Path -Leaf $script:Package | Should -Be "BitmapBackup.$version.nupkg"
        Add-Type -AssemblyName System.IO.Compression.FileSystem
        $zip = [IO.Compression.ZipFile]::OpenRead($script:Package)
        try { $entries = @($zip.Entries | ForEach-Object FullName) }
        finally { $zip.Dispose() }
        $staged = @(Get-ChildItem -Path $script:ModuleFolder -Recurse -File | ForEach-Object { [IO.Path]::GetRelativePath($script:ModuleFolder, $_.FullName) })
        foreach ($file in $staged) { $entries | Should -Contain $file }
        foreach ($file in 'System.IO.Hashing.dll', 'BitmapBackup.Cmdlets.dll', 'BitmapBackup.Core.dll', 'BitmapBackup.psm1', 'BitmapBackup.Dsc.ps1',
            'BitmapBackup.DirtyBitmap.dsc.resource.json', 'BitmapBackup.BackupChainRetention.dsc.resource.json', 'en-US/BitmapBackup.Cmdlets.dll-Help.xml') {
            $entries | Should -Contain $file
        }
        $entries | Should -Contain 'BitmapBackup.nuspec'
    }

    It 'installs from a local repository with Install-PSResource, and a fresh pwsh finds, loads, documents and uses it by name' {
        $install = Invoke-IsolatedPwsh -HomePath $script:Home1 -Script @"
`$ErrorActionPreference = 'Stop'
`$ProgressPreference = 'SilentlyContinue'
Register-PSResourceRepository -Name local -Uri '$script:Repository' -Trusted
Install-PSResource -Name BitmapBackup -Repository local -Scope CurrentUser -TrustRepository
'installed: ' + (Get-InstalledPSResource -Name BitmapBackup).InstalledLocation
"@
        $install.ExitCode | Should -Be 0 -Because ($install.Output -join "`n")
        Test-Path (Join-Path $script:Home1 '.local/share/PSResourceGet/PSResourceRepository.xml') | Should -BeTrue -Because 'PSResourceGet keeps its repositories in the scratch home'
        $modules = Join-Path $script:Home1 '.local/share/powershell/Modules'
        Get-Value $install.Output 'installed' | Should -Be $modules
        Test-Path (Join-Path $modules 'BitmapBackup/0.1.0/System.IO.Hashing.dll') | Should -BeTrue

        $work = Join-Path $script:Home1 'work'
        $null = New-Item -ItemType Directory -Path $work
        $use = Invoke-IsolatedPwsh -HomePath $script:Home1 -Script @"
`$ErrorActionPreference = 'Stop'
`$ProgressPreference = 'SilentlyContinue'
'available: ' + ((Get-Module -ListAvailable -Name BitmapBackup).ModuleBase -join ',')
'loaded before: ' + @(Get-Module BitmapBackup).Count
# command auto-loading: the first cmdlet used loads the module
`$null = New-BlockImage -Path '$work/disk.qcow2' -Size 4MB
'autoloaded: ' + (Get-Module BitmapBackup).ModuleBase
Import-Module BitmapBackup
'commands: ' + @(Get-Command -Module BitmapBackup).Count
`$help = Get-Help Merge-BackupChain -Full
'synopsis: ' + `$help.Synopsis
'examples: ' + @(`$help.examples.example).Count
'help parameters: ' + ((@(`$help.parameters.parameter.name) | Sort-Object) -join ',')
`$null = Open-BlockNode -Path '$work/disk.qcow2' -Name vm
`$null = New-DirtyBitmap -Node vm -Name daily -Persistent
Write-BlockNode -Node vm -Offset 0 -Pattern 7 -Length 1MB
`$full = Start-IncrementalBackup -Node vm -Target '$work/full.qcow2' -Sync Full -Bitmap daily -BitmapMode OnSuccess -Wait
'manifest: ' + (Split-Path -Leaf `$full.Manifest)
Write-BlockNode -Node vm -Offset 2MB -Pattern 8 -Length 64KB
'picture: ' + (Show-DirtyBitmap -Node vm -Name daily -Width 8)[1]
`$inc = Start-IncrementalBackup -Node vm -Target '$work/inc.qcow2' -Sync Incremental -Bitmap daily -BackingFile full.qcow2 -Wait
'verified: ' + (Test-IncrementalBackup -Path `$inc.Target -Node vm).Passed
Close-BlockNode -Node vm
'merged: ' + (Merge-BackupChain -Path `$inc.Target -Keep 1 -Wait -Confirm:`$false).ImagesAfter
'dsc class: ' + (& (Get-Module BitmapBackup) { [DirtyBitmap] }).Name
'dsc state: ' + (& (Get-Module BitmapBackup) { param(`$p) `$r = [DirtyBitmap]::new(); `$r.Path = `$p; `$r.Name = 'daily'; `$r.Get().Ensure } '$work/disk.qcow2')
"@
        $use.ExitCode | Should -Be 0 -Because ($use.Output -join "`n")
        $base = Join-Path $modules 'BitmapBackup/0.1.0'
        Get-Value $use.Output 'available' | Should -Be $base
        Get-Value $use.Output 'loaded before' | Should -Be '0'
        Get-Value $use.Output 'autoloaded' | Should -Be $base
        Get-Value $use.Output 'commands' | Should -Be ([string]@((Import-PowerShellDataFile (Get-BitmapBackupModulePath)).CmdletsToExport).Count)
        Get-Value $use.Output 'synopsis' | Should -Be (Get-Help Merge-BackupChain).Synopsis
        [int](Get-Value $use.Output 'examples') | Should -BeGreaterOrEqual 3
        Get-Value $use.Output 'help parameters' | Should -Be 'BytesPerSecond,Confirm,Into,JobName,Keep,LiteralPath,Path,Wait,WhatIf'
        Get-Value $use.Output 'manifest' | Should -Be 'full.qcow2.digests'
        Get-Value $use.Output 'picture' | Should -Be '|    ▂   |'
        Get-Value $use.Output 'verified' | Should -Be 'True'
        Get-Value $use.Output 'merged' | Should -Be '1'
        Get-Value $use.Output 'dsc class' | Should -Be 'DirtyBitmap'
        Get-Value $use.Output 'dsc state' | Should -Be 'Present'

        # and the DSC v3 command runs from the installed folder, as dsc would run it there
        $dsc = Invoke-IsolatedPwsh -HomePath $script:Home1 -Script @"
Set-Location '$base'
'{"Path":"$work/disk.qcow2","Name":"daily"}' | & dotnet (Join-Path `$PSHOME 'pwsh.dll') -NoLogo -NoProfile -NonInteractive -File ./BitmapBackup.Dsc.ps1 test DirtyBitmap 2>`$null
"@
        $dsc.ExitCode | Should -Be 0 -Because ($dsc.Output -join "`n")
        ($dsc.Output[-1] | ConvertFrom-Json)._inDesiredState | Should -BeTrue
    }
}
