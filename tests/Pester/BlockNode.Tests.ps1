BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
}

Describe 'Open-BlockNode' {
    BeforeAll { $Cmd = 'BitmapBackup.OpenBlockNodeCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    It 'opens a raw image under the name given and writes a BlockNodeInfo' {
        $path = New-TestImage -Size 2MB
        $name = New-TestName
        $node = Open-BlockNode -Path $path -Name $name
        $node | Should -BeOfType ([BitmapBackup.BlockNodeInfo])
        $node.Name | Should -BeExactly $name
        $node.Path | Should -Be $path
        $node.Format | Should -Be 'Raw'
        $node.Size | Should -Be 2MB
        $node.ClusterSize | Should -BeNullOrEmpty
        $node.ReadOnly | Should -BeFalse
        $node.BackingFile | Should -BeNullOrEmpty
        @($node.Bitmaps).Count | Should -Be 0
        "$node" | Should -BeExactly $name
        (Get-BlockNode -Name $name).Path | Should -Be $path
    }

    It 'takes the path and the name by position' {
        $path = New-TestImage
        $name = New-TestName
        (Open-BlockNode $path $name).Name | Should -BeExactly $name
    }

    It 'names the node after the file when -Name is omitted, made unique with -2, -3' {
        $stem = New-TestName 'f'
        $p1 = New-TestImage -Directory (New-TestDirectory) -BaseName $stem
        $p2 = New-TestImage -Directory (New-TestDirectory) -BaseName $stem
        $p3 = New-TestImage -Directory (New-TestDirectory) -BaseName $stem -Extension '.raw'
        (Open-BlockNode $p1).Name | Should -BeExactly $stem
        (Open-BlockNode $p2).Name | Should -BeExactly "$stem-2"
        (Open-BlockNode $p3).Name | Should -BeExactly "$stem-3"
    }

    It 'makes a valid default name from a file name that is not one' {
        $dir = New-TestDirectory
        $p1 = New-TestImage -Directory $dir -BaseName '1 bad.name'
        $p2 = New-TestImage -Directory $dir -BaseName ('x' * 40)
        (Open-BlockNode $p1).Name | Should -BeExactly 'node1_bad.name'
        (Open-BlockNode $p2).Name | Should -BeExactly ('x' * 27)
    }

    It 'opens read-only with -ReadOnly' {
        $node = Open-BlockNode -Path (New-TestImage) -Name (New-TestName) -ReadOnly
        $node.ReadOnly | Should -BeTrue
        (Get-BlockNode -Name $node.Name).ReadOnly | Should -BeTrue
    }

    It 'resolves a relative path against the current PowerShell location' {
        $dir = New-TestDirectory
        $null = New-TestImage -Directory $dir -BaseName rel
        Push-Location $dir
        try { $node = Open-BlockNode -Path rel.img -Name (New-TestName) }
        finally { Pop-Location }
        $node.Path | Should -Be (Join-Path $dir 'rel.img')
    }

    It 'opens every image piped from Get-ChildItem *.img' {
        $dir = New-TestDirectory
        $prefix = New-TestName 'g'
        $paths = 'a', 'b', 'c' | ForEach-Object { New-TestImage -Directory $dir -BaseName "$prefix$_" -Size 1MB }
        $nodes = @(Get-ChildItem -Path (Join-Path $dir '*.img') | Open-BlockNode)
        $nodes.Count | Should -Be 3
        @($nodes | ForEach-Object Name | Sort-Object) | Should -Be @("${prefix}a", "${prefix}b", "${prefix}c")
        @($nodes | ForEach-Object Path | Sort-Object) | Should -Be @($paths | Sort-Object)
        @(Get-BlockNode -Name "$prefix*").Count | Should -Be 3
    }

    It 'goes on after a failed input of a pipeline (non-terminating error)' {
        $p1 = New-TestImage
        $p2 = New-TestImage
        $missing = Join-Path (Get-TestDirectory) 'missing.img'
        $nodes = @($p1, $missing, $p2 | ForEach-Object { [pscustomobject]@{ FullName = $_ } } |
                Open-BlockNode -ErrorAction SilentlyContinue -ErrorVariable ev)
        $nodes.Count | Should -Be 2
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "ImageNotFound,$Cmd"
    }

    It 'refuses a missing file with ImageNotFound, naming it' {
        $path = Join-Path (Get-TestDirectory) 'nope.img'
        $e = Assert-BlockError { Open-BlockNode -Path $path -ErrorAction Stop } -ErrorId "ImageNotFound,$Cmd" `
            -MessageContains "'$path'" -Category ObjectNotFound
        $e.TargetObject | Should -Be $path
        Get-BlockNode -Name nope -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
    }

    It 'refuses a second open of the same file with ImageInUse (first <First>, then <Second>)' -ForEach @(
        @{ First = 'read-write'; Second = 'read-write' }, @{ First = 'read-write'; Second = 'read-only' },
        @{ First = 'read-only'; Second = 'read-only' }, @{ First = 'read-only'; Second = 'read-write' }
    ) {
        $path = New-TestImage
        $first = Open-BlockNode -Path $path -Name (New-TestName) -ReadOnly:($First -eq 'read-only')
        $second = New-TestName
        Assert-BlockError { Open-BlockNode -Path $path -Name $second -ReadOnly:($Second -eq 'read-only') -ErrorAction Stop } `
            -ErrorId "ImageInUse,$Cmd" -MessageContains "'$path'", "'$($first.Name)'" -Category ResourceBusy
        Get-BlockNode -Name $second -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
        (Get-BlockNode -Name $first.Name).Path | Should -Be $path
    }

    It 'refuses the same file opened through a symbolic link with ImageInUse (file lock)' {
        $path = New-TestImage
        $null = Open-BlockNode -Path $path -Name (New-TestName)
        $link = Join-Path (Get-TestDirectory) ((New-TestName) + '.lnk.img')
        $null = New-Item -ItemType SymbolicLink -Path $link -Target $path
        Assert-BlockError { Open-BlockNode -Path $link -Name (New-TestName) -ErrorAction Stop } -ErrorId "ImageInUse,$Cmd" -MessageContains "'$link'"
    }

    It 'can open the file again once the node is closed' {
        $path = New-TestImage
        $name = New-TestName
        $null = Open-BlockNode -Path $path -Name $name
        Close-BlockNode -Node $name -Confirm:$false
        (Open-BlockNode -Path $path -Name $name).Name | Should -BeExactly $name
    }

    It 'accepts a 31-character node name' {
        $name = 'a' + ('b' * 30)
        (Open-BlockNode -Path (New-TestImage) -Name $name).Name | Should -BeExactly $name
    }

    It 'refuses the node name "<Name>" with NodeNameInvalid and leaves the file closed' -ForEach @(
        @{ Name = '1disk' }, @{ Name = 'has space' }, @{ Name = ('a' * 32) }, @{ Name = '-x' }, @{ Name = '_x' },
        @{ Name = 'a/b' }, @{ Name = 'dïsk' }
    ) {
        $path = New-TestImage
        $e = Assert-BlockError { Open-BlockNode -Path $path -Name $Name -ErrorAction Stop } -ErrorId "NodeNameInvalid,$Cmd" `
            -MessageContains "'$Name'" -Category InvalidArgument
        $e.TargetObject | Should -BeExactly $Name
        Get-BlockNode | Where-Object Path -EQ $path | Should -BeNullOrEmpty
        # nothing was left open: the file opens under a valid name
        (Open-BlockNode -Path $path -Name (New-TestName)).Path | Should -Be $path
    }

    It 'refuses a node name in use with NodeNameInUse and leaves the first node alone' {
        $name = New-TestName
        $first = Open-BlockNode -Path (New-TestImage) -Name $name
        $other = New-TestImage
        Assert-BlockError { Open-BlockNode -Path $other -Name $name -ErrorAction Stop } -ErrorId "NodeNameInUse,$Cmd" `
            -MessageContains "'$name'" -Category ResourceExists
        (Get-BlockNode -Name $name).Path | Should -Be $first.Path
        (Open-BlockNode -Path $other -Name (New-TestName)).Path | Should -Be $other
    }

    It 'node names are case-sensitive' {
        $name = New-TestName 'c'
        $null = Open-BlockNode -Path (New-TestImage) -Name $name
        (Open-BlockNode -Path (New-TestImage) -Name $name.ToUpperInvariant()).Name | Should -BeExactly $name.ToUpperInvariant()
    }
}

