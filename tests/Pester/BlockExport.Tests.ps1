# NBD export (issue 10): Start-BlockExport, Get-BlockExport and Stop-BlockExport, and the export against the real
# clients: qemu-io, qemu-img, qemu-nbd -L (qemu-utils), nbdinfo, nbdcopy, nbdfuse (libnbd-bin), mkfs.ext4 and
# e2fsck (e2fsprogs) through FUSE (fuse3). Ground truth is always the engine's own view (Get-DirtyBitmapRange,
# Read-BlockNode, the image read by qemu-img): every test compares what goes over the wire with it. The protocol's
# hostile-input table is in xunit (tests/Core.Tests/Export).
BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    function Skip-UnlessTool {
        <# Mark the current test skipped, with a message, when one of the client tools is missing. #>
        param([Parameter(Mandatory)] [string[]] $Name)
        $missing = @($Name | Where-Object { -not (Get-Command $_ -CommandType Application -ErrorAction SilentlyContinue) })
        if ($missing) {
            Set-ItResult -Skipped -Because "$($missing -join ', ') not installed (Debian packages qemu-utils, libnbd-bin, fuse3, e2fsprogs)"
        }
    }

    function Invoke-Tool {
        <#
        Run a native tool: Invoke-Tool NAME ARGUMENT...; returns ExitCode and Output (stdout and stderr as one string).
        Never throws on a non-zero exit. A simple function (no param block), so that the tool's own options (-O, -n...)
        are never taken for PowerShell parameters.
        #>
        $name = $args[0]
        $arguments = @($args | Select-Object -Skip 1 | ForEach-Object { "$_" })
        $lines = & $name @arguments 2>&1 | ForEach-Object { "$_" }
        return [pscustomobject]@{ ExitCode = $LASTEXITCODE; Output = ($lines -join "`n").Trim() }
    }

    function Invoke-ToolOk {
        <# Invoke-Tool NAME ARGUMENT..., failing the test unless the tool exits 0; returns its output. #>
        $r = Invoke-Tool @args
        $r.ExitCode | Should -Be 0 -Because "$($args -join ' ') said: $($r.Output)"
        return $r.Output
    }

    function Start-TestExport {
        <# Export a node on a unix socket in a new test folder (-Confirm:$false, -ErrorAction Stop); returns the BlockExportInfo. #>
        param([Parameter(Mandatory)] [string] $Node, [string] $Name = 'disk', [switch] $Writable, [string[]] $Bitmap = @(), [int] $MaxConnections = 16)
        $socket = Join-Path (New-TestDirectory) 's'
        $extra = @{}
        if ($Bitmap.Count -gt 0) { $extra['Bitmap'] = $Bitmap }
        return Start-BlockExport -Node $Node -Name $Name -Socket $socket -Writable:$Writable -MaxConnections $MaxConnections -Confirm:$false -ErrorAction Stop @extra
    }

    function Stop-TestExport {
        <# Stop every export (their nodes can then be closed). #>
        Get-BlockExport | Stop-BlockExport -Confirm:$false -ErrorAction SilentlyContinue
    }

    function Get-ImageOpts {
        <# qemu's --image-opts for the export, optionally reading a dirty bitmap in place of base:allocation. #>
        param([Parameter(Mandatory)] $Export, [string] $Bitmap)
        $opts = "driver=nbd,server.type=unix,server.path=$($Export.Socket),export=$($Export.Name)"
        if ($Bitmap) { $opts += ",x-dirty-bitmap=qemu:dirty-bitmap:$Bitmap" }
        return $opts
    }

    function Get-NbdMap {
        <# nbdinfo --map[=CONTEXT] --json: the extents as "offset+length:type" strings, neighbours of equal type merged. #>
        param([Parameter(Mandatory)] $Export, [string] $Context)
        $arg = if ($Context) { "--map=$Context" } else { '--map' }
        $entries = @(Invoke-ToolOk nbdinfo $arg --json $Export.Uri | ConvertFrom-Json)
        return Merge-Extent @($entries | ForEach-Object { , @([long]$_.offset, [long]$_.length, [string]$_.type) })
    }

    function Merge-Extent {
        <# Merge consecutive (offset, length, key) triples with equal keys; returns "offset+length:key" strings. #>
        param([AllowEmptyCollection()] [object[]] $Extent)
        $out = [Collections.Generic.List[string]]::new()
        $start = -1L; $end = -1L; $key = $null
        foreach ($e in $Extent) {
            if ($null -ne $key -and $e[2] -eq $key -and $e[0] -eq $end) { $end += $e[1]; continue }
            if ($null -ne $key) { $out.Add("$start+$($end - $start):$key") }
            $start = $e[0]; $end = $e[0] + $e[1]; $key = $e[2]
        }
        if ($null -ne $key) { $out.Add("$start+$($end - $start):$key") }
        return [string[]]$out
    }

    function Get-DirtyMapText {
        <# The dirty ranges of a bitmap in nbdinfo's terms: dirty (1) and clean (0) extents over the whole node. #>
        param([Parameter(Mandatory)] [string] $Node, [Parameter(Mandatory)] [string] $Name)
        $size = (Get-BlockNode -Name $Node).Size
        $extents = [Collections.Generic.List[object]]::new()
        $at = 0L
        foreach ($r in Get-DirtyBitmapRange -Node $Node -Name $Name) {
            if ($r.Offset -gt $at) { $extents.Add(@($at, ($r.Offset - $at), '0')) }
            $extents.Add(@([long]$r.Offset, [long]$r.Length, '1'))
            $at = $r.Offset + $r.Length
        }
        if ($at -lt $size) { $extents.Add(@($at, ($size - $at), '0')) }
        return Merge-Extent $extents.ToArray()
    }

    function Start-Tool {
        <#
        Start a native tool in the background, each argument passed as it is (Start-Process would split arguments
        with spaces); returns an object with the Process and its Output (a task: stdout and stderr read to the end).
        #>
        param([Parameter(Mandatory)] [string] $Name, [string[]] $ArgumentList = @())
        $psi = [Diagnostics.ProcessStartInfo]::new($Name)
        foreach ($a in $ArgumentList) { $psi.ArgumentList.Add($a) }
        $psi.RedirectStandardOutput = $true
        $psi.RedirectStandardError = $true
        $psi.UseShellExecute = $false
        $p = [Diagnostics.Process]::Start($psi)
        return [pscustomobject]@{ Process = $p; Stdout = $p.StandardOutput.ReadToEndAsync(); Stderr = $p.StandardError.ReadToEndAsync() }
    }

    function Wait-Tool {
        <# Wait for a tool started with Start-Tool; fail the test unless it exits 0; returns its output. #>
        param([Parameter(Mandatory)] $Tool, [int] $TimeoutSeconds = 120)
        if (-not $Tool.Process.WaitForExit($TimeoutSeconds * 1000)) { $Tool.Process.Kill(); throw "$($Tool.Process.StartInfo.FileName) did not end within $TimeoutSeconds s" }
        $Tool.Process.WaitForExit()
        $output = "$($Tool.Stdout.Result)$($Tool.Stderr.Result)"
        $Tool.Process.ExitCode | Should -Be 0 -Because "$($Tool.Process.StartInfo.FileName) said: $output"
        return $output
    }

    function Wait-Condition {
        <# Bounded polling: wait until the script block returns true. #>
        param([Parameter(Mandatory)] [scriptblock] $Condition, [Parameter(Mandatory)] [string] $What, [int] $TimeoutSeconds = 30)
        $deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
        while (-not (& $Condition)) {
            if ([DateTime]::UtcNow -gt $deadline) { throw "Still waiting after $TimeoutSeconds s for: $What" }
            Start-Sleep -Milliseconds 20
        }
    }
}

