# DSC (issue 12, part 3): the class-based resources DirtyBitmap and BackupChainRetention, and their DSC v3 manifests.
# No DSC engine can be installed here (no dsc executable, no PSDesiredStateConfiguration), so the classes' Get/Test/Set
# are called directly in a child pwsh, as an engine would call them, and the v3 manifests' own command lines are run
# with JSON on stdin, in the manifest's folder, as dsc runs them. Each resource goes absent -> present -> drift ->
# corrected, and never changes an image that another process holds for writing.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-img -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module (Join-Path $PSScriptRoot 'FaultHelpers.psm1') -Force
    Import-BitmapBackupModule
    $script:ModuleFolder = Split-Path (Get-BitmapBackupModulePath)
    $script:Pwsh = Join-Path $PSHOME 'pwsh.dll'

    function Invoke-DscClass {
        <#
        Run -Script in a fresh pwsh that imports the module, with New-Resource (an instance of a class of the module,
        properties set from a hashtable) and Invoke-Step (runs a block, writes one line 'name=<json>' with its result,
        warnings, verbose messages and error). Returns the steps by name.
        #>
        param([Parameter(Mandatory)] [string] $Script)
        $prelude = @'
$ErrorActionPreference = 'Stop'
$global:VerbosePreference = 'Continue'
$module = Import-Module '{0}' -PassThru -Verbose:$false 4>$null
function New-Resource([string] $Type, [hashtable] $Properties) {{
    $r = & $module {{ param($t) ($t -as [type])::new() }} $Type
    foreach ($k in $Properties.Keys) {{ $r.$k = $Properties[$k] }}
    return $r
}}
function Invoke-Step([string] $Name, [scriptblock] $Body) {{
    $warnings = [System.Collections.Generic.List[string]]::new()
    $verbose = [System.Collections.Generic.List[string]]::new()
    $result = $null; $err = $null
    try {{
        & $Body 3>&1 4>&1 | ForEach-Object {{
            if ($_ -is [System.Management.Automation.WarningRecord]) {{ $warnings.Add($_.Message) }}
            elseif ($_ -is [System.Management.Automation.VerboseRecord]) {{ $verbose.Add($_.Message) }}
            else {{ $result = $_ }}
        }}
    }}
    catch {{ $err = "$($_.FullyQualifiedErrorId): $($_.Exception.Message)" }}
    $step = [ordered]@{{ Result = $result; Warnings = [string[]]$warnings; Verbose = [string[]]$verbose; Error = $err }}
    [Console]::Out.WriteLine($Name + '=' + (ConvertTo-Json $step -Compress -Depth 4 -EnumsAsStrings))
}}
'@ -f (Get-BitmapBackupModulePath)
        $file = Join-Path (New-TestDirectory) 'dsc-class.ps1'
        Set-Content -Path $file -Value ($prelude + "`n" + $Script)
        $out = & dotnet $script:Pwsh -NoProfile -NonInteractive -File $file 2>&1 | ForEach-Object { "$_" }
        $LASTEXITCODE | Should -Be 0 -Because ($out -join "`n")
        $steps = @{}
        foreach ($line in $out) {
            if ($line -match '^(\w+)=(\{.*\})$') { $steps[$Matches[1]] = $Matches[2] | ConvertFrom-Json -AsHashtable }
        }
        return $steps
    }

    function Invoke-DscManifest {
        <#
        Run the -Operation command of a DSC v3 resource manifest as dsc does: the manifest's executable and args, in the
        manifest's folder, the instance as compressed JSON on stdin. The one substitution: "pwsh" is PowerShell's
        dotnet tool here, so it runs as 'dotnet <PSHOME>/pwsh.dll'. Returns ExitCode, Output (stdout), State (the JSON
        object on stdout) and Traces (stderr lines, parsed as DSC trace objects).
        #>
        param([Parameter(Mandatory)] [string] $Manifest, [Parameter(Mandatory)] [string] $Operation, [Parameter(Mandatory)] [string] $Json)
        $definition = (Get-Content -Raw $Manifest | ConvertFrom-Json).$Operation
        $definition.executable | Should -Be 'pwsh'
        $definition.input | Should -Be 'stdin'
        $psi = [Diagnostics.ProcessStartInfo]::new('dotnet')
        $psi.ArgumentList.Add($script:Pwsh)
        foreach ($a in $definition.args) { $psi.ArgumentList.Add($a) }
        $psi.WorkingDirectory = Split-Path $Manifest
        $psi.UseShellExecute = $false
        $psi.RedirectStandardInput = $true; $psi.RedirectStandardOutput = $true; $psi.RedirectStandardError = $true
        $process = [Diagnostics.Process]::Start($psi)
        try {
            $stdout = $process.StandardOutput.ReadToEndAsync()
            $stderr = $process.StandardError.ReadToEndAsync()
            $process.StandardInput.Write($Json)
            $process.StandardInput.Close()
            if (-not $process.WaitForExit(180000)) { $process.Kill(); throw "'$Operation' of $Manifest did not end" }
            $process.WaitForExit()
            $lines = @($stdout.Result -split "`n" | Where-Object { $_.Trim() })
            $traces = @($stderr.Result -split "`n" | Where-Object { $_.Trim() } | ForEach-Object {
                    try { $_ | ConvertFrom-Json -AsHashtable } catch { @{ raw = $_ } } })
            $state = if ($lines.Count -gt 0) { $lines[0] | ConvertFrom-Json -AsHashtable } else { $null }
            return [pscustomobject]@{ ExitCode = $process.ExitCode; Output = $lines; State = $state; Traces = $traces }
        }
        finally { $process.Dispose() }
    }

    function Get-TraceText($Result, [string] $Level) { @($Result.Traces | Where-Object { $_.ContainsKey($Level) } | ForEach-Object { $_[$Level] }) -join "`n" }

    function Assert-MatchesInstanceSchema {
        <#
        The JSON a command wrote validates against the manifest's embedded instance schema (as dsc validates it). The
        canonical _inDesiredState property is a $ref to DSC's published schema, not reachable here: it is replaced by what
        that schema says (a boolean or null, read-only).
        #>
        param([Parameter(Mandatory)] [string] $Manifest, [Parameter(Mandatory)] [string] $Json)
        $schema = (Get-Content -Raw $Manifest | ConvertFrom-Json -AsHashtable).schema.embedded
        $schema.properties['_inDesiredState'] = @{ type = @('boolean', 'null'); readOnly = $true }
        Test-Json -Json $Json -Schema ($schema | ConvertTo-Json -Depth 10) -ErrorAction Stop | Should -BeTrue
    }

    function Get-QemuBitmap([string] $Path) {
        <# The bitmaps qemu-img info lists for an image (name, granularity, flags), -U: it may be in use. #>
        $info = (Invoke-QemuImg info --output=json -U $Path).Output | ConvertFrom-Json
        $formatSpecific = $info.PSObject.Properties['format-specific']
        if (-not $formatSpecific -or -not $formatSpecific.Value.data.PSObject.Properties['bitmaps']) { return @() }
        return @($formatSpecific.Value.data.bitmaps)
    }
}

