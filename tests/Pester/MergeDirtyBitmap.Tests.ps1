BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $Cmd = 'BitmapBackup.MergeDirtyBitmapCommand'
}

Describe 'Merge-DirtyBitmap' {
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        # 1024000 bytes: not a multiple of 64 KiB, so the last 64 KiB cluster is partial (ranges are clipped)
        $node = New-TestNode -Size 1024000
        $twin = New-TestNode -Size 1024000
        $big = New-TestNode -Size 2MB
        $null = New-DirtyBitmap -Node $node.Name -Name target
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false          # target: cluster 0
        $null = New-DirtyBitmap -Node $node.Name -Name src1
        $null = New-DirtyBitmap -Node $node.Name -Name src2
        Disable-DirtyBitmap -Node $node.Name -Name target -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 200000 -Pattern 1 -Length 1 -Confirm:$false     # src1, src2: cluster 3
        Disable-DirtyBitmap -Node $node.Name -Name src1 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 1000000 -Pattern 1 -Length 1 -Confirm:$false    # src2: cluster 15 (partial)
        Enable-DirtyBitmap -Node $node.Name -Name target -Confirm:$false
        Enable-DirtyBitmap -Node $node.Name -Name src1 -Confirm:$false
        $null = New-DirtyBitmap -Node $twin.Name -Name t
        Write-BlockNode -Node $twin.Name -Offset 400000 -Pattern 1 -Length 1 -Confirm:$false     # twin/t: cluster 6
        $null = New-DirtyBitmap -Node $big.Name -Name big
        Write-BlockNode -Node $big.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
    }

    It 'starts from the expected bits' {
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
        Get-RangeText -Node $node.Name -Name src1 | Should -Be @('196608+65536')
        Get-RangeText -Node $node.Name -Name src2 | Should -Be @('196608+65536', '983040+40960')
        Get-RangeText -Node $twin.Name -Name t | Should -Be @('393216+65536')
    }

    It 'makes the target the union of itself and a source of the same node; the source is unchanged' {
        Merge-DirtyBitmap -Node $node.Name -Name target -Source src2 -Confirm:$false | Should -BeNullOrEmpty
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '196608+65536', '983040+40960')
        (Get-DirtyBitmap -Node $node.Name -Name target).Count | Should -Be (3 * 65536)
        Get-RangeText -Node $node.Name -Name src2 | Should -Be @('196608+65536', '983040+40960')
    }

    It 'merges several sources (by position too) and -PassThru writes the target' {
        $r = Merge-DirtyBitmap $node.Name target src1, src2 -PassThru -Confirm:$false
        $r | Should -BeOfType ([BitmapBackup.DirtyBitmapInfo])
        "$r" | Should -BeExactly "$($node.Name)/target"
        $r.Count | Should -Be (3 * 65536)
        $r.Recording | Should -BeTrue
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '196608+65536', '983040+40960')
    }

    It 'merging a bitmap into itself changes nothing' {
        Merge-DirtyBitmap -Node $node.Name -Name target -Source target -Confirm:$false
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'copies a bitmap: merge into a new empty one' {
        $null = New-DirtyBitmap -Node $node.Name -Name copy -Disabled
        Merge-DirtyBitmap -Node $node.Name -Name copy -Source src2 -Confirm:$false
        Get-RangeText -Node $node.Name -Name copy | Should -Be (Get-RangeText -Node $node.Name -Name src2)
        (Get-DirtyBitmap -Node $node.Name -Name copy).Recording | Should -BeFalse
    }

    It 'takes a source of another node of the same size, as a bitmap object' {
        Merge-DirtyBitmap -Node $node.Name -Name target -Source (Get-DirtyBitmap -Node $twin.Name -Name t) -Confirm:$false
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '393216+65536')
        Get-RangeText -Node $twin.Name -Name t | Should -Be @('393216+65536')
    }

    It 'takes a source as any object with Node and Name (node as a name or a node object)' {
        Merge-DirtyBitmap -Node $node.Name -Name target -Source ([pscustomobject]@{ Node = $twin.Name; Name = 't' }) -Confirm:$false
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '393216+65536')
        $null = New-DirtyBitmap -Node $node.Name -Name t2 -Disabled
        Merge-DirtyBitmap -Node $node.Name -Name t2 -Source ([pscustomobject]@{ Node = $twin; Name = 't' }) -Confirm:$false
        Get-RangeText -Node $node.Name -Name t2 | Should -Be @('393216+65536')
    }

    It 'mixes sources by name and by object' {
        Merge-DirtyBitmap -Node $node.Name -Name target -Source 'src1', (Get-DirtyBitmap -Node $twin.Name -Name t) -Confirm:$false
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '196608+65536', '393216+65536')
    }

    It 'merges into a bitmap of another node: the target is on -Node' {
        Merge-DirtyBitmap -Node $twin.Name -Name t -Source (Get-DirtyBitmap -Node $node.Name -Name target) -Confirm:$false
        Get-RangeText -Node $twin.Name -Name t | Should -Be @('0+65536', '393216+65536')
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'merges into a disabled target (it stays disabled) and from a disabled source' {
        Disable-DirtyBitmap -Node $node.Name -Name target -Confirm:$false
        Disable-DirtyBitmap -Node $node.Name -Name src1 -Confirm:$false
        $r = Merge-DirtyBitmap -Node $node.Name -Name target -Source src1 -PassThru -Confirm:$false
        $r.Recording | Should -BeFalse
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '196608+65536')
    }

    It 'takes the target from the pipeline (Get-DirtyBitmap) and the node as an object' {
        Get-DirtyBitmap -Node $node.Name -Name target | Merge-DirtyBitmap -Source src1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536', '196608+65536')
        $null = New-DirtyBitmap -Node $node.Name -Name viaobj -Disabled
        Merge-DirtyBitmap -Node $node -Name viaobj -Source src1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name viaobj | Should -Be @('196608+65536')
    }

    It 'fine source into a coarse target: every target cluster touched is set' {
        $null = New-DirtyBitmap -Node $twin.Name -Name fine -Granularity 512
        $null = New-DirtyBitmap -Node $twin.Name -Name coarse -Disabled
        Write-BlockNode -Node $twin.Name -Offset 70000 -Pattern 1 -Length 1 -Confirm:$false
        Write-BlockNode -Node $twin.Name -Offset 300000 -Pattern 1 -Length 600 -Confirm:$false
        Get-RangeText -Node $twin.Name -Name fine | Should -Be @('69632+512', '299520+1536')
        Merge-DirtyBitmap -Node $twin.Name -Name coarse -Source fine -Confirm:$false
        Get-RangeText -Node $twin.Name -Name coarse | Should -Be @('65536+65536', '262144+65536')
        (Get-DirtyBitmap -Node $twin.Name -Name coarse).Count | Should -Be (2 * 65536)
    }

    It 'coarse source into a fine target: every target cluster covered is set' {
        $null = New-DirtyBitmap -Node $twin.Name -Name fine -Granularity 512 -Disabled
        $r = Merge-DirtyBitmap -Node $twin.Name -Name fine -Source t -PassThru -Confirm:$false
        Get-RangeText -Node $twin.Name -Name fine | Should -Be @('393216+65536')
        $r.Count | Should -Be 65536
        $r.Granularity | Should -Be 512
    }

    It 'coarse source with a partial last cluster into a fine target: clipped to the node' {
        $null = New-DirtyBitmap -Node $node.Name -Name fine -Granularity 4096 -Disabled
        Merge-DirtyBitmap -Node $node.Name -Name fine -Source src2 -Confirm:$false
        Get-RangeText -Node $node.Name -Name fine | Should -Be @('196608+65536', '983040+40960')
        (Get-DirtyBitmap -Node $node.Name -Name fine).Count | Should -Be (65536 + 40960)
    }

    It 'a 2 GiB-granularity source sets a whole 4 KiB target, and a 4 KiB source sets the one 2 GiB bit' {
        $null = New-DirtyBitmap -Node $node.Name -Name huge -Granularity 2GB -Disabled
        $null = New-DirtyBitmap -Node $node.Name -Name small -Granularity 4096 -Disabled
        Merge-DirtyBitmap -Node $node.Name -Name huge -Source src1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name huge | Should -Be @('0+1024000')
        (Get-DirtyBitmap -Node $node.Name -Name huge).Count | Should -Be 2GB
        Merge-DirtyBitmap -Node $node.Name -Name small -Source huge -Confirm:$false
        Get-RangeText -Node $node.Name -Name small | Should -Be @('0+1024000')
        (Get-DirtyBitmap -Node $node.Name -Name small).Count | Should -Be 1024000   # 250 clusters of 4 KiB
    }

    It 'different granularities on another node of the same size' {
        $null = New-DirtyBitmap -Node $twin.Name -Name g512 -Granularity 512 -Disabled
        Merge-DirtyBitmap -Node $twin.Name -Name g512 -Source (Get-DirtyBitmap -Node $node.Name -Name src2) -Confirm:$false
        Get-RangeText -Node $twin.Name -Name g512 | Should -Be @('196608+65536', '983040+40960')
        (Get-DirtyBitmap -Node $twin.Name -Name g512).Count | Should -Be (65536 + 40960)
    }

    It 'refuses a source of a node of another size with BitmapSizeMismatch and leaves the target unchanged' {
        $e = Assert-BlockError {
            Merge-DirtyBitmap -Node $node.Name -Name target -Source (Get-DirtyBitmap -Node $big.Name -Name big) -Confirm:$false -ErrorAction Stop
        } -ErrorId "BitmapSizeMismatch,$Cmd" -MessageContains "'target'", "'$($node.Name)'", "'big'", "'$($big.Name)'", '1024000', '2097152' `
            -Category InvalidArgument
        $e.TargetObject | Should -BeExactly 'big'
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'is all or nothing: a good source then a different-size one leaves the target unchanged' {
        Assert-BlockError {
            Merge-DirtyBitmap -Node $node.Name -Name target -Source 'src2', (Get-DirtyBitmap -Node $big.Name -Name big) -Confirm:$false -ErrorAction Stop
        } -ErrorId "BitmapSizeMismatch,$Cmd"
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'is all or nothing: a good source then a missing one leaves the target unchanged' {
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source src2, nope -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'nope'", "'$($node.Name)'"
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'refuses to merge a different-size node the other way round too' {
        Assert-BlockError {
            Merge-DirtyBitmap -Node $big.Name -Name big -Source (Get-DirtyBitmap -Node $node.Name -Name src1) -Confirm:$false -ErrorAction Stop
        } -ErrorId "BitmapSizeMismatch,$Cmd" -MessageContains "'big'", "'src1'"
        Get-RangeText -Node $big.Name -Name big | Should -Be @('0+65536')
    }

    It 'a source of a node that was the same size but was resized is refused' {
        Resize-BlockNode -Node $twin.Name -Size 2MB -Confirm:$false
        Assert-BlockError {
            Merge-DirtyBitmap -Node $node.Name -Name target -Source (Get-DirtyBitmap -Node $twin.Name -Name t) -Confirm:$false -ErrorAction Stop
        } -ErrorId "BitmapSizeMismatch,$Cmd"
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'refuses an unknown target with BitmapNotFound, naming node and bitmap' {
        $e = Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name nope -Source src1 -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'nope'", "'$($node.Name)'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'nope'
    }

    It 'refuses an unknown source name with BitmapNotFound, naming node and bitmap, target unchanged' {
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source nope -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'nope'", "'$($node.Name)'" -Category ObjectNotFound
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'a source name means a bitmap of -Node, not of another node' {
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source t -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'t'", "'$($node.Name)'"
    }

    It 'refuses a source object whose bitmap is gone with BitmapNotFound, naming its node' {
        $src = Get-DirtyBitmap -Node $twin.Name -Name t
        Remove-DirtyBitmap -Node $twin.Name -Name t -Confirm:$false
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source $src -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'t'", "'$($twin.Name)'"
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'refuses a source object whose node is closed with NodeNotFound' {
        $src = Get-DirtyBitmap -Node $twin.Name -Name t
        Close-BlockNode -Node $twin.Name -Confirm:$false -WarningAction SilentlyContinue
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source $src -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeNotFound,$Cmd" -MessageContains "'$($twin.Name)'" -Category ObjectNotFound
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'refuses a source that is neither a name nor a bitmap object' {
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source 42 -Confirm:$false -ErrorAction Stop } `
            -ErrorId "InvalidMergeSource,$Cmd" -MessageContains "'42'" -Category InvalidArgument
        Assert-BlockError {
            Merge-DirtyBitmap -Node $node.Name -Name target -Source (Get-DirtyBitmapRange -Node $node.Name -Name src1) -Confirm:$false -ErrorAction Stop
        } -ErrorId "InvalidMergeSource,$Cmd"
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { Merge-DirtyBitmap -Node nosuchnode -Name target -Source src1 -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeNotFound,$Cmd" -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'an empty -Source list is a clean error (QEMU 7.2 crashes here), and the target and node are unchanged' {
        { Merge-DirtyBitmap -Node $node.Name -Name target -Source @() -Confirm:$false -ErrorAction Stop } | Should -Throw
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+65536')
        Write-BlockNode -Node $node.Name -Offset 100000 -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name target | Should -Be @('0+131072')
    }

    It 'an empty -Source list fails with MergeSourceMissing, naming node and bitmap' {
        Assert-BlockError { Merge-DirtyBitmap -Node $node.Name -Name target -Source @() -Confirm:$false -ErrorAction Stop } `
            -ErrorId "MergeSourceMissing,$Cmd" -MessageContains "'target'", "'$($node.Name)'"
    }

    It 'a $null -Source is rejected at binding' {
        { Merge-DirtyBitmap -Node $node.Name -Name target -Source $null -Confirm:$false -ErrorAction Stop } |
            Should -Throw -ErrorId "ParameterArgumentValidationError,$Cmd"
    }

    It 'goes on after a failed target in the pipeline' {
        $null = New-DirtyBitmap -Node $node.Name -Name t2 -Disabled
        @([pscustomobject]@{ Node = $node.Name; Name = 'nope' }, [pscustomobject]@{ Node = $node.Name; Name = 't2' }) |
            Merge-DirtyBitmap -Source src1 -Confirm:$false -ErrorAction SilentlyContinue -ErrorVariable ev
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "BitmapNotFound,$Cmd"
        Get-RangeText -Node $node.Name -Name t2 | Should -Be @('196608+65536')
    }
}