AfterAll {
    Stop-TestExport
    Close-TestNode
}

Describe 'Start-BlockExport, Get-BlockExport and Stop-BlockExport' {
    AfterEach { Stop-TestExport; Close-TestNode }

    It 'serves a node, lists it with its counters, and stops: the socket goes, the node can be closed' {
        $node = New-TestNode -Size 4MB
        $export = Start-TestExport -Node $node.Name -Writable
        $export | Should -BeOfType BitmapBackup.BlockExportInfo
        $export.Name | Should -Be 'disk'
        $export.Node | Should -Be $node.Name
        $export.Uri | Should -Be "nbd+unix:///disk?socket=$($export.Socket)"
        $export.Writable | Should -BeTrue
        $export.MaxConnections | Should -Be 16
        Test-Path $export.Socket | Should -BeTrue
        $listed = @(Get-BlockExport)
        $listed.Count | Should -Be 1
        $listed[0].Name | Should -Be 'disk'
        @(Get-BlockExport -Node $node.Name).Count | Should -Be 1
        @(Get-BlockNode -Name $node.Name | Get-BlockExport).Count | Should -Be 1
        Assert-BlockError { Close-BlockNode -Node $node.Name -Confirm:$false -ErrorAction Stop } -ErrorId 'NodeBusy,BitmapBackup.CloseBlockNodeCommand' `
            -MessageContains "NBD export 'disk'", "Stop-BlockExport -Name 'disk'" -Category ResourceBusy
        Assert-BlockError { Resize-BlockNode -Node $node.Name -Size 8MB -Confirm:$false -ErrorAction Stop } -ErrorId 'NodeBusy,BitmapBackup.ResizeBlockNodeCommand'

        Get-BlockExport -Name disk | Stop-BlockExport -Confirm:$false
        @(Get-BlockExport).Count | Should -Be 0
        Test-Path $export.Socket | Should -BeFalse
        Close-BlockNode -Node $node.Name -Confirm:$false
    }

    It 'names the export after the node by default and takes the node from the pipeline' {
        $node = New-TestNode -Size 1MB
        $socket = Join-Path (New-TestDirectory) 's'
        $export = Get-BlockNode -Name $node.Name | Start-BlockExport -Socket $socket -Confirm:$false
        $export.Name | Should -Be $node.Name
        $export.Writable | Should -BeFalse
        Stop-BlockExport $export -Confirm:$false
        @(Get-BlockExport).Count | Should -Be 0
    }

    It '-WhatIf starts and stops nothing' {
        $node = New-TestNode -Size 1MB
        $socket = Join-Path (New-TestDirectory) 's'
        Start-BlockExport -Node $node.Name -Socket $socket -WhatIf | Should -BeNullOrEmpty
        @(Get-BlockExport).Count | Should -Be 0
        Test-Path $socket | Should -BeFalse
        $null = Start-TestExport -Node $node.Name
        Stop-BlockExport -Name disk -WhatIf
        @(Get-BlockExport).Count | Should -Be 1
    }

    It 'listens on TCP loopback with -Port 0 (a port the system chooses)' {
        Skip-UnlessTool nbdinfo
        $node = New-TestNode -Size 2MB
        $export = Start-BlockExport -Node $node.Name -Name tcp -Port 0 -Confirm:$false
        $export.Address | Should -Match '^127\.0\.0\.1:\d+$'
        $port = [int]($export.Address -split ':')[1]
        $port | Should -BeGreaterThan 0
        $export.Uri | Should -Be "nbd://127.0.0.1:$port/tcp"
        Invoke-ToolOk nbdinfo --size $export.Uri | Should -Be '2097152'
    }

    It 'refuses with <Id>' -ForEach @(
        @{ Id = 'NodeNotFound'; Case = 'no such node' }
        @{ Id = 'ExportNameInUse'; Case = 'a second export of the same name' }
        @{ Id = 'BitmapNotFound'; Case = 'an unknown bitmap' }
        @{ Id = 'BitmapEnabledForReadOnlyExport'; Case = 'an enabled bitmap on a read-only export of a writable node' }
        @{ Id = 'BitmapBusy'; Case = 'a bitmap already exported' }
        @{ Id = 'NodeReadOnly'; Case = '-Writable on a read-only node' }
        @{ Id = 'ExportAddressInUse'; Case = 'a socket path that is a regular file' }
    ) {
        $node = New-TestNode -Size 1MB
        $ro = New-TestNode -Size 1MB -ReadOnly
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $socket = Join-Path (New-TestDirectory) 's'
        $first = Start-TestExport -Node $node.Name -Name first -Writable -Bitmap b
        $arguments = switch ($Id) {
            'NodeNotFound' { @{ Node = 'nosuch' } }
            'ExportNameInUse' { @{ Node = $node.Name; Name = 'first' } }
            'BitmapNotFound' { @{ Node = $node.Name; Bitmap = 'nosuch' } }
            'BitmapEnabledForReadOnlyExport' { $null = New-DirtyBitmap -Node $node.Name -Name e; @{ Node = $node.Name; Bitmap = 'e' } }
            'BitmapBusy' { @{ Node = $node.Name; Bitmap = 'b'; Writable = $true } }
            'NodeReadOnly' { @{ Node = $ro.Name; Writable = $true } }
            'ExportAddressInUse' { Set-Content -Path $socket -Value 'keep me'; @{ Node = $node.Name } }
        }
        $messages = switch ($Id) {
            'BitmapEnabledForReadOnlyExport' { @("Enabled bitmap 'e' incompatible with readonly export") }
            'BitmapBusy' { @("NBD export 'first'") }
            default { @() }
        }
        Assert-BlockError { Start-BlockExport @arguments -Socket $socket -Confirm:$false -ErrorAction Stop } -ErrorId "$Id,BitmapBackup.StartBlockExportCommand" -MessageContains $messages
        @(Get-BlockExport).Name | Should -Be @('first') -Because "$Case starts nothing"
        if ($Id -eq 'ExportAddressInUse') { Get-Content $socket | Should -Be 'keep me' }
        $first.Name | Should -Be 'first'
    }

    It 'ExportNotFound from Stop-BlockExport and Get-BlockExport; a wildcard that matches nothing is no error' {
        Assert-BlockError { Stop-BlockExport -Name nosuch -Confirm:$false -ErrorAction Stop } -ErrorId 'ExportNotFound,BitmapBackup.StopBlockExportCommand' -MessageContains "'nosuch'"
        Assert-BlockError { Get-BlockExport -Name nosuch -ErrorAction Stop } -ErrorId 'ExportNotFound,BitmapBackup.GetBlockExportCommand'
        @(Get-BlockExport -Name 'nos*' -ErrorAction Stop).Count | Should -Be 0
    }

    It 'keeps an exported bitmap busy for the export''s life: no clear, no backup with it; free again after Stop' {
        $node = New-TestNode -Size 2MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $null = Start-TestExport -Node $node.Name -Writable -Bitmap b
        (Get-DirtyBitmap -Node $node.Name -Name b).Busy | Should -BeTrue
        Assert-BlockError { Clear-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop } -ErrorId 'BitmapBusy,BitmapBackup.ClearDirtyBitmapCommand' -MessageContains "NBD export 'disk'"
        $target = Join-Path (New-TestDirectory) 'full.qcow2'
        { Start-IncrementalBackup -Node $node.Name -Target $target -Sync Full -Bitmap b -BitmapMode OnSuccess -Wait -Confirm:$false -ErrorAction Stop } |
            Should -Throw -ErrorId 'BitmapBusy,BitmapBackup.StartIncrementalBackupCommand'
        Stop-BlockExport disk -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Busy | Should -BeFalse
        Clear-DirtyBitmap -Node $node.Name -Name b -Confirm:$false
    }

    It 'formats exports with the BlockExportInfo table' {
        $node = New-TestNode -Size 1MB -Name (New-TestName 'f').Substring(0, 10)
        $null = Start-TestExport -Node $node.Name -Name fmt
        $text = Get-BlockExport | Out-String -Width 250
        $text | Should -Match 'Name\s+Node\s+Writable\s+Clients\s+BytesRead\s+BytesWritten\s+Uri'
        $text | Should -Match ('fmt\s+' + [regex]::Escape($node.Name) + '\s+False\s+0\s+0\s+0\s+nbd\+unix:///fmt\?socket=')
    }

    It 'completes export names' {
        $node = New-TestNode -Size 1MB
        $null = Start-TestExport -Node $node.Name -Name tabexport
        $line = 'Stop-BlockExport -Name tabex'
        $result = TabExpansion2 -inputScript $line -cursorColumn $line.Length
        @($result.CompletionMatches.CompletionText) | Should -Be @('tabexport')
    }
}

Describe 'The export against the NBD clients' {
    AfterEach { Stop-TestExport; Close-TestNode }

    It 'lists itself to nbdinfo --list and qemu-nbd -L as qemu-nbd does' {
        Skip-UnlessTool nbdinfo, qemu-nbd
        $node = New-TestNode -Size 64MB
        $null = New-DirtyBitmap -Node $node.Name -Name bm0
        $socket = Join-Path (New-TestDirectory) 's'
        $export = Start-BlockExport -Node $node.Name -Name disk -Socket $socket -Writable -Bitmap bm0 -Description 'test export' -Confirm:$false
        $list = Invoke-ToolOk nbdinfo --list --json $export.Uri | ConvertFrom-Json
        $list.structured | Should -BeTrue
        $e = @($list.exports)
        $e.Count | Should -Be 1
        $e[0].'export-name' | Should -Be 'disk'
        $e[0].description | Should -Be 'test export'
        $e[0].'export-size' | Should -Be 64MB
        @($e[0].contexts) | Should -Be @('base:allocation', 'qemu:dirty-bitmap:bm0')
        $e[0].is_read_only | Should -BeFalse
        $e[0].can_multi_conn | Should -BeTrue
        $e[0].block_size_minimum | Should -Be 1
        $e[0].block_size_maximum | Should -Be 32MB
        $l = Invoke-ToolOk qemu-nbd -L -k $socket
        $l | Should -Match "export: 'disk'"
        $l | Should -Match 'flags: 0xded \( flush fua trim zeroes df multi cache fast-zero \)'
        $l | Should -Match 'available meta contexts: 2'
    }

    It 'writes through qemu-io land in the image and in the bitmap with the same dirty ranges as Write-BlockNode' {
        Skip-UnlessTool qemu-io, qemu-img
        $a = New-TestNode -Size 8MB
        $b = New-TestNode -Size 8MB
        foreach ($n in $a, $b) {
            Write-BlockNode -Node $n.Name -Offset 6MB -Pattern 0x77 -Length 512KB -Confirm:$false
            $null = New-DirtyBitmap -Node $n.Name -Name b
            $null = New-DirtyBitmap -Node $n.Name -Name fine -Granularity 4KB
        }
        $export = Start-TestExport -Node $a.Name -Writable
        $out = Invoke-ToolOk qemu-io -f raw $export.Uri -c 'write -P 0x5a 1M 4k' -c 'write -P 0x11 5000 70000' -c 'write -z 2M 64k' `
            -c 'write -z -u 3M 64k' -c 'discard 6M 128k' -c 'write -P 0x22 7340031 3' -c 'aio_write -P 0x33 4M 8k' -c 'aio_flush' -c flush
        $out | Should -Not -Match 'fail'
        Write-BlockNode -Node $b.Name -Offset 1MB -Pattern 0x5a -Length 4KB -Confirm:$false
        Write-BlockNode -Node $b.Name -Offset 5000 -Pattern 0x11 -Length 70000 -Confirm:$false
        Write-BlockNode -Node $b.Name -Offset 2MB -Zero -Length 64KB -Confirm:$false
        Write-BlockNode -Node $b.Name -Offset 3MB -Zero -Length 64KB -Confirm:$false
        Write-BlockNode -Node $b.Name -Offset 6MB -Zero -Length 128KB -Confirm:$false
        Write-BlockNode -Node $b.Name -Offset 7340031 -Pattern 0x22 -Length 3 -Confirm:$false
        Write-BlockNode -Node $b.Name -Offset 4MB -Pattern 0x33 -Length 8KB -Confirm:$false
        foreach ($bitmap in 'b', 'fine') {
            $expected = Get-RangeText -Node $b.Name -Name $bitmap
            $expected.Count | Should -BeGreaterThan 4
            Get-RangeText -Node $a.Name -Name $bitmap | Should -Be $expected
        }
        (Get-BlockExport -Name disk).BytesWritten | Should -Be (4KB + 70000 + 3 + 8KB)
        Stop-TestExport
        Close-TestNode
        Invoke-ToolOk qemu-img compare -f raw -F raw $a.Path $b.Path | Should -Match 'Images are identical'
        Invoke-ToolOk qemu-io -r -f raw -c 'read -P 0x5a 1M 4k' -c 'read -P 0x77 6400k 128k' $a.Path | Should -Not -Match 'fail|verification'
    }

    It 'nbdinfo --map=qemu:dirty-bitmap:b matches Get-DirtyBitmapRange, and qemu-img map (REQ_ONE) shows the dirty ranges as data: false' {
        Skip-UnlessTool nbdinfo, qemu-img
        $node = New-TestNode -Size 32MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $random = [Random]::new(20261207)
        foreach ($i in 1..40) {
            Write-BlockNode -Node $node.Name -Offset ($random.Next(0, 32MB - 300KB)) -Pattern 1 -Length ($random.Next(1, 300KB)) -Confirm:$false
        }
        Disable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false
        $export = Start-TestExport -Node $node.Name -Bitmap b
        $expected = Get-DirtyMapText -Node $node.Name -Name b
        $expected.Count | Should -BeGreaterThan 10
        Get-NbdMap -Export $export -Context 'qemu:dirty-bitmap:b' | Should -Be $expected
        $totals = Invoke-ToolOk nbdinfo --map=qemu:dirty-bitmap:b --totals $export.Uri
        $totals | Should -Match ("(?m)^\s*{0}\s+\S+\s+1 dirty$" -f (Get-DirtyBitmap -Node $node.Name -Name b).Count)

        $map = @(Invoke-ToolOk qemu-img map --output=json --image-opts (Get-ImageOpts -Export $export -Bitmap b) | ConvertFrom-Json)
        $fromQemu = Merge-Extent @($map | ForEach-Object { , @([long]$_.start, [long]$_.length, $(if ($_.data) { '0' } else { '1' })) })
        $fromQemu | Should -Be $expected
    }

    It 'nbdinfo --map (base:allocation) matches qemu-img map of the <Format> image and its backing chain' -ForEach @(
        @{ Format = 'raw' }, @{ Format = 'qcow2' }
    ) {
        Skip-UnlessTool nbdinfo, qemu-img, qemu-io
        $dir = New-TestDirectory
        $path = Join-Path $dir "top.$Format"
        if ($Format -eq 'raw') {
            $null = Invoke-ToolOk qemu-img create -f raw $path 16M
            $null = Invoke-ToolOk qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 2 5M 3M' -c 'write -P 3 15M 1M' $path
        }
        else {
            $base = Join-Path $dir 'base.qcow2'
            $null = Invoke-ToolOk qemu-img create -f qcow2 $base 16M
            $null = Invoke-ToolOk qemu-io -f qcow2 -c 'write -P 1 1M 64k' -c 'write -P 2 5M 3M' -c 'write -P 9 12M 1M' $base
            $null = Invoke-ToolOk qemu-img create -f qcow2 -b base.qcow2 -F qcow2 $path
            $null = Invoke-ToolOk qemu-io -f qcow2 -c 'write -P 3 15M 1M' -c 'write -z 6M 64k' -c 'write -z -u 12M 512k' -c 'write -P 4 2M 4k' $path
        }
        $node = Open-BlockNode -Path $path
        $export = Start-TestExport -Node $node.Name
        $map = @(Invoke-ToolOk qemu-img map --output=json -U -f $Format $path | ConvertFrom-Json)
        $expected = Merge-Extent @($map | ForEach-Object { , @([long]$_.start, [long]$_.length, $(if ($_.data) { '0' } elseif ($_.zero) { '3' } else { 'x' })) })
        $expected.Count | Should -BeGreaterThan 3
        Get-NbdMap -Export $export | Should -Be $expected
    }

    It 'nbdcopy and qemu-img convert write into the export and read it back; the bitmap holds every cluster written' {
        Skip-UnlessTool nbdcopy, qemu-img
        $dir = New-TestDirectory
        $source = Join-Path $dir 'source.raw'
        $bytes = [byte[]]::new(8MB)
        [Random]::new(7).NextBytes($bytes)
        [Array]::Clear($bytes, 3MB, 1MB) # a zero run nbdcopy sends as WRITE_ZEROES
        [IO.File]::WriteAllBytes($source, $bytes)
        $node = New-TestNode -Size 8MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $export = Start-TestExport -Node $node.Name -Writable
        $null = Invoke-ToolOk nbdcopy $source $export.Uri
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+8388608')
        $copy = Join-Path $dir 'copy.raw'
        $null = Invoke-ToolOk nbdcopy $export.Uri $copy
        Invoke-ToolOk qemu-img compare -f raw -F raw $copy $source | Should -Match 'Images are identical'

        $second = New-TestNode -Size 8MB
        $null = New-DirtyBitmap -Node $second.Name -Name b
        $export2 = Start-TestExport -Node $second.Name -Name second -Writable
        $null = Invoke-ToolOk qemu-img convert -n -f raw -O raw $source $export2.Uri
        Invoke-ToolOk qemu-img compare -f raw -F raw $export2.Uri $source | Should -Match 'Images are identical'
        (Get-DirtyBitmap -Node $second.Name -Name b).Count | Should -BeGreaterOrEqual 7MB
        $converted = Join-Path $dir 'converted.qcow2'
        $null = Invoke-ToolOk qemu-img convert -f raw -O qcow2 $export2.Uri $converted
        Invoke-ToolOk qemu-img compare -f qcow2 -F raw $converted $source | Should -Match 'Images are identical'
    }

    It 'two qemu-io writers and an nbdcopy reader at once: every write lands and is tracked' {
        Skip-UnlessTool qemu-io, nbdcopy, qemu-img
        $node = New-TestNode -Size 16MB
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 0x44 -Length 16MB -Confirm:$false
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $export = Start-TestExport -Node $node.Name -Writable
        $writers = foreach ($w in 0, 1) {
            $commands = foreach ($i in 0..15) { '-c'; "write -P $(0x50 + $w) $(($w * 8MB) + ($i * 256KB)) 64k" }
            Start-Tool qemu-io (@('-f', 'raw') + @($commands) + @($export.Uri))
        }
        $reader = Start-Tool nbdcopy @($export.Uri, 'null:')
        foreach ($tool in @($writers) + $reader) {
            Wait-Tool $tool | Should -Not -Match 'fail'
        }
        $expected = foreach ($w in 0, 1) { foreach ($i in 0..15) { '{0}+65536' -f (($w * 8MB) + ($i * 256KB)) } }
        Get-RangeText -Node $node.Name -Name b | Should -Be @($expected)
        foreach ($w in 0, 1) {
            $read = Invoke-ToolOk qemu-io -f raw -c "read -P $(0x50 + $w) $($w * 8MB) 64k" -c "read -P 0x44 $(($w * 8MB) + 64KB) 192k" -c "read -P $(0x50 + $w) $(($w * 8MB) + 15 * 256KB) 64k" $export.Uri
            $read | Should -Not -Match 'fail|verification'
        }
        (Get-BlockExport -Name disk).Connections | Should -BeGreaterOrEqual 4
    }

    It 'answers a failed write with <Errno>, marks its range, and goes on serving the connection' -ForEach @(
        @{ Errno = 'ENOSPC'; Fault = 'No space left on device'; Expected = 'No space left on device' }
        @{ Errno = 'EIO'; Fault = 'Input/output error (injected)'; Expected = 'Input/output error' }
    ) {
        Skip-UnlessTool qemu-io
        $node = New-TestNode -Size 4MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $export = Start-TestExport -Node $node.Name -Writable
        $rule = [BitmapBackup.Core.Testing.FaultInjection]::Add($node.Path, [BitmapBackup.Core.Testing.FaultOperation]::FileWrite, 1MB, 1, 1, $Fault)
        try {
            $r = Invoke-Tool qemu-io -f raw -c 'write -P 7 1M 64k' -c 'write -P 8 2M 4k' $export.Uri
        }
        finally { [BitmapBackup.Core.Testing.FaultInjection]::Remove($rule) }
        $rule.Hits | Should -Be 1
        $r.Output | Should -Match "write failed: $Expected"
        $r.Output | Should -Match 'wrote 4096/4096 bytes at offset 2097152'
        Get-RangeText -Node $node.Name -Name b | Should -Be @('1048576+65536', '2097152+65536')
    }

    It 'a read-only node gives a read-only export: nbdinfo says so and qemu-io cannot write' {
        Skip-UnlessTool nbdinfo, qemu-io
        $node = New-TestNode -Size 1MB -ReadOnly
        $export = Start-TestExport -Node $node.Name
        $export.Writable | Should -BeFalse
        (Invoke-Tool nbdinfo --is read-only $export.Uri).ExitCode | Should -Be 0
        (Invoke-Tool nbdinfo --can trim $export.Uri).ExitCode | Should -Be 2
        $r = Invoke-Tool qemu-io -f raw -c 'write -P 1 0 4k' $export.Uri
        ($r.ExitCode -ne 0 -or $r.Output -match 'read-only|not permitted|denied') | Should -BeTrue -Because $r.Output
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 0 -Length 4KB) | Should -Be -1
    }

    It 'refuses an unknown export and an unknown bitmap the way clients report them' {
        Skip-UnlessTool nbdinfo, qemu-img
        $node = New-TestNode -Size 1MB
        $export = Start-TestExport -Node $node.Name
        $r = Invoke-Tool nbdinfo "nbd+unix:///nosuch?socket=$($export.Socket)"
        $r.ExitCode | Should -Be 1
        $r.Output | Should -Match 'server replied with error to opt_go request.*export: nosuch'
        $q = Invoke-Tool qemu-img info "nbd+unix:///nosuch?socket=$($export.Socket)"
        $q.ExitCode | Should -Be 1
        $q.Output | Should -Match "export 'nosuch' not present"
        $m = Invoke-Tool nbdinfo --map=qemu:dirty-bitmap:nosuch $export.Uri
        $m.ExitCode | Should -Be 1
        $m.Output | Should -Match 'qemu:dirty-bitmap:nosuch'
    }

    It 'an ext4 made and filled through nbdfuse, backed up incrementally while files are written, restores clean and equal to the node at each point in time' {
        Skip-UnlessTool nbdfuse, mkfs.ext4, e2fsck, qemu-img, fsfreeze, mount, umount, findmnt
        $dir = New-TestDirectory
        $image = Join-Path $dir 'disk.qcow2'
        $null = New-BlockImage -Path $image -Size 64MB -Confirm:$false
        $node = Open-BlockNode -Path $image -Name fsdisk
        $null = New-DirtyBitmap -Node fsdisk -Name b -Persistent
        $export = Start-TestExport -Node fsdisk -Writable
        $fuse = Join-Path $dir 'fuse'
        $fs = Join-Path $dir 'fs'
        $null = New-Item -ItemType Directory -Path $fuse, $fs
        $nbdfuse = Start-Tool nbdfuse @($fuse, $export.Uri)
        $writer = $null
        $mounted = $false
        try {
            Wait-Condition { Test-Path (Join-Path $fuse 'nbd') } -What 'nbdfuse serves the export as a file'
            $null = Invoke-ToolOk mkfs.ext4 -q -F (Join-Path $fuse 'nbd')
            $null = Invoke-ToolOk mount -o loop (Join-Path $fuse 'nbd') $fs
            $mounted = $true
            # The writer: files of 512 KiB of random data, one after another, each synced, until it is killed.
            $writerScript = Join-Path $dir 'writer.sh'
            Set-Content -Path $writerScript -Value 'i=0; while true; do head -c 524288 /dev/urandom > "$1/f$i"; sync -f "$1/f$i"; i=$((i+1)); done'
            $writer = Start-Tool bash @($writerScript, $fs)
            $chain = @()
            foreach ($step in 'full', 'inc1', 'inc2') {
                Wait-Condition { @(Get-ChildItem $fs -Filter 'f*').Count -ge ($chain.Count + 1) * 3 } -What "the writer has written files before the $step backup"
                # The point in time: the file system frozen (clean, nothing in flight), its reference taken, the backup started.
                $null = Invoke-ToolOk fsfreeze -f $fs
                try {
                    $reference = Save-NodeSnapshot -Node fsdisk -Path (Join-Path $dir "$step.reference.raw")
                    $target = Join-Path $dir "$step.qcow2"
                    $backup = if ($step -eq 'full') {
                        @{ Sync = 'Full'; BitmapMode = 'OnSuccess' }
                    }
                    else {
                        @{ Sync = 'Incremental'; BackingFile = Split-Path $chain[-1] -Leaf }
                    }
                    $job = Start-IncrementalBackup -Node fsdisk -Target $target -Bitmap b -BytesPerSecond 8MB -Confirm:$false @backup
                    Suspend-IncrementalBackup -Job $job -Confirm:$false
                }
                finally { $null = Invoke-ToolOk fsfreeze -u $fs }
                [string]$job.Status | Should -Be 'Paused' -Because "the $step backup must still be copying while the files below are written"
                # While the backup is paused, the writer goes on: the node moves away from the point in time.
                $count = @(Get-ChildItem $fs -Filter 'f*').Count
                Wait-Condition { @(Get-ChildItem $fs -Filter 'f*').Count -ge $count + 2 } -What "the writer writes during the $step backup"
                (Invoke-Tool qemu-img compare -f raw -F raw $export.Uri $reference).ExitCode | Should -Be 1 -Because 'the node changed after the point in time'
                Resume-IncrementalBackup -Job $job -Confirm:$false
                $result = $job | Wait-Job -Timeout 120 | Receive-Job
                $result.Succeeded | Should -BeTrue
                Remove-Job $job
                $chain += $target
                Assert-QemuImageEqual -Path $target -Reference $reference
                $restored = Join-Path $dir "$step.restored.raw"
                $null = Restore-IncrementalBackup -Path $target -Destination $restored -Wait -Confirm:$false
                $check = Invoke-Tool e2fsck -fn $restored
                $check.ExitCode | Should -Be 0 -Because $check.Output
                Remove-Item $restored, $reference
            }
        }
        finally {
            if ($writer) { $writer.Process.Kill($true); $writer.Process.WaitForExit() } # bash and its head, which may hold a file open
            # Unmount the file system, then the FUSE file (the loop device lets go of it shortly after): retry each, so
            # that no mount is left in TestDrive; a lazy unmount as the last resort.
            foreach ($mount in @(if ($mounted) { $fs }) + $fuse) {
                $deadline = [DateTime]::UtcNow.AddSeconds(20)
                while ($true) {
                    & umount $mount 2>$null
                    if ($LASTEXITCODE -eq 0 -or -not (& findmnt -n $mount)) { break }
                    if ([DateTime]::UtcNow -gt $deadline) { & umount -l $mount 2>$null; break }
                    Start-Sleep -Milliseconds 100
                }
            }
            if (-not $nbdfuse.Process.WaitForExit(10000)) { $nbdfuse.Process.Kill() }
        }
        $final = Save-NodeSnapshot -Node fsdisk -Path (Join-Path $dir 'final.raw')
        $check = Invoke-Tool e2fsck -fn $final
        $check.ExitCode | Should -Be 0 -Because "the node itself after umount: $($check.Output)"
    }
}