Describe 'Get-BlockNode' {
    BeforeAll { $Cmd = 'BitmapBackup.GetBlockNodeCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $prefix = New-TestName 'q'
        $b = New-TestNode -Name "${prefix}b" -Size 2MB
        $a = New-TestNode -Name "${prefix}a"
        $c = New-TestNode -Name "${prefix}c" -ReadOnly
    }

    It 'lists every open node, ordered by name' {
        $all = @(Get-BlockNode)
        $all.Count | Should -Be 3
        @($all | ForEach-Object Name) | Should -Be @($a.Name, $b.Name, $c.Name)
        $all[0] | Should -BeOfType ([BitmapBackup.BlockNodeInfo])
        $all[1].Size | Should -Be 2MB
        $all[2].ReadOnly | Should -BeTrue
    }

    It 'gets a node by exact name, and several names at once' {
        (Get-BlockNode -Name $b.Name).Path | Should -Be $b.Path
        @(Get-BlockNode $c.Name, $a.Name | ForEach-Object Name) | Should -Be @($c.Name, $a.Name)
    }

    It 'takes wildcards' {
        @(Get-BlockNode -Name "$prefix*" | ForEach-Object Name) | Should -Be @($a.Name, $b.Name, $c.Name)
        @(Get-BlockNode -Name "${prefix}[ab]" | ForEach-Object Name) | Should -Be @($a.Name, $b.Name)
        @(Get-BlockNode -Name "${prefix}?").Count | Should -Be 3
    }

    It 'writes nothing and no error for a wildcard that matches nothing' {
        Get-BlockNode -Name 'zz-no-such*' -ErrorAction Stop | Should -BeNullOrEmpty
    }

    It 'is case-sensitive' {
        Get-BlockNode -Name $a.Name.ToUpperInvariant() -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
    }

    It 'refuses an unknown name with NodeNotFound, naming it' {
        $e = Assert-BlockError { Get-BlockNode -Name 'nosuchnode' -ErrorAction Stop } -ErrorId "NodeNotFound,$Cmd" `
            -MessageContains "'nosuchnode'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'nosuchnode'
    }

    It 'writes the nodes it finds and one error per unknown name' {
        $found = @(Get-BlockNode -Name $a.Name, 'nosuch1', "$prefix[c]", 'nosuch2' -ErrorAction SilentlyContinue -ErrorVariable ev)
        @($found | ForEach-Object Name) | Should -Be @($a.Name, $c.Name)
        $ev.Count | Should -Be 2
        @($ev | ForEach-Object FullyQualifiedErrorId) | Should -Be @("NodeNotFound,$Cmd", "NodeNotFound,$Cmd")
        @($ev | ForEach-Object TargetObject) | Should -Be @('nosuch1', 'nosuch2')
    }

    It 'takes names from the pipeline, by value and by property name' {
        @($a.Name, $b.Name | Get-BlockNode | ForEach-Object Name) | Should -Be @($a.Name, $b.Name)
        @([pscustomobject]@{ Name = $c.Name } | Get-BlockNode | ForEach-Object Name) | Should -Be @($c.Name)
        @(Get-BlockNode -Name $b.Name | Get-BlockNode | ForEach-Object Name) | Should -Be @($b.Name)
    }

    It 'lists the bitmaps of a node in creation order' {
        $null = New-DirtyBitmap -Node $a.Name -Name zeta
        $null = New-DirtyBitmap -Node $a.Name -Name alpha
        (Get-BlockNode -Name $a.Name).Bitmaps | Should -Be @('zeta', 'alpha')
    }

    It 'rejects an empty name at binding' {
        { Get-BlockNode -Name '' -ErrorAction Stop } | Should -Throw -ErrorId "ParameterArgumentValidationError,$Cmd"
    }

    It 'takes a name that is not a valid wildcard pattern (a[) literally' {
        { Get-BlockNode -Name 'a[' -ErrorAction Stop } | Should -Throw -ErrorId 'NodeNotFound,BitmapBackup.GetBlockNodeCommand'
    }
}

Describe 'Close-BlockNode' {
    BeforeAll { $Cmd = 'BitmapBackup.CloseBlockNodeCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    It 'closes a node by name: it is gone, its file is unlocked, its data is on disk' {
        $node = New-TestNode
        Write-BlockNode -Node $node.Name -Offset 4096 -Data ([byte[]](9, 8, 7)) -Confirm:$false
        Close-BlockNode -Node $node.Name -Confirm:$false | Should -BeNullOrEmpty
        Get-BlockNode -Name $node.Name -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
        Get-FileBytes -Path $node.Path -Offset 4096 -Length 3 | Should -Be @(9, 8, 7)
        $fs = [IO.File]::Open($node.Path, 'Open', 'ReadWrite', 'None')   # no lock left
        $fs.Dispose()
    }

    It 'closes a node given as a node object, positionally' {
        $node = New-TestNode
        Close-BlockNode $node -Confirm:$false
        Get-BlockNode -Name $node.Name -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
    }

    It 'closes every node piped from Get-BlockNode' {
        $prefix = New-TestName 'k'
        $keep = New-TestNode
        1..3 | ForEach-Object { $null = New-TestNode -Name "$prefix$_" }
        Get-BlockNode -Name "$prefix*" | Close-BlockNode -Confirm:$false
        @(Get-BlockNode | ForEach-Object Name) | Should -Be @($keep.Name)
        Get-BlockNode | Close-BlockNode -Confirm:$false
        Get-BlockNode | Should -BeNullOrEmpty
    }

    It 'closes nodes named by strings from the pipeline' {
        $n1 = New-TestNode
        $n2 = New-TestNode
        $n1.Name, $n2.Name | Close-BlockNode -Confirm:$false
        Get-BlockNode | Should -BeNullOrEmpty
    }

    It 'warns that non-persistent bitmaps are lost, naming node, bitmaps and dirty bytes' {
        $node = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name keepme
        $null = New-DirtyBitmap -Node $node.Name -Name other -Granularity 4096
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 10 -Confirm:$false
        Close-BlockNode -Node $node.Name -Confirm:$false -WarningVariable w -WarningAction SilentlyContinue
        $w.Count | Should -Be 1
        "$($w[0])" | Should -BeLikeExactly "*Node '$($node.Name)'*"
        "$($w[0])" | Should -BeLikeExactly "*'keepme' (65536 dirty bytes)*"
        "$($w[0])" | Should -BeLikeExactly "*'other' (4096 dirty bytes)*"
    }

    It 'its bitmaps end with it: the file opened again has none' {
        $node = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name gone
        Close-BlockNode -Node $node.Name -Confirm:$false -WarningAction SilentlyContinue
        $again = Open-BlockNode -Path $node.Path -Name $node.Name
        @($again.Bitmaps).Count | Should -Be 0
        Get-DirtyBitmap -Node $node.Name | Should -BeNullOrEmpty
    }

    It 'does not warn for a node without bitmaps' {
        $node = New-TestNode
        Close-BlockNode -Node $node.Name -Confirm:$false -WarningVariable w -WarningAction SilentlyContinue
        $w.Count | Should -Be 0
    }

    It 'refuses an unknown node with NodeNotFound, naming it' {
        Assert-BlockError { Close-BlockNode -Node nosuchnode -Confirm:$false -ErrorAction Stop } -ErrorId "NodeNotFound,$Cmd" `
            -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'refuses to close a node twice with NodeNotFound' {
        $node = New-TestNode
        Close-BlockNode -Node $node.Name -Confirm:$false
        Assert-BlockError { Close-BlockNode -Node $node.Name -Confirm:$false -ErrorAction Stop } -ErrorId "NodeNotFound,$Cmd" `
            -MessageContains "'$($node.Name)'"
    }

    It 'goes on after an unknown node in the pipeline' {
        $n1 = New-TestNode
        $n2 = New-TestNode
        $n1.Name, 'nosuchnode', $n2.Name | Close-BlockNode -Confirm:$false -ErrorAction SilentlyContinue -ErrorVariable ev
        Get-BlockNode | Should -BeNullOrEmpty
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "NodeNotFound,$Cmd"
    }
}

Describe 'Resize-BlockNode' {
    BeforeAll { $Cmd = 'BitmapBackup.ResizeBlockNodeCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    It 'grows a node: new size on the node and the file, nothing written without -PassThru' {
        $node = New-TestNode -Size 1MB
        Resize-BlockNode -Node $node.Name -Size 3MB -Confirm:$false | Should -BeNullOrEmpty
        (Get-BlockNode -Name $node.Name).Size | Should -Be 3MB
        (Get-Item $node.Path).Length | Should -Be 3MB
    }

    It '-PassThru writes the resized node' {
        $node = New-TestNode -Size 1MB
        $info = Resize-BlockNode -Node $node.Name -Size 64MB -PassThru -Confirm:$false
        $info | Should -BeOfType ([BitmapBackup.BlockNodeInfo])
        $info.Name | Should -BeExactly $node.Name
        $info.Size | Should -Be 64MB
    }

    It 'takes the node from the pipeline or as a node object' {
        $n1 = New-TestNode -Size 1MB
        $n2 = New-TestNode -Size 1MB
        Get-BlockNode -Name $n1.Name, $n2.Name | Resize-BlockNode -Size 2MB -Confirm:$false
        Resize-BlockNode -Node $n2 -Size 4MB -Confirm:$false
        (Get-BlockNode -Name $n1.Name).Size | Should -Be 2MB
        (Get-BlockNode -Name $n2.Name).Size | Should -Be 4MB
    }

    It 'grows the bitmaps and marks the range the growth added (the last backup does not have it)' {
        $node = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $null = New-DirtyBitmap -Node $node.Name -Name fine -Granularity 512
        $null = New-DirtyBitmap -Node $node.Name -Name off -Disabled
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        Resize-BlockNode -Node $node.Name -Size 2MB -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be (17 * 64KB)
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+65536', '1048576+1048576')
        Get-RangeText -Node $node.Name -Name fine | Should -Be @('0+512', '1048576+1048576')
        (Get-DirtyBitmap -Node $node.Name -Name off).Count | Should -Be 0 -Because 'a disabled bitmap records nothing'
        Write-BlockNode -Node $node.Name -Offset (1MB + 100) -Pattern 2 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+65536', '1048576+1048576')
        Read-BlockNode -Node $node.Name -Offset (1MB + 100) -Length 1 | Should -Be 2
    }

    It 'grows a node whose size is not a multiple of the granularity: the last cluster grows, ranges stay clipped' {
        $node = New-TestNode -Size 1024000
        $null = New-DirtyBitmap -Node $node.Name -Name b
        Write-BlockNode -Node $node.Name -Offset 1023999 -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('983040+40960')
        Resize-BlockNode -Node $node.Name -Size 2MB -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('983040+1114112')
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be (17 * 65536)
    }

    It 'shrinks a node over a hole, and its bitmaps with it' {
        $node = New-TestNode -Size 2MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 0x33 -Length 100 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 1536KB -Pattern 0x44 -Length 100 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 1MB -Zero -Length 1MB -Confirm:$false   # the tail is a hole again
        Resize-BlockNode -Node $node.Name -Size 1MB -Confirm:$false
        (Get-BlockNode -Name $node.Name).Size | Should -Be 1MB
        (Get-Item $node.Path).Length | Should -Be 1MB
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+65536')
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 0 -Length 100) -Value 0x33 | Should -Be -1
        # growing again brings back zeros, not the old bytes, and marks them: a backup may hold the old ones
        Resize-BlockNode -Node $node.Name -Size 2MB -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+65536', '1048576+1048576')
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 1536KB -Length 100) -Value 0 | Should -Be -1
    }

    It 'shrinks a node that was never written (all hole)' {
        $node = New-TestNode -Size 64MB
        Resize-BlockNode -Node $node.Name -Size 512 -Confirm:$false
        (Get-BlockNode -Name $node.Name).Size | Should -Be 512
    }

    It 'refuses a shrink over data with ShrinkWouldDiscardData and changes nothing' {
        $node = New-TestNode -Size 2MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        Write-BlockNode -Node $node.Name -Offset 1536KB -Pattern 0x55 -Length 4096 -Confirm:$false
        Assert-BlockError { Resize-BlockNode -Node $node.Name -Size 1MB -Confirm:$false -ErrorAction Stop } `
            -ErrorId "ShrinkWouldDiscardData,$Cmd" -MessageContains "'$($node.Name)'", '1048576' -Category InvalidOperation
        (Get-BlockNode -Name $node.Name).Size | Should -Be 2MB
        (Get-Item $node.Path).Length | Should -Be 2MB
        Get-RangeText -Node $node.Name -Name b | Should -Be @('1572864+65536')
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 1536KB -Length 4096) -Value 0x55 | Should -Be -1
    }

    It 'refuses a size of <Size> with InvalidImageSize and keeps the size' -ForEach @(
        @{ Size = 0 }, @{ Size = -512 }, @{ Size = 1000 }, @{ Size = 1048577 }
    ) {
        $node = New-TestNode -Size 1MB
        Assert-BlockError { Resize-BlockNode -Node $node.Name -Size $Size -Confirm:$false -ErrorAction Stop } `
            -ErrorId "InvalidImageSize,$Cmd" -MessageContains "$Size", "'$($node.Name)'" -Category InvalidArgument
        (Get-BlockNode -Name $node.Name).Size | Should -Be 1MB
    }

    It 'refuses a read-only node with NodeReadOnly' {
        $node = New-TestNode -Size 1MB -ReadOnly
        Assert-BlockError { Resize-BlockNode -Node $node.Name -Size 2MB -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeReadOnly,$Cmd" -MessageContains "'$($node.Name)'" -Category PermissionDenied
        (Get-BlockNode -Name $node.Name).Size | Should -Be 1MB
        (Get-Item $node.Path).Length | Should -Be 1MB
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { Resize-BlockNode -Node nosuchnode -Size 2MB -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeNotFound,$Cmd" -MessageContains "'nosuchnode'"
    }
}
