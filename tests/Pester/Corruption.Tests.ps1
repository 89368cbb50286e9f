# A corrupt qcow2 handled as QEMU handles it (issue 22), after qemu-iotests 060: images made by qemu-img and qemu-io,
# metadata bytes overwritten at the offsets 060 uses. A refused write changes nothing (the corrupt bit aside), marks the
# image corrupt and read-only; a read-only open rescues what can be read; qemu-img check -r all makes it writable again.
BeforeDiscovery {
    $NoQemu = -not (Get-Command qemu-io -ErrorAction SilentlyContinue)
}

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE

    function Set-FileBytes([string] $Path, [long] $Offset, [byte[]] $Bytes) {
        $fs = [IO.File]::Open($Path, 'Open', 'ReadWrite'); try { $fs.Position = $Offset; $fs.Write($Bytes, 0, $Bytes.Length) } finally { $fs.Close() }
    }
    function Get-BigEndian([string] $Path, [long] $Offset) {
        $b = Get-FileBytes -Path $Path -Offset $Offset -Length 8
        [array]::Reverse($b); return [BitConverter]::ToUInt64($b, 0)
    }
    function ConvertTo-BigEndianBytes([uint64] $Value) { $b = [BitConverter]::GetBytes($Value); [array]::Reverse($b); return $b }
    function Get-HashWithoutCorruptBit([string] $Path) {
        $bytes = [IO.File]::ReadAllBytes($Path); $bytes[79] = $bytes[79] -band 0xfd
        return [Convert]::ToHexString([Security.Cryptography.SHA256]::HashData($bytes))
    }
    function Test-CorruptBit([string] $Path) { return ((Get-BigEndian -Path $Path -Offset 72) -band 2) -ne 0 }
    function New-060Image([string] $Dir) {
        $p = Join-Path $Dir ('i' + [guid]::NewGuid().ToString('N').Substring(0, 8) + '.qcow2')
        & qemu-img create -q -f qcow2 -o compat=1.1 $p 64M
        & qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 64k' $p | Out-Null
        return $p
    }
}

