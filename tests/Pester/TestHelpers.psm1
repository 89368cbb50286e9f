<#
.SYNOPSIS
    Shared helpers of the Pester suite: load the staged BitmapBackup module, make raw images and nodes in
    TestDrive with unique names, close every node after a test, and assert engine errors exactly.
.NOTES
    Nodes live in one engine for the whole process, so every test must close what it opens: each file calls
    Close-TestNode in AfterEach and AfterAll.
#>
Set-StrictMode -Version Latest

$script:CommandNames = @(
    'New-BlockImage', 'Open-BlockNode', 'Get-BlockNode', 'Close-BlockNode', 'Resize-BlockNode',
    'Write-BlockNode', 'Read-BlockNode',
    'New-DirtyBitmap', 'Get-DirtyBitmap', 'Enable-DirtyBitmap', 'Disable-DirtyBitmap', 'Clear-DirtyBitmap',
    'Remove-DirtyBitmap', 'Merge-DirtyBitmap', 'Get-DirtyBitmapRange'
)

function Get-BitmapBackupCommandName {
    <# The node and bitmap cmdlets this suite covers (the module may export more, e.g. the backup cmdlets). #>
    return $script:CommandNames
}

function Get-BitmapBackupModulePath {
    <# The staged module: $env:BITMAPBACKUP_MODULE, else out/BitmapBackup/BitmapBackup.psd1 of this repository. #>
    if ($env:BITMAPBACKUP_MODULE) { return $env:BITMAPBACKUP_MODULE }
    return (Join-Path $PSScriptRoot '../../out/BitmapBackup/BitmapBackup.psd1')
}

function Import-BitmapBackupModule {
    <# Load the binary module once, globally (it cannot be reloaded in a process). #>
    if (-not (Get-Module -Name BitmapBackup)) {
        Import-Module (Get-BitmapBackupModulePath) -Global -ErrorAction Stop
    }
}

function Get-TestDirectory {
    <# Pester's TestDrive when there is one, else a temp folder. #>
    $drive = Get-PSDrive -Name TestDrive -ErrorAction SilentlyContinue
    if ($drive) { return $drive.Root }
    $dir = Join-Path ([IO.Path]::GetTempPath()) 'BitmapBackup.Pester'
    $null = New-Item -ItemType Directory -Path $dir -Force
    return $dir
}

function New-TestName {
    <# A node-name-valid unique name: a letter, then 12 hex digits. #>
    param([string] $Prefix = 't')
    return $Prefix + [guid]::NewGuid().ToString('N').Substring(0, 12)
}

function New-TestDirectory {
    <# A new empty folder under the test directory. #>
    $dir = Join-Path (Get-TestDirectory) (New-TestName 'd')
    $null = New-Item -ItemType Directory -Path $dir
    return $dir
}

function New-TestImage {
    <# Create a raw image (New-BlockImage) with a unique file name; returns its full path. #>
    param(
        [long] $Size = 1MB,
        [string] $Directory = (Get-TestDirectory),
        [string] $BaseName = (New-TestName 'i'),
        [string] $Extension = '.img'
    )
    $path = Join-Path $Directory ($BaseName + $Extension)
    $null = New-BlockImage -Path $path -Size $Size -Confirm:$false -ErrorAction Stop
    return $path
}

function New-TestNode {
    <# Make a raw image in TestDrive and open it under a unique node name; returns the BlockNodeInfo. #>
    param(
        [long] $Size = 1MB,
        [string] $Name = (New-TestName 'n'),
        [switch] $ReadOnly
    )
    $path = New-TestImage -Size $Size
    return Open-BlockNode -Path $path -Name $Name -ReadOnly:$ReadOnly -ErrorAction Stop
}

function Close-TestNode {
    <# Close every open node (their non-persistent bitmaps go with them, silently). #>
    Get-BlockNode | Close-BlockNode -Confirm:$false -WarningAction SilentlyContinue -ErrorAction SilentlyContinue
}

