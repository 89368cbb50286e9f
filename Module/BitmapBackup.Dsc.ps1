<#
.SYNOPSIS
    The DSC v3 command of BitmapBackup's resources: get, test or set one instance, JSON in on stdin, JSON out on stdout.
.DESCRIPTION
    The resource manifests (BitmapBackup.DirtyBitmap.dsc.resource.json, BitmapBackup.BackupChainRetention.dsc.resource.json)
    run it as
        pwsh -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -File ./BitmapBackup.Dsc.ps1 <get|test|set> <Resource>
    in the module's folder (DSC runs a command resource's commands in the folder of its manifest), with the instance as
    one JSON object on stdin. It imports the module from this folder and runs the module's own class, the one a
    class-based DSC engine runs: each property of the JSON object is set on a new [DirtyBitmap] or
    [BackupChainRetention], then Get(), Test() or Set() is called.

    stdout, one JSON line: get, the actual state; test, the actual state with "_inDesiredState"; set, the state after
    Set() (Set tests first, so the manifest says implementsPretest). "_inDesiredState" is null for get and set, as DSC
    asks of a resource that implements test. stderr: the class's warnings, verbose messages and
    errors as DSC trace lines ({"warn": ...}, {"info": ...}, {"error": ...}). Exit code: 0 done; 1 failed; 2 the input
    is not an instance of the resource; 3 the image is in use (open for writing elsewhere: nothing was changed).
.EXAMPLE
    '{"Path":"/backup/vm1.qcow2","Name":"daily"}' | pwsh -NoProfile -File ./BitmapBackup.Dsc.ps1 test DirtyBitmap
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory, Position = 0)]
    [ValidateSet('get', 'test', 'set')]
    [string] $Operation,

    [Parameter(Mandatory, Position = 1)]
    [ValidateSet('DirtyBitmap', 'BackupChainRetention')]
    [string] $Resource
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$global:VerbosePreference = 'Continue'   # the classes run in the module's scope, which sees the global preference
$global:ProgressPreference = 'SilentlyContinue'
$PSStyle.OutputRendering = 'PlainText'

function Write-Trace([string] $Level, [string] $Message) {
    [Console]::Error.WriteLine((@{ $Level = $Message } | ConvertTo-Json -Compress))
}

function Exit-WithError([int] $Code, [string] $Message) {
    Write-Trace error $Message
    exit $Code
}

function ConvertTo-StateJson($Instance, [type] $Type, [hashtable] $Extra = @{}) {
    # The resource's DSC properties in declaration order (enums as their names), then the extra canonical ones.
    $state = [ordered]@{}
    foreach ($p in $Type.GetProperties()) {
        if (-not $p.IsDefined([System.Management.Automation.DscPropertyAttribute], $true)) { continue }
        $value = $Instance.($p.Name)
        if ($value -is [enum]) { $value = $value.ToString() }
        $state[$p.Name] = $value
    }
    foreach ($k in $Extra.Keys) { $state[$k] = $Extra[$k] }
    return ($state | ConvertTo-Json -Compress -Depth 4)
}

# The instance.
$text = [Console]::In.ReadToEnd()
if ([string]::IsNullOrWhiteSpace($text)) { Exit-WithError 2 "No instance on stdin: $Resource needs a JSON object." }
try { $desired = $text | ConvertFrom-Json -AsHashtable -ErrorAction Stop }
catch { Exit-WithError 2 "The input is not JSON: $($_.Exception.Message)" }
if ($desired -isnot [System.Collections.IDictionary]) { Exit-WithError 2 "The input must be a JSON object (an instance of $Resource)." }

$module = Import-Module (Join-Path $PSScriptRoot 'BitmapBackup.psd1') -PassThru -ErrorAction Stop -Verbose:$false 4>$null
$type = & $module { param($Name) $Name -as [type] } $Resource
$instance = $type::new()
foreach ($name in $desired.Keys) {
    if ($name.StartsWith('_')) { continue }   # canonical read-only properties (_inDesiredState) are state, not desired state
    $property = $type.GetProperty($name)
    $attribute = if ($property) { $property.GetCustomAttributes([System.Management.Automation.DscPropertyAttribute], $true) | Select-Object -First 1 }
    if (-not $attribute) { Exit-WithError 2 "'$name' is not a property of $Resource." }
    if ($attribute.NotConfigurable) { continue }   # read-only: reported by get, not set
    try { $instance.$name = $desired[$name] }
    catch { Exit-WithError 2 "'$name' of $Resource cannot be $(ConvertTo-Json $desired[$name] -Compress): $($_.Exception.Message)" }
}
foreach ($p in $type.GetProperties()) {
    $attribute = $p.GetCustomAttributes([System.Management.Automation.DscPropertyAttribute], $true) | Select-Object -First 1
    if ($attribute -and ($attribute.Key -or $attribute.Mandatory) -and -not $desired.Contains($p.Name)) {
        Exit-WithError 2 "$Resource needs '$($p.Name)'."
    }
}

# The operation, its streams turned into trace lines.
try {
    & {
        switch ($Operation) {
            'get' { ConvertTo-StateJson $instance.Get() $type @{ _inDesiredState = $null } }
            'test' {
                $inDesiredState = $instance.Test()
                ConvertTo-StateJson $instance.Get() $type @{ _inDesiredState = $inDesiredState }
            }
            'set' {
                $instance.Set()
                ConvertTo-StateJson $instance.Get() $type @{ _inDesiredState = $null }
            }
        }
    } 3>&1 4>&1 6>&1 | ForEach-Object {
        if ($_ -is [System.Management.Automation.WarningRecord]) { Write-Trace warn $_.Message }
        elseif ($_ -is [System.Management.Automation.VerboseRecord]) { Write-Trace info $_.Message }
        elseif ($_ -is [System.Management.Automation.InformationRecord]) { Write-Trace info "$($_.MessageData)" }
        else { [Console]::Out.WriteLine($_) }
    }
}
catch {
    $id = $_.FullyQualifiedErrorId
    $code = if ($id -like 'ImageInUse*') { 3 } else { 1 }
    Exit-WithError $code "$($_.Exception.Message) ($($id -replace ',.*$', ''))"
}
exit 0
