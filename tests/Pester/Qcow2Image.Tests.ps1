# qcow2 images through the cmdlets, with qemu-img as the oracle.
BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-Module $env:BITMAPBACKUP_MODULE
    function Get-QemuInfo([string] $Path) { & qemu-img info --output=json -U $Path | ConvertFrom-Json }
}

Describe 'qcow2 images' -Skip:(-not (Get-Command qemu-img -ErrorAction SilentlyContinue)) {
    BeforeEach { $dir = New-TestDirectory }
    AfterEach { Close-TestNode }

    It 'creates qcow2 v3 from -Format or a <Extension> extension, as qemu-img info reads it' -ForEach @(
        @{ Extension = '.qcow2'; Format = $null }, @{ Extension = '.QCOW2'; Format = $null }, @{ Extension = '.disk'; Format = 'Qcow2' }
    ) {
        $path = Join-Path $dir "a$Extension"
        $splat = @{ Path = $path; Size = 96MB }
        if ($Format) { $splat.Format = $Format }
        $image = New-BlockImage @splat
        $image.Format | Should -Be 'Qcow2'
        $image.ClusterSize | Should -Be 65536
        $info = Get-QemuInfo $path
        $info.format | Should -Be 'qcow2'
        $info.'virtual-size' | Should -Be 96MB
        $info.'cluster-size' | Should -Be 65536
        $info.'format-specific'.data.compat | Should -Be '1.1'
        & qemu-img check -q $path; $LASTEXITCODE | Should -Be 0
    }

    It 'creates an overlay whose size, backing file and backing format come from -BackingFile' {
        $base = New-BlockImage -Path (Join-Path $dir 'base.img') -Size 8MB
        $overlay = New-BlockImage -Path (Join-Path $dir 'top.qcow2') -BackingFile base.img -ClusterSize 4KB
        $overlay.Size | Should -Be 8MB
        $overlay.BackingFile | Should -Be 'base.img'
        $overlay.BackingChain.Path | Should -Be $base.Path
        $info = Get-QemuInfo $overlay.Path
        $info.'backing-filename' | Should -Be 'base.img'
        $info.'backing-filename-format' | Should -Be 'raw'
        $info.'cluster-size' | Should -Be 4096
    }

    It 'refuses a backing file that does not exist and creates nothing' {
        $path = Join-Path $dir 'top.qcow2'
        Assert-BlockError { New-BlockImage -Path $path -Size 1MB -BackingFile nothere.qcow2 -ErrorAction Stop } `
            -ErrorId 'BackingFileNotFound,BitmapBackup.NewBlockImageCommand' -MessageContains "'nothere.qcow2'"
        Test-Path $path | Should -BeFalse
    }

    It 'reads and writes through the chain the same as a raw disk, clean by qemu-img check and equal by qemu-img compare' {
        $null = New-BlockImage -Path (Join-Path $dir 'base.qcow2') -Size 16MB -ClusterSize 512
        $null = Open-BlockNode -Path (Join-Path $dir 'base.qcow2') -Name base
        Write-BlockNode -Node base -Offset 0 -Pattern 0x11 -Length 3MB
        Close-BlockNode base
        $null = New-BlockImage -Path (Join-Path $dir 'top.qcow2') -BackingFile base.qcow2
        $null = New-BlockImage -Path (Join-Path $dir 'mirror.img') -Size 16MB
        $top = Open-BlockNode -Path (Join-Path $dir 'top.qcow2') -Name top
        $top.Format | Should -Be 'Qcow2'
        $top.BackingFile | Should -Be 'base.qcow2'
        $null = Open-BlockNode -Path (Join-Path $dir 'mirror.img') -Name mirror
        Write-BlockNode -Node mirror -Offset 0 -Pattern 0x11 -Length 3MB
        $rng = [Random]::new(11)
        foreach ($i in 1..60) {
            $offset = $rng.Next(0, 16MB - 70000)
            $length = $rng.Next(1, 70000)
            switch ($rng.Next(3)) {
                0 { $data = [byte[]]::new($length); $rng.NextBytes($data); foreach ($n in 'top', 'mirror') { Write-BlockNode -Node $n -Offset $offset -Data $data } }
                1 { foreach ($n in 'top', 'mirror') { Write-BlockNode -Node $n -Offset $offset -Pattern ($i % 256) -Length $length } }
                2 { foreach ($n in 'top', 'mirror') { Write-BlockNode -Node $n -Offset $offset -Zero -Length $length } }
            }
        }
        $a = Read-BlockNode -Node top -Offset 0 -Length 16MB
        $b = Read-BlockNode -Node mirror -Offset 0 -Length 16MB
        [Linq.Enumerable]::SequenceEqual($a, $b) | Should -BeTrue
        Close-BlockNode top, mirror
        & qemu-img check -q (Join-Path $dir 'top.qcow2'); $LASTEXITCODE | Should -Be 0
        & qemu-img compare -q (Join-Path $dir 'top.qcow2') (Join-Path $dir 'mirror.img'); $LASTEXITCODE | Should -Be 0
    }

    It 'opens images qemu-img made, compressed ones included, and reads them like qemu-img convert does' {
        $raw = Join-Path $dir 'src.raw'
        & qemu-img create -q -f raw $raw 4M
        & qemu-io -f raw -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0x33 3M 64k' $raw | Out-Null
        & qemu-img convert -c -f raw -O qcow2 $raw (Join-Path $dir 'c.qcow2')
        $node = Open-BlockNode -Path (Join-Path $dir 'c.qcow2') -Name c -ReadOnly
        $node.Format | Should -Be 'Qcow2'
        $bytes = Read-BlockNode -Node c -Offset 0 -Length 4MB
        [Linq.Enumerable]::SequenceEqual($bytes, [IO.File]::ReadAllBytes($raw)) | Should -BeTrue
    }

    It 'grows a qcow2 node and its bitmaps, and refuses to cut off data' {
        $null = New-BlockImage -Path (Join-Path $dir 'g.qcow2') -Size 4MB
        $null = Open-BlockNode -Path (Join-Path $dir 'g.qcow2') -Name g
        $null = New-DirtyBitmap -Node g -Name b
        Resize-BlockNode -Node g -Size 12MB
        Get-RangeText -Node g -Name b | Should -Be @('4194304+8388608') -Because 'growth marks the range it adds'
        Clear-DirtyBitmap -Node g -Name b
        Write-BlockNode -Node g -Offset (11MB) -Pattern 7 -Length 1
        Get-RangeText -Node g -Name b | Should -Be @('11534336+65536')   # after the clear, only the write
        Assert-BlockError { Resize-BlockNode -Node g -Size 8MB -ErrorAction Stop } -ErrorId 'ShrinkWouldDiscardData,BitmapBackup.ResizeBlockNodeCommand'
        Close-BlockNode g
        (Get-QemuInfo (Join-Path $dir 'g.qcow2')).'virtual-size' | Should -Be 12MB
        & qemu-img check -q (Join-Path $dir 'g.qcow2'); $LASTEXITCODE | Should -Be 0
    }

    It 'reports what qemu-img info reports with Get-BlockImage' {
        $null = New-BlockImage -Path (Join-Path $dir 'base.qcow2') -Size 8MB
        $null = New-BlockImage -Path (Join-Path $dir 'mid.qcow2') -BackingFile base.qcow2
        $null = New-BlockImage -Path (Join-Path $dir 'top.qcow2') -BackingFile mid.qcow2
        & qemu-img bitmap --add -g 131072 (Join-Path $dir 'top.qcow2') qb
        $info = Get-BlockImage -Path (Join-Path $dir 'top.qcow2')
        $qemu = Get-QemuInfo (Join-Path $dir 'top.qcow2')
        $info.Size | Should -Be $qemu.'virtual-size'
        $info.ClusterSize | Should -Be $qemu.'cluster-size'
        $info.FileSize | Should -Be (Get-Item (Join-Path $dir 'top.qcow2')).Length
        $info.BackingFile | Should -Be $qemu.'backing-filename'
        $info.BackingChain.Path | Should -Be @((Join-Path $dir 'mid.qcow2'), (Join-Path $dir 'base.qcow2'))
        $info.Dirty | Should -BeFalse
        $info.Corrupt | Should -Be $qemu.'format-specific'.data.corrupt
        $info.Bitmaps.Name | Should -Be 'qb'
        $info.Bitmaps.Granularity | Should -Be 131072
    }

    It 'refuses an image with a feature it does not implement, naming it' {
        $path = Join-Path $dir 'x.qcow2'
        & qemu-img create -q -f qcow2 -o extended_l2=on $path 1M
        Assert-BlockError { Open-BlockNode -Path $path -ErrorAction Stop } -ErrorId 'UnsupportedImageFeature,BitmapBackup.OpenBlockNodeCommand' -MessageContains 'extended L2'
        @(Get-BlockNode).Count | Should -Be 0
    }
}