function Get-RangeText {
    <# The dirty ranges of a bitmap as "offset+length" strings, in the order the cmdlet writes them. #>
    param([Parameter(Mandatory)] [string] $Node, [Parameter(Mandatory)] [string] $Name)
    return [string[]]@(Get-DirtyBitmapRange -Node $Node -Name $Name -ErrorAction Stop | ForEach-Object { '{0}+{1}' -f $_.Offset, $_.Length })
}

function Get-FileBytes {
    <# Bytes [Offset, Offset+Length) of a file read without the module (the file may be open by a node), one by one. #>
    param([string] $Path, [long] $Offset, [int] $Length)
    $fs = [IO.File]::Open($Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
    try {
        $buf = [byte[]]::new($Length)
        $null = $fs.Seek($Offset, [IO.SeekOrigin]::Begin)
        $done = 0
        while ($done -lt $Length) {
            $n = $fs.Read($buf, $done, $Length - $done)
            if ($n -le 0) { break }
            $done += $n
        }
        return $buf
    }
    finally { $fs.Dispose() }
}

function Find-ByteMismatch {
    <#
    Index (from Start) of the first byte of Bytes[Start, Start+Count) that is not Value, or -1 when all are.
    Fast on large arrays: compares base64 texts first, so a test pipes the result to Should -Be -1.
    #>
    param([Parameter(Mandatory)] [AllowEmptyCollection()] [byte[]] $Bytes, [int] $Start = 0, [int] $Count = -1, [byte] $Value = 0)
    if ($Count -lt 0) { $Count = $Bytes.Length - $Start }
    $expected = [byte[]]::new($Count)
    if ($Value -ne 0) { [Array]::Fill($expected, $Value) }
    if ([Convert]::ToBase64String($Bytes, $Start, $Count) -ceq [Convert]::ToBase64String($expected)) { return -1 }
    for ($i = 0; $i -lt $Count; $i++) {
        if ($Bytes[$Start + $i] -ne $Value) { return $i }
    }
    return -1
}

function Assert-BlockError {
    <#
    Run a script block that must fail with exactly the FullyQualifiedErrorId given (Should -Throw -ErrorId only
    checks a substring, so the id is compared exactly too), and whose message contains every string of
    -MessageContains (quote node and bitmap names yourself: "'n1'"). Returns the ErrorRecord.
    #>
    param(
        [Parameter(Mandatory)] [scriptblock] $ScriptBlock,
        [Parameter(Mandatory)] [string] $ErrorId,
        [string[]] $MessageContains = @(),
        [string] $Category
    )
    $record = $ScriptBlock | Should -Throw -ErrorId $ErrorId -PassThru
    $record.FullyQualifiedErrorId | Should -BeExactly $ErrorId
    foreach ($text in $MessageContains) {
        $record.Exception.Message | Should -BeLikeExactly ('*' + [WildcardPattern]::Escape($text) + '*')
    }
    if ($Category) {
        $record.CategoryInfo.Category | Should -Be $Category
    }
    return $record
}

Export-ModuleMember -Function Get-BitmapBackupCommandName, Get-BitmapBackupModulePath, Import-BitmapBackupModule, Get-TestDirectory,
    New-TestName, New-TestDirectory, New-TestImage, New-TestNode, Close-TestNode, Get-RangeText, Get-FileBytes, Find-ByteMismatch,
    Assert-BlockError

#region Backup suites (Backup*.Tests.ps1): qemu-img references and job helpers

function Invoke-QemuImg {
    <# Run qemu-img; returns ExitCode and Output (stdout and stderr as one string). Never throws on a non-zero exit. #>
    param([Parameter(Mandatory, ValueFromRemainingArguments)] [string[]] $ArgumentList)
    $lines = & qemu-img @ArgumentList 2>&1 | ForEach-Object { "$_" }
    return [pscustomobject]@{ ExitCode = $LASTEXITCODE; Output = ($lines -join "`n").Trim() }
}

function Get-ImageFileFormat {
    <# 'qcow2' when the file starts with the qcow2 magic, else 'raw' (what qemu-img -f wants). #>
    param([Parameter(Mandatory)] [string] $Path)
    $magic = Get-FileBytes -Path $Path -Offset 0 -Length 4
    if ($magic.Length -eq 4 -and $magic[0] -eq 0x51 -and $magic[1] -eq 0x46 -and $magic[2] -eq 0x49 -and $magic[3] -eq 0xfb) { return 'qcow2' }
    return 'raw'
}

function Compare-QemuImage {
    <#
    qemu-img compare of two images (each with its backing chain), formats given explicitly. Returns ExitCode
    (0 identical, 1 different, 2 error) and Output.
    #>
    param([Parameter(Mandatory)] [string] $Path, [Parameter(Mandatory)] [string] $Reference)
    return Invoke-QemuImg compare -f (Get-ImageFileFormat $Path) -F (Get-ImageFileFormat $Reference) $Path $Reference
}

function Assert-QemuImageEqual {
    <# qemu-img compare must say the image (with its chain) reads exactly like the reference. #>
    param([Parameter(Mandatory)] [string] $Path, [Parameter(Mandatory)] [string] $Reference)
    $r = Compare-QemuImage -Path $Path -Reference $Reference
    $r.ExitCode | Should -Be 0 -Because "qemu-img compare '$Path' '$Reference' said: $($r.Output)"
}

function Get-QemuImageCheck {
    <#
    qemu-img check --output=json of a qcow2 image: its JSON fields (check-errors, allocated-clusters,
    compressed-clusters, leaks, corruptions...) plus ExitCode (0 clean, 2 corrupt, 3 leaks) and Output.
    #>
    param([Parameter(Mandatory)] [string] $Path)
    $r = Invoke-QemuImg check --output=json -f qcow2 $Path
    # The JSON is on stdout; a damaged image adds lines ("Leaked cluster ...") on stderr, which Output merges.
    $json = (($r.Output -split "`n") | Where-Object { $_ -notmatch '^(Leaked cluster|ERROR|Warning|Repairing)' }) -join "`n"
    $info = $null
    try { $info = $json | ConvertFrom-Json -AsHashtable } catch { $info = @{} }
    if ($null -eq $info) { $info = @{} }
    foreach ($key in 'corruptions', 'leaks', 'check-errors', 'compressed-clusters', 'allocated-clusters') {
        if (-not $info.ContainsKey($key)) { $info[$key] = 0 }
    }
    $info['ExitCode'] = $r.ExitCode
    $info['Output'] = $r.Output
    return [pscustomobject]$info
}

function Assert-QemuImageCheck {
    <# qemu-img check must find no corruption, no leak and no error in the qcow2 image; returns the check. #>
    param([Parameter(Mandatory)] [string] $Path)
    $c = Get-QemuImageCheck -Path $Path
    $c.ExitCode | Should -Be 0 -Because "qemu-img check '$Path' said: $($c.Output)"
    $c.corruptions | Should -Be 0
    $c.leaks | Should -Be 0
    $c.'check-errors' | Should -Be 0
    return $c
}

function Get-QemuImageMap {
    <# qemu-img map --output=json of an image: its extents (start, length, depth, zero, data). #>
    param([Parameter(Mandatory)] [string] $Path)
    $r = Invoke-QemuImg map --output=json -f (Get-ImageFileFormat $Path) $Path
    if ($r.ExitCode -ne 0) { throw "qemu-img map '$Path' failed: $($r.Output)" }
    return @($r.Output | ConvertFrom-Json)
}

function Save-NodeSnapshot {
    <#
    Copy what a node reads now into a new sparse raw file (Read-BlockNode 4 MiB at a time; all-zero pieces stay
    holes): the reference that qemu-img compares a backup with, standing for QEMU's reference backups.
    Returns the path.
    #>
    param([Parameter(Mandatory)] [string] $Node, [Parameter(Mandatory)] [string] $Path)
    $size = (Get-BlockNode -Name $Node -ErrorAction Stop).Size
    $zeros = [byte[]]::new(4MB)
    $fs = [IO.File]::Open($Path, [IO.FileMode]::CreateNew, [IO.FileAccess]::Write)
    try {
        $fs.SetLength($size)
        for ($offset = 0L; $offset -lt $size; $offset += 4MB) {
            $length = [Math]::Min(4MB, $size - $offset)
            $bytes = Read-BlockNode -Node $Node -Offset $offset -Length $length -ErrorAction Stop
            if ($length -ne $zeros.Length) { $zeros = [byte[]]::new($length) }
            if (-not [Linq.Enumerable]::SequenceEqual($bytes, $zeros)) {
                $fs.Position = $offset
                $fs.Write($bytes, 0, $bytes.Length)
            }
        }
    }
    finally { $fs.Dispose() }
    return $Path
}

function Wait-BackupStatus {
    <# Poll a backup job (BackupPSJob) until its Status is one of -Status; throws after -TimeoutSeconds. #>
    param([Parameter(Mandatory)] $Job, [Parameter(Mandatory)] [string[]] $Status, [double] $TimeoutSeconds = 30)
    $deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
    while ([string]$Job.Status -notin $Status) {
        if ([DateTime]::UtcNow -gt $deadline) {
            throw "Backup job '$($Job.Name)' is still $($Job.Status) (State $($Job.JobStateInfo.State)) after $TimeoutSeconds s, not $($Status -join ' or ')."
        }
        Start-Sleep -Milliseconds 10
    }
}

function Get-ClusterRangeText {
    <#
    The "offset+length" strings Get-RangeText gives for a bitmap whose dirty clusters (indices) are given:
    contiguous clusters merge, the last range is clipped to -NodeSize.
    #>
    param([AllowEmptyCollection()] [long[]] $Cluster = @(), [long] $Granularity = 64KB, [long] $NodeSize = [long]::MaxValue)
    $sorted = @($Cluster | Sort-Object -Unique)
    $text = [Collections.Generic.List[string]]::new()
    $i = 0
    while ($i -lt $sorted.Count) {
        $j = $i
        while ($j + 1 -lt $sorted.Count -and $sorted[$j + 1] -eq $sorted[$j] + 1) { $j++ }
        $start = $sorted[$i] * $Granularity
        $end = [Math]::Min(($sorted[$j] + 1) * $Granularity, $NodeSize)
        $text.Add(('{0}+{1}' -f $start, ($end - $start)))
        $i = $j + 1
    }
    return [string[]]$text
}

function Get-WriteCluster {
    <# The cluster indices that writes (@(offset, length) pairs) touch at -Granularity, sorted and unique. #>
    param([Parameter(Mandatory)] [object[]] $Write, [long] $Granularity = 64KB)
    $set = [Collections.Generic.SortedSet[long]]::new()
    foreach ($w in $Write) {
        $first = [Math]::Floor([long]$w[0] / $Granularity)
        $last = [Math]::Floor(([long]$w[0] + [long]$w[1] - 1) / $Granularity)
        for ($c = [long]$first; $c -le $last; $c++) { $null = $set.Add($c) }
    }
    return [long[]]@($set)
}

Export-ModuleMember -Function Invoke-QemuImg, Get-ImageFileFormat, Compare-QemuImage, Assert-QemuImageEqual,
    Get-QemuImageCheck, Assert-QemuImageCheck, Get-QemuImageMap, Save-NodeSnapshot, Wait-BackupStatus, Get-ClusterRangeText,
    Get-WriteCluster

#endregion
