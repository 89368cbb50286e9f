<#
    BitmapBackup's root module: the class-based DSC resources (DscResourcesToExport). The cmdlets are the binary
    module BitmapBackup.Cmdlets.dll, a NestedModule that PowerShell loads before this file, and that the manifest
    exports; this file exports no function.

    Why a script root module: a binary module cannot define PowerShell classes, and DSC finds and instantiates
    class-based resources through the module's root script (PSDesiredStateConfiguration and the DSC v3 PowerShell
    adapter both load '<root>.psm1' by the module's name and ask it for the class).

    DirtyBitmap: a persistent bitmap exists on an image (or does not) with the stated granularity, recording state and
    crash safety (a write-intent log; changed on an existing bitmap with Set-DirtyBitmap, keeping its bits).
    BackupChainRetention: the backup chain ending at an image has at most Keep images (Set merges, Merge-BackupChain).

    Both use the module's cmdlets, so they behave as the cmdlets do: an image that another process (a VM, qemu-io, a
    node in another PowerShell) holds for writing is never changed; Get and Test still read it, without locks, and say
    so in a warning; Set fails with ImageInUse. Get/Test/Set are idempotent: Set changes nothing when Test is true.
    What they do goes to the usual streams: Verbose for each decision, Warning for what needs attention, errors thrown
    as the cmdlets' ErrorRecords (their ids are stable). BitmapBackup.Dsc.ps1 runs the same classes for DSC v3, with JSON
    in and out.
#>
Set-StrictMode -Version Latest

enum Ensure {
    Absent
    Present
}

#region Helpers (module scope, not exported)

function Test-ImageInUseError {
    <# Whether an error record (or its exception chain) is ImageInUse. #>
    param($Record)
    return $Record.FullyQualifiedErrorId -like 'ImageInUse,*'
}

function Read-StoredBitmapState {
    <#
    The bitmaps stored in an image as Get-DirtyBitmap -Path reads them, with QEMU's reader locks; when another
    process holds the image for writing, read without locks (-ForceShare) and say so. Returns Bitmaps (the
    StoredBitmapInfo objects), Exists and Shared (read without locks: the image is open for writing elsewhere).
    #>
    param([Parameter(Mandatory)] [string] $Path)
    if (-not (Test-Path -LiteralPath $Path)) {
        return [pscustomobject]@{ Bitmaps = @(); Exists = $false; Shared = $false }
    }
    try {
        $bitmaps = @(Get-DirtyBitmap -Path $Path -ErrorAction Stop)
        return [pscustomobject]@{ Bitmaps = $bitmaps; Exists = $true; Shared = $false }
    }
    catch {
        if (-not (Test-ImageInUseError $_)) { throw }
        Write-Warning "Image '$Path' is open for writing elsewhere (a virtual machine, qemu-io or another PowerShell): its bitmaps are read without locks and may be changing, and it will not be changed. $($_.Exception.Message)"
        $bitmaps = @(Get-DirtyBitmap -Path $Path -ForceShare -ErrorAction Stop -WarningAction SilentlyContinue)
        return [pscustomobject]@{ Bitmaps = $bitmaps; Exists = $true; Shared = $true }
    }
}

function Get-DirtyBitmapDrift {
    <# What differs between the desired DirtyBitmap and the current one, one sentence each; none when in the desired state. #>
    param([Parameter(Mandatory)] $Desired, [Parameter(Mandatory)] $Current)
    $what = "bitmap '$($Desired.Name)' of '$($Desired.Path)'"
    if ($Desired.Ensure -eq [Ensure]::Absent) {
        if ($Current.Ensure -eq [Ensure]::Present) { "$what exists, and should not." }
        return
    }
    if ($Current.Ensure -eq [Ensure]::Absent) {
        "$what does not exist, and should."
        return
    }
    if ($Desired.Granularity -gt 0 -and $Current.Granularity -ne $Desired.Granularity) {
        "$what has a granularity of $($Current.Granularity) bytes, not $($Desired.Granularity)."
    }
    if ($Current.CrashSafe -ne $Desired.CrashSafe) {
        if ($Desired.CrashSafe) { "$what is not crash-safe (no write-intent log lists it), and should be." } else { "$what is crash-safe, and should not be." }
    }
    if ($Current.Enabled -ne $Desired.Enabled) {
        if ($Desired.Enabled) { "$what does not record writes, and should." } else { "$what records writes, and should not." }
    }
    if ($Current.Inconsistent) {
        "$what is inconsistent (its last writer did not store it cleanly), so it cannot be used."
    }
}

