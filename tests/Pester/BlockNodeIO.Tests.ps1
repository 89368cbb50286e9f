BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $Write = 'BitmapBackup.WriteBlockNodeCommand'
    $Read = 'BitmapBackup.ReadBlockNodeCommand'
}

Describe 'Write-BlockNode and Read-BlockNode' {
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 4MB
    }

    It 'Read-BlockNode writes ONE byte[] object' {
        $r = Read-BlockNode -Node $node.Name -Offset 0 -Length 4096
        , $r | Should -BeOfType ([byte[]])
        $r -is [byte[]] | Should -BeTrue
        $r.Length | Should -Be 4096
        (Read-BlockNode -Node $node.Name -Offset 0 -Length 4096 | Measure-Object).Count | Should -Be 1
        @(, (Read-BlockNode -Node $node.Name -Offset 0 -Length 10)).Count | Should -Be 1
    }

    It 'Read-BlockNode of length 0 writes one empty byte[]' {
        $r = Read-BlockNode -Node $node.Name -Offset 100 -Length 0
        $r -is [byte[]] | Should -BeTrue
        $r.Length | Should -Be 0
        $end = Read-BlockNode -Node $node.Name -Offset 4MB -Length 0
        $end.Length | Should -Be 0
    }

    It 'a new image reads as zeros' {
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 1MB -Length 65536) -Value 0 | Should -Be -1
    }

    It 'reads back what -Data wrote, at an unaligned offset, and nothing around it changes' {
        $data = [byte[]]::new(10000)
        (New-Object System.Random 42).NextBytes($data)
        Write-BlockNode -Node $node.Name -Offset 12345 -Data $data -Confirm:$false | Should -BeNullOrEmpty
        $r = Read-BlockNode -Node $node.Name -Offset 12345 -Length 10000
        [Convert]::ToBase64String($r) | Should -BeExactly ([Convert]::ToBase64String($data))
        Read-BlockNode -Node $node.Name -Offset 12344 -Length 1 | Should -Be 0
        Read-BlockNode -Node $node.Name -Offset 22345 -Length 1 | Should -Be 0
    }

    It '-Data takes numbers converted to bytes' {
        Write-BlockNode -Node $node.Name -Offset 0 -Data 1, 2, 255 -Confirm:$false
        $r = Read-BlockNode -Node $node.Name -Offset 0 -Length 4
        $r | Should -Be @(1, 2, 255, 0)
    }

    It 'reads back what -Pattern wrote, over more than one 1 MiB chunk' {
        $len = 1MB + 1536 + 7
        Write-BlockNode -Node $node.Name -Offset 1000 -Pattern 0xA5 -Length $len -Confirm:$false
        $r = Read-BlockNode -Node $node.Name -Offset 999 -Length ($len + 2)
        $r[0] | Should -Be 0
        $r[$len + 1] | Should -Be 0
        Find-ByteMismatch -Bytes $r -Start 1 -Count $len -Value 0xA5 | Should -Be -1
    }

    It '-Pattern with -Length 0 writes nothing' {
        Write-BlockNode -Node $node.Name -Offset 4MB -Pattern 1 -Length 0 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 0 -Confirm:$false
        Read-BlockNode -Node $node.Name -Offset 0 -Length 1 | Should -Be 0
    }

    It '-Zero makes a range read as zeros: unaligned edges and an aligned middle, the rest kept' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 0xEE -Length 64KB -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 100 -Zero -Length 20000 -Confirm:$false
        $r = Read-BlockNode -Node $node.Name -Offset 0 -Length 64KB
        Find-ByteMismatch -Bytes $r -Start 0 -Count 100 -Value 0xEE | Should -Be -1
        Find-ByteMismatch -Bytes $r -Start 100 -Count 20000 -Value 0 | Should -Be -1
        Find-ByteMismatch -Bytes $r -Start 20100 -Count 45436 -Value 0xEE | Should -Be -1
    }

    It '-Zero up to the end of the node' {
        Write-BlockNode -Node $node.Name -Offset (4MB - 8192) -Pattern 0x11 -Length 8192 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset (4MB - 5000) -Zero -Length 5000 -Confirm:$false
        $r = Read-BlockNode -Node $node.Name -Offset (4MB - 8192) -Length 8192
        Find-ByteMismatch -Bytes $r -Start 0 -Count 3192 -Value 0x11 | Should -Be -1
        Find-ByteMismatch -Bytes $r -Start 3192 -Count 5000 -Value 0 | Should -Be -1
    }

    It 'the data is in the image file' {
        Write-BlockNode -Node $node.Name -Offset 3MB -Data ([byte[]](1, 2, 3, 4)) -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 5 -Pattern 7 -Length 3 -Confirm:$false
        Close-BlockNode -Node $node.Name -Confirm:$false
        Get-FileBytes -Path $node.Path -Offset 3MB -Length 4 | Should -Be @(1, 2, 3, 4)
        Get-FileBytes -Path $node.Path -Offset 4 -Length 5 | Should -Be @(0, 7, 7, 7, 0)
    }

    It 'writes the last byte and reads it, at the very end of the node' {
        Write-BlockNode -Node $node.Name -Offset (4MB - 1) -Data 0x42 -Confirm:$false
        Read-BlockNode -Node $node.Name -Offset (4MB - 1) -Length 1 | Should -Be 0x42
    }

    It 'takes the node from the pipeline and as a node object' {
        Get-BlockNode -Name $node.Name | Write-BlockNode -Offset 0 -Data 5, 6 -Confirm:$false
        Write-BlockNode -Node $node -Offset 2 -Pattern 7 -Length 1 -Confirm:$false
        (Get-BlockNode -Name $node.Name | Read-BlockNode -Offset 0 -Length 3) | Should -Be @(5, 6, 7)
        (Read-BlockNode $node 0 3) | Should -Be @(5, 6, 7)
    }

    It 'a read-only node can be read' {
        Write-BlockNode -Node $node.Name -Offset 0 -Data 1, 2 -Confirm:$false
        Close-BlockNode -Node $node.Name -Confirm:$false
        $ro = Open-BlockNode -Path $node.Path -Name (New-TestName) -ReadOnly
        (Read-BlockNode -Node $ro.Name -Offset 0 -Length 2) | Should -Be @(1, 2)
    }

    It 'refuses <What> with NodeReadOnly, naming the node, and writes nothing' -ForEach @(
        @{ What = '-Data'; Arguments = @{ Data = [byte[]](1, 2, 3) } },
        @{ What = '-Pattern'; Arguments = @{ Pattern = 9; Length = 4096 } },
        @{ What = '-Zero'; Arguments = @{ Zero = $true; Length = 4096 } }
    ) {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 0x66 -Length 4096 -Confirm:$false
        Close-BlockNode -Node $node.Name -Confirm:$false
        $ro = Open-BlockNode -Path $node.Path -Name (New-TestName) -ReadOnly
        $null = New-DirtyBitmap -Node $ro.Name -Name b
        Assert-BlockError { Write-BlockNode -Node $ro.Name -Offset 0 @Arguments -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeReadOnly,$Write" -MessageContains "'$($ro.Name)'" -Category PermissionDenied
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $ro.Name -Offset 0 -Length 4096) -Value 0x66 | Should -Be -1
        (Get-DirtyBitmap -Node $ro.Name -Name b).Count | Should -Be 0
    }

    It 'refuses a write past the end (<What>) with OffsetOutOfRange: nothing written, nothing marked' -ForEach @(
        @{ What = '-Data across the end'; Offset = 4MB - 1; Arguments = @{ Data = [byte[]](1, 2) } },
        @{ What = '-Data at the end'; Offset = 4MB; Arguments = @{ Data = [byte[]](1) } },
        @{ What = '-Data after the end'; Offset = 5MB; Arguments = @{ Data = [byte[]](1) } },
        @{ What = '-Pattern across the end'; Offset = 4MB - 4096; Arguments = @{ Pattern = 1; Length = 4097 } },
        @{ What = '-Pattern length 0 after the end'; Offset = 4MB + 1; Arguments = @{ Pattern = 1; Length = 0 } },
        @{ What = '-Zero across the end'; Offset = 4MB - 4096; Arguments = @{ Zero = $true; Length = 8192 } },
        @{ What = 'a huge length'; Offset = 1; Arguments = @{ Pattern = 1; Length = [long]::MaxValue } }
    ) {
        $null = New-DirtyBitmap -Node $node.Name -Name b -Granularity 512
        Write-BlockNode -Node $node.Name -Offset (4MB - 8192) -Pattern 0x77 -Length 8192 -Confirm:$false
        Clear-DirtyBitmap -Node $node.Name -Name b -Confirm:$false
        $e = Assert-BlockError { Write-BlockNode -Node $node.Name -Offset $Offset @Arguments -Confirm:$false -ErrorAction Stop } `
            -ErrorId "OffsetOutOfRange,$Write" -MessageContains "'$($node.Name)'", "offset $Offset", '4194304 bytes' -Category InvalidArgument
        $e.TargetObject | Should -BeExactly $node.Name
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset (4MB - 8192) -Length 8192) -Value 0x77 | Should -Be -1
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 0
        (Get-Item $node.Path).Length | Should -Be 4MB
    }

    It 'refuses a read past the end with OffsetOutOfRange (offset <Offset>, length <Length>)' -ForEach @(
        @{ Offset = 4MB - 1; Length = 2 }, @{ Offset = 4MB; Length = 1 }, @{ Offset = 4MB + 1; Length = 0 },
        @{ Offset = 8MB; Length = 100 }
    ) {
        Assert-BlockError { Read-BlockNode -Node $node.Name -Offset $Offset -Length $Length -ErrorAction Stop } `
            -ErrorId "OffsetOutOfRange,$Read" -MessageContains "'$($node.Name)'", "offset $Offset", "length $Length" -Category InvalidArgument
    }

    It 'refuses a read longer than one array with InvalidLength, naming the node' {
        Assert-BlockError { Read-BlockNode -Node $node.Name -Offset 0 -Length 3GB -ErrorAction Stop } `
            -ErrorId "InvalidLength,$Read" -MessageContains "'$($node.Name)'", '3221225472' -Category InvalidArgument
    }

    It 'refuses an unknown node with NodeNotFound (<Command>)' -ForEach @(
        @{ Command = 'Write' }, @{ Command = 'Read' }
    ) {
        if ($Command -eq 'Write') {
            Assert-BlockError { Write-BlockNode -Node nosuchnode -Offset 0 -Data 1 -Confirm:$false -ErrorAction Stop } `
                -ErrorId "NodeNotFound,$Write" -MessageContains "'nosuchnode'" -Category ObjectNotFound
        }
        else {
            Assert-BlockError { Read-BlockNode -Node nosuchnode -Offset 0 -Length 1 -ErrorAction Stop } `
                -ErrorId "NodeNotFound,$Read" -MessageContains "'nosuchnode'" -Category ObjectNotFound
        }
    }

    It 'rejects a negative offset or length at binding' {
        { Write-BlockNode -Node $node.Name -Offset -1 -Data 1 -Confirm:$false -ErrorAction Stop } |
            Should -Throw -ErrorId "ParameterArgumentValidationError,$Write"
        { Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length -1 -Confirm:$false -ErrorAction Stop } |
            Should -Throw -ErrorId "ParameterArgumentValidationError,$Write"
        { Read-BlockNode -Node $node.Name -Offset -1 -Length 1 -ErrorAction Stop } |
            Should -Throw -ErrorId "ParameterArgumentValidationError,$Read"
        { Read-BlockNode -Node $node.Name -Offset 0 -Length -1 -ErrorAction Stop } |
            Should -Throw -ErrorId "ParameterArgumentValidationError,$Read"
    }

    It 'writes go on after a failed input of a pipeline' {
        $other = New-TestNode -Size 1MB
        $node.Name, 'nosuchnode', $other.Name | Write-BlockNode -Offset 0 -Data 3 -Confirm:$false -ErrorAction SilentlyContinue -ErrorVariable ev
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "NodeNotFound,$Write"
        Read-BlockNode -Node $node.Name -Offset 0 -Length 1 | Should -Be 3
        Read-BlockNode -Node $other.Name -Offset 0 -Length 1 | Should -Be 3
    }
}

Describe 'Writes mark the recording bitmaps' {
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $node.Name -Name g64k
        $null = New-DirtyBitmap -Node $node.Name -Name g512 -Granularity 512
        $null = New-DirtyBitmap -Node $node.Name -Name off -Disabled
    }

    It 'marks every cluster touched by <What>' -ForEach @(
        @{ What = '-Data'; Arguments = @{ Data = [byte[]]::new(10000) } },
        @{ What = '-Pattern'; Arguments = @{ Pattern = 0xCC; Length = 10000 } },
        @{ What = '-Zero'; Arguments = @{ Zero = $true; Length = 10000 } }
    ) {
        Write-BlockNode -Node $node.Name -Offset 5000 @Arguments -Confirm:$false
        # bytes [5000, 15000): 512-byte clusters 9..29, 64 KiB cluster 0
        (Get-DirtyBitmap -Node $node.Name -Name g512).Count | Should -Be (21 * 512)
        Get-RangeText -Node $node.Name -Name g512 | Should -Be @('4608+10752')
        (Get-DirtyBitmap -Node $node.Name -Name g64k).Count | Should -Be 65536
        Get-RangeText -Node $node.Name -Name g64k | Should -Be @('0+65536')
        (Get-DirtyBitmap -Node $node.Name -Name off).Count | Should -Be 0
    }

    It 'a write across a cluster boundary marks both clusters' {
        Write-BlockNode -Node $node.Name -Offset 65535 -Data 1, 2 -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name g64k).Count | Should -Be (2 * 65536)
        Get-RangeText -Node $node.Name -Name g64k | Should -Be @('0+131072')
        Get-RangeText -Node $node.Name -Name g512 | Should -Be @('65024+1024')
    }

    It 'a write of length 0 marks nothing' {
        Write-BlockNode -Node $node.Name -Offset 100 -Pattern 1 -Length 0 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 100 -Zero -Length 0 -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name | Measure-Object -Property Count -Sum).Sum | Should -Be 0
    }

    It 'writing the whole node marks every cluster' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1MB -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name g64k).Count | Should -Be 1MB
        (Get-DirtyBitmap -Node $node.Name -Name g512).Count | Should -Be 1MB
        Get-RangeText -Node $node.Name -Name g512 | Should -Be @('0+1048576')
    }
}
