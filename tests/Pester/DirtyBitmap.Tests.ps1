BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
}

Describe 'New-DirtyBitmap' {
    BeforeAll { $Cmd = 'BitmapBackup.NewDirtyBitmapCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 1MB
    }

    It 'adds a recording bitmap with QEMU defaults (64 KiB on raw) and writes its DirtyBitmapInfo' {
        $b = New-DirtyBitmap -Node $node.Name -Name daily
        $b | Should -BeOfType ([BitmapBackup.DirtyBitmapInfo])
        $b.Node | Should -BeExactly $node.Name
        $b.Name | Should -BeExactly 'daily'
        $b.Granularity | Should -Be 65536
        $b.Count | Should -Be 0
        $b.Recording | Should -BeTrue
        $b.Busy | Should -BeFalse
        $b.Persistent | Should -BeFalse
        $b.Inconsistent | Should -BeFalse
        $b.ReadOnly | Should -BeFalse
        "$b" | Should -BeExactly "$($node.Name)/daily"
        (Get-BlockNode -Name $node.Name).Bitmaps | Should -Be @('daily')
    }

    It 'takes node and name by position' {
        (New-DirtyBitmap $node.Name pos).Name | Should -BeExactly 'pos'
    }

    It '-Disabled adds a bitmap that does not record' {
        $b = New-DirtyBitmap -Node $node.Name -Name off -Disabled
        $b.Recording | Should -BeFalse
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 100 -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name off).Count | Should -Be 0
    }

    It 'accepts granularity <Granularity>' -ForEach @(
        @{ Granularity = 512 }, @{ Granularity = 4096 }, @{ Granularity = 65536 }, @{ Granularity = 1MB },
        @{ Granularity = 2147483648 }
    ) {
        (New-DirtyBitmap -Node $node.Name -Name g -Granularity $Granularity).Granularity | Should -Be $Granularity
    }

    It 'refuses granularity <Granularity> with InvalidGranularity, naming node and bitmap, and adds nothing' -ForEach @(
        @{ Granularity = 0 }, @{ Granularity = 256 }, @{ Granularity = 1000 }, @{ Granularity = 1536 },
        @{ Granularity = 4294967296 }, @{ Granularity = -1 }, @{ Granularity = -512 }
    ) {
        $e = Assert-BlockError { New-DirtyBitmap -Node $node.Name -Name badg -Granularity $Granularity -ErrorAction Stop } `
            -ErrorId "InvalidGranularity,$Cmd" -MessageContains "'$($node.Name)'", "'badg'", "$Granularity" -Category InvalidArgument
        $e.TargetObject | Should -BeExactly 'badg'
        @(Get-DirtyBitmap -Node $node.Name).Count | Should -Be 0
    }

    It 'refuses an existing name with BitmapAlreadyExists and keeps the first bitmap as it was' {
        $null = New-DirtyBitmap -Node $node.Name -Name dup -Granularity 4096
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        Assert-BlockError { New-DirtyBitmap -Node $node.Name -Name dup -Granularity 512 -Disabled -ErrorAction Stop } `
            -ErrorId "BitmapAlreadyExists,$Cmd" -MessageContains "'$($node.Name)'", "'dup'" -Category ResourceExists
        $b = @(Get-DirtyBitmap -Node $node.Name)
        $b.Count | Should -Be 1
        $b[0].Granularity | Should -Be 4096
        $b[0].Count | Should -Be 4096
        $b[0].Recording | Should -BeTrue
    }

    It 'allows the same name on another node' {
        $other = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name same
        (New-DirtyBitmap -Node $other.Name -Name same).Node | Should -BeExactly $other.Name
        @(Get-DirtyBitmap -Name same).Count | Should -Be 2
    }

    It 'bitmap names are case-sensitive' {
        $null = New-DirtyBitmap -Node $node.Name -Name Daily
        (New-DirtyBitmap -Node $node.Name -Name daily).Name | Should -BeExactly 'daily'
        @(Get-DirtyBitmap -Node $node.Name | ForEach-Object Name) | Should -Be @('Daily', 'daily')
    }

    It 'refuses an empty name and adds nothing' {
        { New-DirtyBitmap -Node $node.Name -Name '' -ErrorAction Stop } | Should -Throw
        @(Get-DirtyBitmap -Node $node.Name).Count | Should -Be 0
    }

    It 'refuses an empty name with BitmapNameEmpty, naming the node' {
        Assert-BlockError { New-DirtyBitmap -Node $node.Name -Name '' -ErrorAction Stop } `
            -ErrorId "BitmapNameEmpty,$Cmd" -MessageContains "'$($node.Name)'"
    }

    It 'accepts a name of <What> (1023 bytes of UTF-8)' -ForEach @(
        @{ What = '1023 ASCII characters'; Name = ('a' * 1023) },
        @{ What = "511 two-byte characters and one ASCII"; Name = ([string][char]0xE9 * 511) + 'a' },
        @{ What = '341 three-byte characters'; Name = ([string][char]0x20AC * 341) },
        @{ What = '255 four-byte characters and 3 ASCII'; Name = ([char]::ConvertFromUtf32(0x1F600) * 255) + 'abc' }
    ) {
        [Text.Encoding]::UTF8.GetByteCount($Name) | Should -Be 1023
        (New-DirtyBitmap -Node $node.Name -Name $Name).Name | Should -BeExactly $Name
        (Get-DirtyBitmap -Node $node.Name -Name $Name).Name | Should -BeExactly $Name
    }

    It 'refuses a name of <What> (<Bytes> bytes of UTF-8) with BitmapNameTooLong' -ForEach @(
        @{ What = '1024 ASCII characters'; Bytes = 1024; Name = ('k' * 1024) },
        @{ What = '512 two-byte characters'; Bytes = 1024; Name = ([string][char]0xE9 * 512) },
        @{ What = '342 three-byte characters'; Bytes = 1026; Name = ([string][char]0x20AC * 342) },
        @{ What = '256 four-byte characters'; Bytes = 1024; Name = ([char]::ConvertFromUtf32(0x1F600) * 256) }
    ) {
        [Text.Encoding]::UTF8.GetByteCount($Name) | Should -Be $Bytes
        $e = Assert-BlockError { New-DirtyBitmap -Node $node.Name -Name $Name -ErrorAction Stop } `
            -ErrorId "BitmapNameTooLong,$Cmd" -MessageContains "'$($node.Name)'", "$Bytes bytes", '1023' -Category InvalidArgument
        $e.TargetObject | Should -BeExactly $Name
        @(Get-DirtyBitmap -Node $node.Name).Count | Should -Be 0
    }

    It 'keeps a -Persistent bitmap of a raw node in the sidecar file across close and reopen' {
        $b = New-DirtyBitmap -Node $node.Name -Name keep -Persistent -Granularity 4KB
        $b.Persistent | Should -BeTrue
        Write-BlockNode -Node $node.Name -Offset 8KB -Pattern 1 -Length 8KB -Confirm:$false
        Test-Path ($node.Path + '.bitmaps') | Should -BeTrue
        Close-BlockNode -Node $node.Name -Confirm:$false
        $again = Open-BlockNode -Path $node.Path -Name $node.Name
        $kept = Get-DirtyBitmap -Node $again.Name -Name keep
        $kept.Persistent | Should -BeTrue
        $kept.Inconsistent | Should -BeFalse
        Get-RangeText -Node $again.Name -Name keep | Should -Be @('8192+8192')
    }

    It 'refuses -Persistent on a read-only node with PersistenceNotSupported, naming node and bitmap' {
        $ro = New-TestNode -ReadOnly
        $e = Assert-BlockError { New-DirtyBitmap -Node $ro.Name -Name keep -Persistent -ErrorAction Stop } `
            -ErrorId "PersistenceNotSupported,$Cmd" -MessageContains "'$($ro.Name)'", "'keep'" -Category InvalidOperation
        $e.TargetObject | Should -BeExactly 'keep'
        @(Get-DirtyBitmap -Node $ro.Name).Count | Should -Be 0
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { New-DirtyBitmap -Node nosuchnode -Name b -ErrorAction Stop } -ErrorId "NodeNotFound,$Cmd" `
            -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'a read-only node accepts a bitmap (not itself read-only)' {
        Close-BlockNode -Node $node.Name -Confirm:$false
        $ro = Open-BlockNode -Path $node.Path -Name (New-TestName) -ReadOnly
        $b = New-DirtyBitmap -Node $ro.Name -Name onro
        $b.Node | Should -BeExactly $ro.Name
        $b.ReadOnly | Should -BeFalse
        $b.Recording | Should -BeTrue
    }

    It 'adds a bitmap to every node piped from Get-BlockNode' {
        $other = New-TestNode
        $made = @(Get-BlockNode | New-DirtyBitmap -Name piped)
        $made.Count | Should -Be 2
        @($made | ForEach-Object Node | Sort-Object) | Should -Be @(@($node.Name, $other.Name) | Sort-Object)
        (Get-BlockNode -Name $other.Name).Bitmaps | Should -Be @('piped')
    }

    It 'takes the node as a node object, from Open-BlockNode, and from a bitmap object' {
        (New-DirtyBitmap -Node $node -Name obj).Node | Should -BeExactly $node.Name
        $opened = Open-BlockNode -Path (New-TestImage) -Name (New-TestName) | New-DirtyBitmap -Name fresh
        $opened.Name | Should -BeExactly 'fresh'
        (Get-DirtyBitmap -Node $node.Name -Name obj | New-DirtyBitmap -Name sibling).Node | Should -BeExactly $node.Name
    }

    It 'goes on after an unknown node in the pipeline' {
        $node.Name, 'nosuchnode' | New-DirtyBitmap -Name p -ErrorAction SilentlyContinue -ErrorVariable ev | Should -HaveCount 1
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "NodeNotFound,$Cmd"
    }
}