Describe 'DSC class DirtyBitmap (methods called in a child pwsh)' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'goes absent -> present -> drift (disabled, other granularity) -> corrected -> absent, idempotently' {
        $dir = New-TestDirectory
        $img = Join-Path $dir 'disk.qcow2'
        $null = New-BlockImage -Path $img -Size 8MB -Confirm:$false
        $s = Invoke-DscClass @"
`$r = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily'; Granularity = 65536; Enabled = `$true }
Invoke-Step get1 { `$r.Get() }
Invoke-Step test1 { `$r.Test() }
Invoke-Step set1 { `$r.Set() }
Invoke-Step test2 { `$r.Test() }
Invoke-Step get2 { `$r.Get() }
`$hash = (Get-FileHash '$img').Hash
Invoke-Step set2 { `$r.Set() }
Invoke-Step unchanged { (Get-FileHash '$img').Hash -eq `$hash }
"@
        $s.get1.Result.Ensure | Should -Be 'Absent'
        $s.get1.Result.Path | Should -Be $img
        $s.test1.Result | Should -BeFalse
        $s.test1.Verbose | Should -Contain "bitmap 'daily' of '$img' does not exist, and should."
        $s.set1.Error | Should -BeNullOrEmpty
        $s.set1.Verbose | Should -Contain "Added the persistent bitmap 'daily' to '$img' (recording)."
        $s.test2.Result | Should -BeTrue
        $s.get2.Result.Ensure | Should -Be 'Present'
        $s.get2.Result.Granularity | Should -Be 65536
        $s.get2.Result.Enabled | Should -BeTrue
        $s.get2.Result.InUse | Should -BeFalse
        $s.set2.Verbose | Should -Contain "Bitmap 'daily' of '$img' is in the desired state: nothing to change."
        $s.unchanged.Result | Should -BeTrue -Because 'Set changes nothing when Test is true'
        $bitmaps = @(Get-QemuBitmap $img)
        $bitmaps.Count | Should -Be 1
        $bitmaps[0].name | Should -Be 'daily'
        $bitmaps[0].granularity | Should -Be 65536
        @($bitmaps[0].flags) | Should -Be @('auto')

        # drift made by QEMU's own tool: the bitmap no longer records writes
        (Invoke-QemuImg bitmap --disable $img daily).ExitCode | Should -Be 0
        @((Get-QemuBitmap $img)[0].flags).Count | Should -Be 0
        $s = Invoke-DscClass @"
`$r = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily'; Granularity = 65536 }
Invoke-Step test1 { `$r.Test() }
Invoke-Step set1 { `$r.Set() }
Invoke-Step test2 { `$r.Test() }
`$r.Granularity = 131072
Invoke-Step test3 { `$r.Test() }
Invoke-Step set3 { `$r.Set() }
Invoke-Step get3 { `$r.Get() }
`$r.Ensure = 'Absent'
Invoke-Step test4 { `$r.Test() }
Invoke-Step set4 { `$r.Set() }
Invoke-Step get4 { `$r.Get() }
Invoke-Step test5 { `$r.Test() }
"@
        $s.test1.Result | Should -BeFalse
        $s.test1.Verbose | Should -Contain "bitmap 'daily' of '$img' does not record writes, and should."
        $s.set1.Verbose | Should -Contain "Enabled bitmap 'daily' of '$img'."
        $s.test2.Result | Should -BeTrue
        $s.test3.Result | Should -BeFalse
        $s.test3.Verbose | Should -Contain "bitmap 'daily' of '$img' has a granularity of 65536 bytes, not 131072."
        $s.set3.Warnings | Should -HaveCount 1
        $s.set3.Warnings[0] | Should -BeLike "Bitmap 'daily' of '$img' was made anew because its granularity is 65536 bytes, not 131072: *the next backup from it must be a full one*"
        $s.get3.Result.Granularity | Should -Be 131072
        $s.get3.Result.Enabled | Should -BeTrue
        $s.test4.Result | Should -BeFalse
        $s.set4.Verbose | Should -Contain "Removed bitmap 'daily' from '$img'."
        $s.get4.Result.Ensure | Should -Be 'Absent'
        $s.test5.Result | Should -BeTrue
        @(Get-QemuBitmap $img).Count | Should -Be 0
        $null = Assert-QemuImageCheck -Path $img
    }

    It 'creates a disabled bitmap on a raw image (its sidecar), and an absent image is simply absent' {
        $dir = New-TestDirectory
        $raw = New-TestImage -Directory $dir -Size 4MB
        $s = Invoke-DscClass @"
`$r = New-Resource DirtyBitmap @{ Path = '$raw'; Name = 'weekly'; Enabled = `$false }
Invoke-Step set1 { `$r.Set() }
Invoke-Step get1 { `$r.Get() }
Invoke-Step test1 { `$r.Test() }
`$none = New-Resource DirtyBitmap @{ Path = '$dir/none.qcow2'; Name = 'x'; Ensure = 'Absent' }
Invoke-Step test2 { `$none.Test() }
Invoke-Step get2 { `$none.Get() }
"@
        $s.get1.Result.Ensure | Should -Be 'Present'
        $s.get1.Result.Enabled | Should -BeFalse
        $s.get1.Result.Granularity | Should -Be 65536
        $s.test1.Result | Should -BeTrue
        $s.test2.Result | Should -BeTrue
        $s.get2.Result.Ensure | Should -Be 'Absent'
        $s.get2.Verbose | Should -Contain "Image '$dir/none.qcow2' does not exist: it has no bitmap."
        $stored = @(Get-DirtyBitmap -Path $raw)
        $stored.Name | Should -Be 'weekly'
        $stored.Auto | Should -BeFalse
    }

    It 'never changes an image that qemu-io holds for writing: Get and Test read it and say so, Set fails with ImageInUse' {
        $dir = New-TestDirectory
        $img = Join-Path $dir 'held.qcow2'
        $null = New-BlockImage -Path $img -Size 4MB -Confirm:$false
        (Invoke-QemuImg bitmap --add --enable -g 65536 $img daily).ExitCode | Should -Be 0
        $qemu = Start-QemuIoHolder $img
        try {
            $s = Invoke-DscClass @"
`$r = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily'; Enabled = `$false }
Invoke-Step get1 { `$r.Get() }
Invoke-Step test1 { `$r.Test() }
Invoke-Step set1 { `$r.Set() }
"@
        }
        finally { Stop-QemuIoHolder $qemu }
        $s.get1.Result.Ensure | Should -Be 'Present'
        $s.get1.Result.InUse | Should -BeTrue
        $s.get1.Result.Inconsistent | Should -BeFalse -Because 'a writer holds it: in use, not crashed'
        $s.get1.Warnings[0] | Should -BeLike "Image '$img' is open for writing elsewhere*it will not be changed*"
        $s.test1.Result | Should -BeFalse
        $s.set1.Error | Should -BeLike 'ImageInUse,*Failed to get*'
        @((Get-QemuBitmap $img)[0].flags) | Should -Be @('auto') -Because 'Set did not disable it'
        (Get-QemuBitmap $img)[0].granularity | Should -Be 65536
    }

    It 'makes an inconsistent bitmap (its writer was killed) anew, and says a full backup must follow' {
        $dir = New-TestDirectory
        $img = Join-Path $dir 'crashed.qcow2'
        $null = New-BlockImage -Path $img -Size 4MB -Confirm:$false
        (Invoke-QemuImg bitmap --add --enable $img daily).ExitCode | Should -Be 0
        Stop-QemuIoHolder (Start-QemuIoHolder $img) -Kill
        @((Get-QemuBitmap $img)[0].flags) | Should -Contain 'in-use'
        $s = Invoke-DscClass @"
`$r = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily' }
Invoke-Step get1 { `$r.Get() }
Invoke-Step test1 { `$r.Test() }
Invoke-Step set1 { `$r.Set() }
Invoke-Step get2 { `$r.Get() }
"@
        $s.get1.Result.InUse | Should -BeTrue
        $s.get1.Result.Inconsistent | Should -BeTrue
        $s.test1.Verbose | Should -Contain "bitmap 'daily' of '$img' is inconsistent (its last writer did not store it cleanly), so it cannot be used."
        $s.set1.Warnings[0] | Should -BeLike "Bitmap 'daily' of '$img' was made anew because it is inconsistent*full one*"
        $s.get2.Result.Inconsistent | Should -BeFalse
        @((Get-QemuBitmap $img)[0].flags) | Should -Be @('auto')
        $null = Assert-QemuImageCheck -Path $img
    }
}