function Set-DirtyBitmapState {
    <# Open the image as a node (writer locks: refused with ImageInUse when it is open for writing elsewhere), make the bitmap as desired, close it. #>
    param([Parameter(Mandatory)] $Desired)
    $path = $Desired.Path
    $node = Open-BlockNode -Path $path -ErrorAction Stop
    try {
        $existing = @(Get-DirtyBitmap -Node $node.Name -ErrorAction Stop | Where-Object Name -CEQ $Desired.Name)
        $bitmap = if ($existing.Count -gt 0) { $existing[0] } else { $null }
        if ($Desired.Ensure -eq [Ensure]::Absent) {
            if ($bitmap) {
                Remove-DirtyBitmap -Node $node.Name -Name $Desired.Name -Confirm:$false -ErrorAction Stop
                Write-Verbose "Removed bitmap '$($Desired.Name)' from '$path'."
            }
            return
        }
        if ($bitmap -and ($bitmap.Inconsistent -or ($Desired.Granularity -gt 0 -and $bitmap.Granularity -ne $Desired.Granularity))) {
            $why = if ($bitmap.Inconsistent) { 'it is inconsistent' } else { "its granularity is $($bitmap.Granularity) bytes, not $($Desired.Granularity)" }
            Remove-DirtyBitmap -Node $node.Name -Name $Desired.Name -Confirm:$false -ErrorAction Stop
            Write-Warning "Bitmap '$($Desired.Name)' of '$path' was made anew because ${why}: the writes it had recorded are forgotten, so the next backup from it must be a full one (Start-IncrementalBackup -Sync Full -BitmapMode OnSuccess)."
            $bitmap = $null
        }
        if (-not $bitmap) {
            $arguments = @{ Node = $node.Name; Name = $Desired.Name; Persistent = $true; Disabled = -not $Desired.Enabled; CrashSafe = $Desired.CrashSafe }
            if ($Desired.Granularity -gt 0) { $arguments.Granularity = $Desired.Granularity }
            $null = New-DirtyBitmap @arguments -Confirm:$false -ErrorAction Stop
            Write-Verbose "Added the persistent$(if ($Desired.CrashSafe) { ', crash-safe' }) bitmap '$($Desired.Name)' to '$path' ($(if ($Desired.Enabled) { 'recording' } else { 'disabled' }))."
            return
        }
        if ($bitmap.CrashSafe -ne $Desired.CrashSafe) {
            # Set-DirtyBitmap keeps the bits: removing and adding the bitmap again would force a full backup.
            Set-DirtyBitmap -Node $node.Name -Name $Desired.Name -CrashSafe:$Desired.CrashSafe -Confirm:$false -ErrorAction Stop
            Write-Verbose "Bitmap '$($Desired.Name)' of '$path' is $(if ($Desired.CrashSafe) { 'crash-safe now' } else { 'no longer crash-safe' }); its bits are kept."
        }
        if ($bitmap.Recording -ne $Desired.Enabled) {
            if ($Desired.Enabled) {
                Enable-DirtyBitmap -Node $node.Name -Name $Desired.Name -Confirm:$false -ErrorAction Stop
                Write-Verbose "Enabled bitmap '$($Desired.Name)' of '$path'."
            }
            else {
                Disable-DirtyBitmap -Node $node.Name -Name $Desired.Name -Confirm:$false -ErrorAction Stop
                Write-Verbose "Disabled bitmap '$($Desired.Name)' of '$path'."
            }
        }
    }
    finally {
        Close-BlockNode -Node $node.Name -Confirm:$false -ErrorAction Stop
    }
}

function Read-ChainState {
    <# The images of the chain ending at -Path (Get-BackupChain), read without locks (and said so) when an image is open for writing elsewhere. #>
    param([Parameter(Mandatory)] [string] $Path)
    if (-not (Test-Path -LiteralPath $Path)) {
        Write-Warning "There is no backup chain at '$Path': nothing to keep."
        return @()
    }
    try {
        return @(Get-BackupChain -Path $Path -ErrorAction Stop | ForEach-Object Path)
    }
    catch {
        if (-not (Test-ImageInUseError $_)) { throw }
        Write-Warning "An image of the chain of '$Path' is open for writing elsewhere (a virtual machine, qemu-io or another PowerShell): the chain is read without locks, and it will not be merged. $($_.Exception.Message)"
        return @(Get-BackupChain -Path $Path -ForceShare -ErrorAction Stop -WarningAction SilentlyContinue | ForEach-Object Path)
    }
}

function Assert-KeepCount {
    <# -Keep below 1 is refused with the id Merge-BackupChain uses. #>
    param([int] $Keep, [string] $Path)
    if ($Keep -lt 1) {
        $exception = [System.ArgumentException]::new("Keep $Keep is not a valid retention for the chain of '$Path': a chain keeps at least its newest image (Keep 1 flattens it into that image).")
        throw [System.Management.Automation.ErrorRecord]::new($exception, 'InvalidKeepCount', [System.Management.Automation.ErrorCategory]::InvalidArgument, $Keep)
    }
}

#endregion

[DscResource()]
class DirtyBitmap {
    # The image file (qcow2, or raw with its sidecar).
    [DscProperty(Key)]
    [string] $Path

    # The bitmap's name on that image.
    [DscProperty(Key)]
    [string] $Name