Describe 'Get-DirtyBitmap' {
    BeforeAll { $Cmd = 'BitmapBackup.GetDirtyBitmapCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $prefix = New-TestName 'w'
        $n1 = New-TestNode -Name "${prefix}1"
        $n2 = New-TestNode -Name "${prefix}2"
        $null = New-DirtyBitmap -Node $n1.Name -Name daily
        $null = New-DirtyBitmap -Node $n1.Name -Name weekly -Granularity 4096
        $null = New-DirtyBitmap -Node $n2.Name -Name daily -Disabled
    }

    It 'lists every bitmap of every node, by node name then creation order' {
        $all = @(Get-DirtyBitmap)
        @($all | ForEach-Object { "$_" }) | Should -Be @("$($n1.Name)/daily", "$($n1.Name)/weekly", "$($n2.Name)/daily")
        $all[0] | Should -BeOfType ([BitmapBackup.DirtyBitmapInfo])
        $all[1].Granularity | Should -Be 4096
        $all[2].Recording | Should -BeFalse
    }

    It 'lists the bitmaps of one node with -Node (name or node object)' {
        @(Get-DirtyBitmap -Node $n1.Name | ForEach-Object Name) | Should -Be @('daily', 'weekly')
        @(Get-DirtyBitmap -Node $n2 | ForEach-Object Name) | Should -Be @('daily')
    }

    It 'gets bitmaps by name, on one node or on all' {
        (Get-DirtyBitmap -Node $n1.Name -Name weekly).Granularity | Should -Be 4096
        @(Get-DirtyBitmap -Name daily | ForEach-Object Node) | Should -Be @($n1.Name, $n2.Name)
        @(Get-DirtyBitmap $n1.Name daily | ForEach-Object Node) | Should -Be @($n1.Name) -Because 'position 0 is -Node, position 1 -Name, as on every bitmap cmdlet (issue 20)'
        @(Get-DirtyBitmap -Node $n1.Name -Name weekly, daily | ForEach-Object Name) | Should -Be @('weekly', 'daily')
    }

    It 'takes wildcards in -Name' {
        @(Get-DirtyBitmap -Node $n1.Name -Name '*ly' | ForEach-Object Name) | Should -Be @('daily', 'weekly')
        @(Get-DirtyBitmap -Name 'w*' | ForEach-Object { "$_" }) | Should -Be @("$($n1.Name)/weekly")
        Get-DirtyBitmap -Node $n2.Name -Name 'w*' -ErrorAction Stop | Should -BeNullOrEmpty
    }

    It 'takes the node from the pipeline: node objects, node names, bitmap objects' {
        @(Get-BlockNode -Name "$prefix*" | Get-DirtyBitmap | ForEach-Object { "$_" }) |
            Should -Be @("$($n1.Name)/daily", "$($n1.Name)/weekly", "$($n2.Name)/daily")
        @($n2.Name | Get-DirtyBitmap | ForEach-Object { "$_" }) | Should -Be @("$($n2.Name)/daily")
        @([pscustomobject]@{ Node = $n2.Name } | Get-DirtyBitmap | ForEach-Object { "$_" }) | Should -Be @("$($n2.Name)/daily")
    }

    It 'writes a snapshot: a later write does not change an object already written' {
        $before = Get-DirtyBitmap -Node $n1.Name -Name daily
        Write-BlockNode -Node $n1.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        $before.Count | Should -Be 0
        (Get-DirtyBitmap -Node $n1.Name -Name daily).Count | Should -Be 65536
    }

    It 'refuses an unknown bitmap on a node with BitmapNotFound, naming node and bitmap' {
        $e = Assert-BlockError { Get-DirtyBitmap -Node $n2.Name -Name weekly -ErrorAction Stop } -ErrorId "BitmapNotFound,$Cmd" `
            -MessageContains "'weekly'", "'$($n2.Name)'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'weekly'
    }

    It 'refuses a bitmap name found on no node with BitmapNotFound' {
        Assert-BlockError { Get-DirtyBitmap -Name nosuchbitmap -ErrorAction Stop } -ErrorId "BitmapNotFound,$Cmd" `
            -MessageContains "'nosuchbitmap'", 'any open node'
    }

    It 'writes what it finds and one error per unknown name' {
        $found = @(Get-DirtyBitmap -Node $n1.Name -Name daily, nope1, 'week*', nope2 -ErrorAction SilentlyContinue -ErrorVariable ev)
        @($found | ForEach-Object Name) | Should -Be @('daily', 'weekly')
        @($ev | ForEach-Object FullyQualifiedErrorId) | Should -Be @("BitmapNotFound,$Cmd", "BitmapNotFound,$Cmd")
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { Get-DirtyBitmap -Node nosuchnode -ErrorAction Stop } -ErrorId "NodeNotFound,$Cmd" `
            -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'does not take wildcards in -Node: NodeNotFound' {
        Assert-BlockError { Get-DirtyBitmap -Node "$prefix*" -ErrorAction Stop } -ErrorId "NodeNotFound,$Cmd" -MessageContains "'$prefix*'"
    }

    It 'finds a bitmap whose name has wildcard characters when they are escaped' {
        $null = New-DirtyBitmap -Node $n1.Name -Name 'y[1]'
        (Get-DirtyBitmap -Node $n1.Name -Name 'y`[1`]').Name | Should -BeExactly 'y[1]'
        (Get-DirtyBitmap -Node $n1.Name -Name ([WildcardPattern]::Escape('y[1]'))).Name | Should -BeExactly 'y[1]'
    }

    It 'finds a bitmap whose name is not a valid wildcard pattern (x[) by that name' {
        $null = New-DirtyBitmap -Node $n1.Name -Name 'x['
        (Get-DirtyBitmap -Node $n1.Name -Name 'x[' -ErrorAction Stop).Name | Should -BeExactly 'x['
        (Get-DirtyBitmap -Node $n1.Name -Name 'y[1]' -ErrorAction SilentlyContinue) | Should -BeNullOrEmpty
    }

    It 'writes nothing when no node is open' {
        Close-TestNode
        Get-DirtyBitmap -ErrorAction Stop | Should -BeNullOrEmpty
    }
}

Describe 'Remove-DirtyBitmap' {
    BeforeAll { $Cmd = 'BitmapBackup.RemoveDirtyBitmapCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode
        $other = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name a
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $null = New-DirtyBitmap -Node $other.Name -Name a
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
    }

    It 'removes one bitmap, and only that one' {
        Remove-DirtyBitmap -Node $node.Name -Name a -Confirm:$false | Should -BeNullOrEmpty
        Get-DirtyBitmap -Node $node.Name -Name a -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
        (Get-BlockNode -Name $node.Name).Bitmaps | Should -Be @('b')
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 65536
        (Get-DirtyBitmap -Node $other.Name -Name a).Name | Should -Be 'a'
    }

    It 'the name can be reused: the new bitmap starts clean' {
        Remove-DirtyBitmap $node.Name a -Confirm:$false
        (New-DirtyBitmap -Node $node.Name -Name a).Count | Should -Be 0
    }

    It 'removes every bitmap of a node piped from Get-DirtyBitmap -Node' {
        Get-DirtyBitmap -Node $node.Name | Remove-DirtyBitmap -Confirm:$false
        Get-DirtyBitmap -Node $node.Name | Should -BeNullOrEmpty
        @(Get-DirtyBitmap | ForEach-Object { "$_" }) | Should -Be @("$($other.Name)/a")
    }

    It 'takes the node as a node object' {
        Remove-DirtyBitmap -Node $other -Name a -Confirm:$false
        Get-DirtyBitmap -Node $other.Name | Should -BeNullOrEmpty
    }

    It 'removes a bitmap of a read-only node' {
        Close-BlockNode -Node $other.Name -Confirm:$false -WarningAction SilentlyContinue
        $ro = Open-BlockNode -Path $other.Path -Name (New-TestName) -ReadOnly
        $null = New-DirtyBitmap -Node $ro.Name -Name r
        Remove-DirtyBitmap -Node $ro.Name -Name r -Confirm:$false
        Get-DirtyBitmap -Node $ro.Name | Should -BeNullOrEmpty
    }

    It 'refuses an unknown bitmap with BitmapNotFound, naming node and bitmap' {
        $e = Assert-BlockError { Remove-DirtyBitmap -Node $node.Name -Name nope -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'nope'", "'$($node.Name)'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'nope'
    }

    It 'refuses to remove a bitmap twice with BitmapNotFound' {
        Remove-DirtyBitmap -Node $node.Name -Name a -Confirm:$false
        Assert-BlockError { Remove-DirtyBitmap -Node $node.Name -Name a -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'a'", "'$($node.Name)'"
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { Remove-DirtyBitmap -Node nosuchnode -Name a -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeNotFound,$Cmd" -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'goes on after an unknown bitmap in the pipeline' {
        $items = @(
            [pscustomobject]@{ Node = $node.Name; Name = 'a' },
            [pscustomobject]@{ Node = $node.Name; Name = 'nope' },
            [pscustomobject]@{ Node = $other.Name; Name = 'a' }
        )
        $items | Remove-DirtyBitmap -Confirm:$false -ErrorAction SilentlyContinue -ErrorVariable ev
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "BitmapNotFound,$Cmd"
        @(Get-DirtyBitmap | ForEach-Object { "$_" }) | Should -Be @("$($node.Name)/b")
    }
}
