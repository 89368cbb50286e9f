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
