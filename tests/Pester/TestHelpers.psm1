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
    <# The cmdlets the manifest must export, exactly. #>
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
    <# Bytes [Offset, Offset+Length) of a file read without the module (the file may be open by a node). #>
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
        return , $buf
    }
    finally { $fs.Dispose() }
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
    New-TestName, New-TestDirectory, New-TestImage, New-TestNode, Close-TestNode, Get-RangeText, Get-FileBytes, Assert-BlockError