Describe 'Exports end with the module and with the process' {
    It 'stops the exports before it closes the nodes: at Remove-Module and when PowerShell exits' {
        $dir = New-TestDirectory
        $image = Join-Path $dir 'p.img'
        $socket = Join-Path $dir 's'
        $script = Join-Path $dir 'child.ps1'
        Set-Content -Path $script -Value @"
`$ErrorActionPreference = 'Stop'
Import-Module '$(Get-BitmapBackupModulePath)'
`$null = New-BlockImage -Path '$image' -Size 1MB -Confirm:`$false
`$null = Open-BlockNode -Path '$image' -Name p
`$null = New-DirtyBitmap -Node p -Name keep -Persistent
`$null = Start-BlockExport -Node p -Socket '$socket' -Bitmap keep -Writable -Confirm:`$false
"socket `$(Test-Path '$socket')"
Remove-Module BitmapBackup
"after-remove socket `$(Test-Path '$socket')"
Import-Module '$(Get-BitmapBackupModulePath)'
"nodes `$(@(Get-BlockNode).Count) exports `$(@(Get-BlockExport).Count)"
`$null = Open-BlockNode -Path '$image' -Name p
`$null = Start-BlockExport -Node p -Socket '$socket' -Bitmap keep -Writable -Confirm:`$false
"socket `$(Test-Path '$socket')"
"@
        $out = & dotnet (Join-Path $PSHOME 'pwsh.dll') -NoProfile -NonInteractive -File $script 2>&1 | ForEach-Object { "$_" }
        $LASTEXITCODE | Should -Be 0 -Because ($out -join "`n")
        $out | Should -Contain 'socket True'
        $out | Should -Contain 'after-remove socket False'
        $out | Should -Contain 'nodes 0 exports 0'
        Test-Path $socket | Should -BeFalse -Because 'the process exit stopped the export'
        $stored = Get-DirtyBitmap -Path $image
        $stored.Name | Should -Be 'keep'
        $stored.InUse | Should -BeFalse -Because 'the node was closed cleanly after the export stopped'
    }
}