Describe 'DSC class DirtyBitmap: CrashSafe' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'makes an existing bitmap crash-safe keeping its bits; after kill -9 it is Recoverable, not inconsistent, so Set keeps it; and back' {
        $dir = New-TestDirectory
        $img = Join-Path $dir 'disk.qcow2'
        $null = New-BlockImage -Path $img -Size 8MB -Confirm:$false
        $s = Invoke-DscClass @"
`$plain = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily' }
Invoke-Step set1 { `$plain.Set() }
`$n = Open-BlockNode -Path '$img'; Write-BlockNode -Node `$n.Name -Offset 1MB -Length 1MB -Pattern 7; Close-BlockNode -Node `$n.Name
`$safe = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily'; CrashSafe = `$true }
Invoke-Step get1 { `$safe.Get() }
Invoke-Step test1 { `$safe.Test() }
Invoke-Step set2 { `$safe.Set() }
Invoke-Step get2 { `$safe.Get() }
Invoke-Step test2 { `$safe.Test() }
"@
        $s.set1.Error | Should -BeNullOrEmpty
        $s.get1.Result.CrashSafe | Should -BeFalse
        $s.get1.Result.Count | Should -Be 1MB
        $s.test1.Result | Should -BeFalse
        $s.test1.Verbose | Should -Contain "bitmap 'daily' of '$img' is not crash-safe (no write-intent log lists it), and should be."
        $s.set2.Error | Should -BeNullOrEmpty
        $s.set2.Warnings | Should -BeNullOrEmpty -Because 'the bitmap is changed in place, not made anew'
        $s.get2.Result.CrashSafe | Should -BeTrue
        $s.get2.Result.Count | Should -Be 1MB -Because 'the writes it recorded are kept'
        $s.test2.Result | Should -BeTrue
        Test-Path "$img.intent" | Should -BeTrue

        # A writer killed while it holds the image: the bitmap is in use, and its log can rebuild it.
        $ready = Join-Path $dir 'ready'
        $child = Start-FaultChild -Directory $dir -Name writer -Script "`$n = Open-BlockNode -Path '$img'; Write-BlockNode -Node `$n.Name -Offset 5MB -Length 64KB -Pattern 9; Set-Content -Path '$ready' -Value ok; Start-Sleep 60"
        try { Wait-FaultFile -Path $ready -Process $child | Should -BeTrue -Because (Get-Content -Raw $child.Err -ErrorAction SilentlyContinue) }
        finally { Stop-FaultChild $child }
        $s = Invoke-DscClass @"
`$safe = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily'; CrashSafe = `$true }
Invoke-Step get3 { `$safe.Get() }
Invoke-Step test3 { `$safe.Test() }
Invoke-Step set3 { `$safe.Set() }
`$plain = New-Resource DirtyBitmap @{ Path = '$img'; Name = 'daily' }
Invoke-Step test4 { `$plain.Test() }
Invoke-Step set4 { `$plain.Set() }
Invoke-Step get4 { `$plain.Get() }
"@
        $s.get3.Result.InUse | Should -BeTrue
        $s.get3.Result.Recoverable | Should -BeTrue
        $s.get3.Result.Inconsistent | Should -BeFalse
        $s.test3.Result | Should -BeTrue
        $s.set3.Warnings | Should -BeNullOrEmpty
        $s.test4.Result | Should -BeFalse
        $s.test4.Verbose | Should -Contain "bitmap 'daily' of '$img' is crash-safe, and should not be."
        $s.set4.Error | Should -BeNullOrEmpty
        ($s.set4.Warnings -join "`n") | Should -Not -BeLike "*made anew*"
        $s.get4.Result.CrashSafe | Should -BeFalse
        $s.get4.Result.InUse | Should -BeFalse
        $s.get4.Result.Count | Should -BeGreaterOrEqual (1MB + 64KB) -Because 'the recovered bits (the 1 MiB recorded, the write the crash interrupted and the regions the log named) are kept'
        Test-Path "$img.intent" | Should -BeFalse -Because 'no crash-safe bitmap is left, so the node keeps no log'
        $null = Assert-QemuImageCheck -Path $img
    }
}

Describe 'DSC class BackupChainRetention (methods called in a child pwsh)' -Skip:$NoQemu {
    AfterEach { Close-TestNode }

    It 'reports drift, merges, is idempotent, and corrects the drift of a chain that grew' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory)
        $s = Invoke-DscClass @"
`$r = New-Resource BackupChainRetention @{ Path = '$($chain.Top)'; Keep = 3 }
Invoke-Step get1 { `$r.Get() }
Invoke-Step test1 { `$r.Test() }
Invoke-Step set1 { `$r.Set() }
Invoke-Step test2 { `$r.Test() }
Invoke-Step get2 { `$r.Get() }
Invoke-Step set2 { `$r.Set() }
"@
        $s.get1.Result.Length | Should -Be 6
        $s.get1.Result.Images | Should -Be $chain.Images
        $s.test1.Result | Should -BeFalse
        $s.test1.Verbose | Should -Contain "The chain of '$($chain.Top)' has 6 images, more than 3: its 4 oldest are to be merged."
        $s.set1.Error | Should -BeNullOrEmpty
        $s.set1.Verbose[-1] | Should -BeLike "Merged the chain of '$($chain.Top)': 6 images before, 3 now; '$($chain.Images[3])' holds the merged images, 6 file(s) deleted."
        $s.test2.Result | Should -BeTrue
        $s.get2.Result.Images | Should -Be @($chain.Images[3..5])
        $s.set2.Verbose | Should -Contain "The chain of '$($chain.Top)' has 3 image(s), no more than 3: in the desired state."
        Assert-QemuImageEqual -Path $chain.Top -Reference $chain.References[5]

        # the chain grows by two backups (made by qemu-img and qemu-io): drift again
        $b6 = Join-Path $chain.Dir 'b6.qcow2'; $b7 = Join-Path $chain.Dir 'b7.qcow2'
        (Invoke-QemuImg create -q -f qcow2 -F qcow2 -b b5.qcow2 $b6).ExitCode | Should -Be 0
        $null = & qemu-io -f qcow2 -c 'write -P 0x77 64k 64k' $b6
        (Invoke-QemuImg create -q -f qcow2 -F qcow2 -b b6.qcow2 $b7).ExitCode | Should -Be 0
        $null = & qemu-io -f qcow2 -c 'write -P 0x78 1m 4k' $b7
        $reference = Join-Path $chain.Dir 'ref7.raw'
        & qemu-img convert -O raw $b7 $reference
        $LASTEXITCODE | Should -Be 0
        $s = Invoke-DscClass @"
`$r = New-Resource BackupChainRetention @{ Path = '$b7'; Keep = 3 }
Invoke-Step test1 { `$r.Test() }
Invoke-Step set1 { `$r.Set() }
Invoke-Step get1 { `$r.Get() }
"@
        $s.test1.Result | Should -BeFalse
        $s.get1.Result.Length | Should -Be 3
        $s.get1.Result.Images | Should -Be @($chain.Images[5], $b6, $b7)
        Assert-QemuImageEqual -Path $b7 -Reference $reference
        foreach ($p in $s.get1.Result.Images) { $null = Assert-QemuImageCheck -Path $p }
    }

    It 'refuses Keep 0 (InvalidKeepCount) and never merges a chain that qemu-io holds (ImageInUse)' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 3
        $qemu = Start-QemuIoHolder $chain.Images[1]
        try {
            $s = Invoke-DscClass @"
`$zero = New-Resource BackupChainRetention @{ Path = '$($chain.Top)'; Keep = 0 }
Invoke-Step test0 { `$zero.Test() }
`$r = New-Resource BackupChainRetention @{ Path = '$($chain.Top)'; Keep = 1 }
Invoke-Step get1 { `$r.Get() }
Invoke-Step set1 { `$r.Set() }
"@
        }
        finally { Stop-QemuIoHolder $qemu }
        $s.test0.Error | Should -BeLike 'InvalidKeepCount: Keep 0 is not a valid retention*'
        $s.get1.Result.Length | Should -Be 3
        $s.get1.Warnings[0] | Should -BeLike "An image of the chain of '$($chain.Top)' is open for writing elsewhere*will not be merged*"
        $s.set1.Error | Should -BeLike 'ImageInUse,BitmapBackup.MergeBackupChainCommand: *'
        @(Get-BackupChain -Path $chain.Top).Count | Should -Be 3
    }
}