Describe 'Corrupt qcow2 images (qemu-iotests 060)' -Skip:$NoQemu {
    BeforeEach { $dir = New-TestDirectory }
    AfterEach { Close-TestNode }

    It 'an L2 reference into the L1 table: refused at open, read-only and writable, and the process goes on' {
        $p = New-060Image $dir
        $l1 = Get-BigEndian -Path $p -Offset 40
        Set-FileBytes -Path $p -Offset $l1 -Bytes (ConvertTo-BigEndianBytes (0x8000000000000000 -bor $l1))   # L1 entry 0 onto the L1 table
        $before = Get-HashWithoutCorruptBit $p
        { Open-BlockNode -Path $p -Name bad -ErrorAction Stop } | Should -Throw -ErrorId 'ImageCorrupt,BitmapBackup.OpenBlockNodeCommand'
        { Open-BlockNode -Path $p -Name bad -ReadOnly -ErrorAction Stop } | Should -Throw -ErrorId 'ImageCorrupt,BitmapBackup.OpenBlockNodeCommand'
        Get-HashWithoutCorruptBit $p | Should -Be $before
        $good = New-060Image $dir
        $null = Open-BlockNode -Path $good -Name good
        Write-BlockNode -Node good -Offset 2MB -Pattern 3 -Length 4KB   # a good image is usable in the same process
    }

    It 'data redirected onto a refcount block: the write is refused, changes nothing, marks the image corrupt; read-only rescue works; qemu-img check -r all repairs it' {
        $p = New-060Image $dir
        $l1 = Get-BigEndian -Path $p -Offset 40
        $l2 = (Get-BigEndian -Path $p -Offset $l1) -band 0x00fffffffffffe00
        $rb = Get-BigEndian -Path $p -Offset (Get-BigEndian -Path $p -Offset 48)
        Set-FileBytes -Path $p -Offset $l2 -Bytes (ConvertTo-BigEndianBytes (0x8000000000000000 -bor $rb))   # cluster 0 onto the refcount block
        $before = Get-HashWithoutCorruptBit $p
        $checkBefore = Get-QemuImageCheck -Path $p
        $null = Open-BlockNode -Path $p -Name c
        $null = New-DirtyBitmap -Node c -Name b
        { Write-BlockNode -Node c -Offset 0 -Pattern 0x2a -Length 512 -ErrorAction Stop } |
            Should -Throw -ErrorId 'ImageCorrupt,BitmapBackup.WriteBlockNodeCommand' -ExpectedMessage '*refcount block*marked corrupt*'
        (Get-BlockNode -Name c).ReadOnly | Should -BeTrue
        (Get-DirtyBitmap -Node c -Name b).Count | Should -Be 64KB -Because 'a refused write is marked all the same'
        { Write-BlockNode -Node c -Offset 2MB -Pattern 1 -Length 512 -ErrorAction Stop } | Should -Throw -ErrorId 'ImageCorrupt,BitmapBackup.WriteBlockNodeCommand'
        Close-BlockNode c -WarningAction SilentlyContinue
        Get-HashWithoutCorruptBit $p | Should -Be $before -Because 'the refusal changed no byte but the corrupt bit'
        Test-CorruptBit $p | Should -BeTrue
        (Get-QemuImageCheck -Path $p).leaks | Should -BeLessOrEqual $checkBefore.leaks
        & qemu-io -c 'write -P 1 2M 512' $p 2>&1 | Out-String | Should -Match 'corrupt'   # QEMU sees the bit and refuses too
        { Open-BlockNode -Path $p -Name c -ErrorAction Stop } | Should -Throw -ErrorId 'ImageCorrupt,BitmapBackup.OpenBlockNodeCommand' -ExpectedMessage '*qemu-img check -r all*'
        $null = Open-BlockNode -Path $p -Name c -ReadOnly
        Read-BlockNode -Node c -Offset 1MB -Length 1 | Should -Be 0x22
        $r = Start-IncrementalBackup -Node c -Target (Join-Path $dir 'rescue.qcow2') -Sync Full -Wait -ErrorAction SilentlyContinue
        if ($r.Succeeded) {
            $null = Assert-QemuImageCheck -Path $r.Target
            (Compare-QemuImage -Path $r.Target -Reference $p).ExitCode | Should -Be 0
        }
        Close-BlockNode c
        & qemu-img check -q -r all $p 2>&1 | Out-Null
        Test-CorruptBit $p | Should -BeFalse
        $null = Open-BlockNode -Path $p -Name c
        Write-BlockNode -Node c -Offset 0 -Pattern 0x2a -Length 512
        Close-BlockNode c
        $null = Assert-QemuImageCheck -Path $p
        & qemu-io -r -c 'read -P 0x2a 0 512' $p | Out-String | Should -Not -Match 'fail'
    }

    It 'a damaged compressed cluster: a partial write into it is refused without a leak, and the image is marked corrupt' {
        $p = Join-Path $dir 'c.qcow2'
        & qemu-img create -q -f qcow2 $p 64M
        & qemu-io -c 'write -c -P 0x11 0 64k' -c 'write -P 0x22 1M 64k' $p | Out-Null
        $l1 = Get-BigEndian -Path $p -Offset 40
        $l2 = (Get-BigEndian -Path $p -Offset $l1) -band 0x00fffffffffffe00
        $data = (Get-BigEndian -Path $p -Offset $l2) -band ((1L -shl 54) - 1)
        Set-FileBytes -Path $p -Offset $data -Bytes ([byte[]]@(0xff) * 512)
        $null = Open-BlockNode -Path $p -Name z
        { Write-BlockNode -Node z -Offset 512 -Pattern 0x33 -Length 512 -ErrorAction Stop } | Should -Throw -ErrorId 'ImageCorrupt,BitmapBackup.WriteBlockNodeCommand'
        Close-BlockNode z
        Test-CorruptBit $p | Should -BeTrue
        (Get-QemuImageCheck -Path $p).leaks | Should -Be 0
    }
}