    # Present: the image has a persistent bitmap of that name; Absent: it has none.
    [DscProperty()]
    [Ensure] $Ensure = [Ensure]::Present

    # Bytes per bit; 0 (the default) states none: a new bitmap gets the module's default, an existing one is kept.
    [DscProperty()]
    [long] $Granularity = 0

    # Whether the bitmap records writes (the qcow2 'auto' flag).
    [DscProperty()]
    [bool] $Enabled = $true

    # Whether a write-intent log protects the bitmap, so that a crash leaves it recoverable rather than inconsistent
    # (New-DirtyBitmap -CrashSafe); changing it on an existing bitmap keeps its bits (Set-DirtyBitmap -CrashSafe).
    [DscProperty()]
    [bool] $CrashSafe = $false

    # Dirty bytes the bitmap holds (0 when it is in use: its bits are not trusted then).
    [DscProperty(NotConfigurable)]
    [long] $Count

    # Marked in use: open for writing now, or its last writer crashed.
    [DscProperty(NotConfigurable)]
    [bool] $InUse

    # In use although no writer holds the image: it was not stored cleanly, and loads inconsistent.
    [DscProperty(NotConfigurable)]
    [bool] $Inconsistent

    # In use after a crash, but crash-safe: its write-intent log rebuilds it at the next open (it is not inconsistent).
    [DscProperty(NotConfigurable)]
    [bool] $Recoverable

    [DirtyBitmap] Get() {
        $state = [DirtyBitmap]::new()
        $state.Path = $this.Path
        $state.Name = $this.Name
        $read = Read-StoredBitmapState -Path $this.Path
        if (-not $read.Exists) { Write-Verbose "Image '$($this.Path)' does not exist: it has no bitmap." }
        $found = @($read.Bitmaps | Where-Object Name -CEQ $this.Name)
        if ($found.Count -eq 0) {
            $state.Ensure = [Ensure]::Absent
            $state.Enabled = $false
            return $state
        }
        $state.Ensure = [Ensure]::Present
        $state.Granularity = $found[0].Granularity
        $state.Enabled = $found[0].Auto
        $state.Count = $found[0].Count
        $state.InUse = $found[0].InUse
        $state.CrashSafe = $found[0].CrashSafe
        $state.Recoverable = $found[0].Recoverable
        $state.Inconsistent = $found[0].InUse -and -not $read.Shared -and -not $found[0].Recoverable
        return $state
    }

    [bool] Test() {
        $drift = @(Get-DirtyBitmapDrift -Desired $this -Current $this.Get())
        foreach ($d in $drift) { Write-Verbose $d }
        if ($drift.Count -eq 0) { Write-Verbose "Bitmap '$($this.Name)' of '$($this.Path)' is in the desired state." }
        return $drift.Count -eq 0
    }

    [void] Set() {
        $drift = @(Get-DirtyBitmapDrift -Desired $this -Current $this.Get())
        if ($drift.Count -eq 0) {
            Write-Verbose "Bitmap '$($this.Name)' of '$($this.Path)' is in the desired state: nothing to change."
            return
        }
        foreach ($d in $drift) { Write-Verbose $d }
        Set-DirtyBitmapState -Desired $this
    }
}

[DscResource()]
class BackupChainRetention {
    # The top image of the chain (the newest backup).
    [DscProperty(Key)]
    [string] $Path

    # The most images the chain keeps (1 or more); Set merges the oldest (Merge-BackupChain -Keep).
    [DscProperty(Mandatory)]
    [int] $Keep

    # Images the chain has now.
    [DscProperty(NotConfigurable)]
    [int] $Length

    # The chain's images, base first.
    [DscProperty(NotConfigurable)]
    [string[]] $Images

    [BackupChainRetention] Get() {
        $state = [BackupChainRetention]::new()
        $state.Path = $this.Path
        $state.Keep = $this.Keep
        $state.Images = [string[]]@(Read-ChainState -Path $this.Path)
        $state.Length = $state.Images.Count
        return $state
    }

    [bool] Test() {
        Assert-KeepCount -Keep $this.Keep -Path $this.Path
        $state = $this.Get()
        if ($state.Length -le $this.Keep) {
            Write-Verbose "The chain of '$($this.Path)' has $($state.Length) image(s), no more than $($this.Keep): in the desired state."
            return $true
        }
        Write-Verbose "The chain of '$($this.Path)' has $($state.Length) images, more than $($this.Keep): its $($state.Length - $this.Keep + 1) oldest are to be merged."
        return $false
    }

    [void] Set() {
        if ($this.Test()) { return }
        $result = Merge-BackupChain -Path $this.Path -Keep $this.Keep -Wait -Confirm:$false -ErrorAction Stop
        Write-Verbose "Merged the chain of '$($this.Path)': $($result.ImagesBefore) images before, $($result.ImagesAfter) now; '$($result.MergedImage)' holds the merged images, $($result.Removed.Count) file(s) deleted."
    }
}