Describe 'DSC v3 resource manifests' -Skip:$NoQemu {
    BeforeAll {
        $script:SchemaFile = Join-Path $PSScriptRoot 'Data/dsc-resource-manifest.v3.1.0.schema.json'
        $script:BitmapManifest = Join-Path $script:ModuleFolder 'BitmapBackup.DirtyBitmap.dsc.resource.json'
        $script:RetentionManifest = Join-Path $script:ModuleFolder 'BitmapBackup.BackupChainRetention.dsc.resource.json'
    }
    AfterEach { Close-TestNode }

    It '<Name> is valid against DSC''s resource manifest schema, names the module''s version, and runs the same class' -ForEach @(
        @{ Name = 'BitmapBackup.DirtyBitmap.dsc.resource.json'; Type = 'BitmapBackup/DirtyBitmap'; Class = 'DirtyBitmap' },
        @{ Name = 'BitmapBackup.BackupChainRetention.dsc.resource.json'; Type = 'BitmapBackup/BackupChainRetention'; Class = 'BackupChainRetention' }
    ) {
        $path = Join-Path $script:ModuleFolder $Name
        Test-Json -Path $path -SchemaFile $script:SchemaFile -ErrorAction Stop | Should -BeTrue
        $manifest = Get-Content -Raw $path | ConvertFrom-Json
        $manifest.type | Should -Be $Type
        $manifest.version | Should -Be (Import-PowerShellDataFile (Get-BitmapBackupModulePath)).ModuleVersion
        foreach ($op in 'get', 'test', 'set') {
            @($manifest.$op.args)[-3..-1] | Should -Be @('./BitmapBackup.Dsc.ps1', $op, $Class)
        }
        $manifest.set.implementsPretest | Should -BeTrue
        # every configurable property of the class is in the instance schema, and nothing else but the read-only ones
        $type = & (Get-Module BitmapBackup) { param($n) $n -as [type] } $Class
        $classProperties = @($type.GetProperties() | Where-Object { $_.IsDefined([System.Management.Automation.DscPropertyAttribute], $true) } | ForEach-Object Name)
        @($manifest.schema.embedded.properties.PSObject.Properties.Name | Where-Object { $_ -ne '_inDesiredState' } | Sort-Object) | Should -Be @($classProperties | Sort-Object)
        # a broken manifest is refused by the same schema (the check can fail)
        $manifest.type = 'not a type'
        Test-Json -Json ($manifest | ConvertTo-Json -Depth 10) -SchemaFile $script:SchemaFile -ErrorAction SilentlyContinue | Should -BeFalse
    }

    It 'DirtyBitmap: get, test and set through the manifest''s command lines, JSON in and out (absent -> present -> drift -> corrected)' {
        $img = Join-Path (New-TestDirectory) 'v3.qcow2'
        $null = New-BlockImage -Path $img -Size 4MB -Confirm:$false
        $desired = @{ Path = $img; Name = 'nightly'; Granularity = 65536 } | ConvertTo-Json -Compress

        $r = Invoke-DscManifest $script:BitmapManifest get $desired
        $r.ExitCode | Should -Be 0
        Assert-MatchesInstanceSchema $script:BitmapManifest $r.Output[0]
        $r.State.Ensure | Should -Be 'Absent'
        $r.State.Keys | Should -Contain '_inDesiredState'
        $r.State._inDesiredState | Should -BeNullOrEmpty

        $r = Invoke-DscManifest $script:BitmapManifest test $desired
        $r.ExitCode | Should -Be 0
        Assert-MatchesInstanceSchema $script:BitmapManifest $r.Output[0]
        $r.State._inDesiredState | Should -BeFalse
        Get-TraceText $r info | Should -BeLike "*bitmap 'nightly' of '$img' does not exist, and should.*"

        $r = Invoke-DscManifest $script:BitmapManifest set $desired
        $r.ExitCode | Should -Be 0 -Because (Get-TraceText $r error)
        Assert-MatchesInstanceSchema $script:BitmapManifest $r.Output[0]
        $r.State.Ensure | Should -Be 'Present'
        $r.State.Granularity | Should -Be 65536
        $r.State.Enabled | Should -BeTrue
        (Get-QemuBitmap $img)[0].name | Should -Be 'nightly'

        $r = Invoke-DscManifest $script:BitmapManifest test $desired
        $r.State._inDesiredState | Should -BeTrue

        (Invoke-QemuImg bitmap --disable $img nightly).ExitCode | Should -Be 0
        $r = Invoke-DscManifest $script:BitmapManifest test $desired
        $r.State._inDesiredState | Should -BeFalse
        $r.State.Enabled | Should -BeFalse
        $r = Invoke-DscManifest $script:BitmapManifest set $desired
        $r.ExitCode | Should -Be 0
        $r.State.Enabled | Should -BeTrue
        Get-TraceText $r info | Should -BeLike "*Enabled bitmap 'nightly' of '$img'.*"
        @((Get-QemuBitmap $img)[0].flags) | Should -Be @('auto')

        $absent = @{ Path = $img; Name = 'nightly'; Ensure = 'Absent' } | ConvertTo-Json -Compress
        $r = Invoke-DscManifest $script:BitmapManifest set $absent
        $r.ExitCode | Should -Be 0
        $r.State.Ensure | Should -Be 'Absent'
        $r = Invoke-DscManifest $script:BitmapManifest test $absent
        $r.State._inDesiredState | Should -BeTrue
        @(Get-QemuBitmap $img).Count | Should -Be 0
    }

    It 'BackupChainRetention: test reports drift and set merges, through the manifest''s command lines' {
        $chain = New-TestBackupChain -Dir (New-TestDirectory) -Count 4
        $desired = @{ Path = $chain.Top; Keep = 2 } | ConvertTo-Json -Compress
        $r = Invoke-DscManifest $script:RetentionManifest test $desired
        $r.ExitCode | Should -Be 0
        Assert-MatchesInstanceSchema $script:RetentionManifest $r.Output[0]
        $r.State._inDesiredState | Should -BeFalse
        $r.State.Length | Should -Be 4
        $r.State.Images | Should -Be $chain.Images
        $r = Invoke-DscManifest $script:RetentionManifest set $desired
        $r.ExitCode | Should -Be 0 -Because (Get-TraceText $r error)
        Assert-MatchesInstanceSchema $script:RetentionManifest $r.Output[0]
        $r.State.Length | Should -Be 2
        $r.State.Images | Should -Be @($chain.Images[2..3])
        Get-TraceText $r info | Should -BeLike "*Merged the chain of '$($chain.Top)': 4 images before, 2 now*"
        $r = Invoke-DscManifest $script:RetentionManifest test $desired
        $r.State._inDesiredState | Should -BeTrue
        Assert-QemuImageEqual -Path $chain.Top -Reference $chain.References[3]
    }

    It 'exits 2 for input that is not an instance, 3 (ImageInUse) when the image is held, and says why on stderr' {
        $img = Join-Path (New-TestDirectory) 'err.qcow2'
        $null = New-BlockImage -Path $img -Size 4MB -Confirm:$false
        $r = Invoke-DscManifest $script:BitmapManifest get '{"Path":"x","Name":"y","Colour":"blue"}'
        $r.ExitCode | Should -Be 2
        Get-TraceText $r error | Should -Be "'Colour' is not a property of DirtyBitmap."
        $r = Invoke-DscManifest $script:BitmapManifest test '{"Name":"y"}'
        $r.ExitCode | Should -Be 2
        Get-TraceText $r error | Should -Be "DirtyBitmap needs 'Path'."
        $r = Invoke-DscManifest $script:BitmapManifest set '{"Path":"x","Name":"y","Ensure":"Maybe"}'
        $r.ExitCode | Should -Be 2
        $r = Invoke-DscManifest $script:RetentionManifest test '{"Path":"x","Keep":0}'
        $r.ExitCode | Should -Be 1
        Get-TraceText $r error | Should -BeLike '*Keep 0 is not a valid retention*(InvalidKeepCount)'

        $qemu = Start-QemuIoHolder $img
        try {
            $desired = @{ Path = $img; Name = 'nightly' } | ConvertTo-Json -Compress
            $r = Invoke-DscManifest $script:BitmapManifest get $desired
            $r.ExitCode | Should -Be 0
            Get-TraceText $r warn | Should -BeLike "Image '$img' is open for writing elsewhere*"
            $r = Invoke-DscManifest $script:BitmapManifest set $desired
            $r.ExitCode | Should -Be 3
            Get-TraceText $r error | Should -BeLike '*Failed to get*(ImageInUse)'
            $r.Output | Should -BeNullOrEmpty
        }
        finally { Stop-QemuIoHolder $qemu }
        @(Get-QemuBitmap $img).Count | Should -Be 0
    }
}
