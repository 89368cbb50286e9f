BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $Cmd = 'BitmapBackup.GetDirtyBitmapRangeCommand'
}

Describe 'Get-DirtyBitmapRange' {
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 1024000    # 15 full 64 KiB clusters and a partial one of 40960 bytes
        $null = New-DirtyBitmap -Node $node.Name -Name b
    }

    It 'writes nothing for a clean bitmap' {
        Get-DirtyBitmapRange -Node $node.Name -Name b -ErrorAction Stop | Should -BeNullOrEmpty
    }

    It 'writes DirtyRange objects: Node, Bitmap, Offset, Length, End' {
        Write-BlockNode -Node $node.Name -Offset 70000 -Pattern 1 -Length 10 -Confirm:$false
        $r = @(Get-DirtyBitmapRange -Node $node.Name -Name b)
        $r.Count | Should -Be 1
        $r[0] | Should -BeOfType ([BitmapBackup.DirtyRange])
        $r[0].Node | Should -BeExactly $node.Name
        $r[0].Bitmap | Should -BeExactly 'b'
        $r[0].Offset | Should -Be 65536
        $r[0].Length | Should -Be 65536
        $r[0].End | Should -Be 131072
        "$($r[0])" | Should -BeExactly '65536+65536'
    }

    It 'writes maximal runs of dirty clusters, in order, whatever the order of the writes' {
        foreach ($cluster in 7, 0, 5, 2, 1, 8) {
            Write-BlockNode -Node $node.Name -Offset ($cluster * 65536 + 123) -Pattern 1 -Length 1 -Confirm:$false
        }
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+196608', '327680+65536', '458752+131072')
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be (6 * 65536)
    }

    It 'clips the last range to the node size' {
        Write-BlockNode -Node $node.Name -Offset 900000 -Pattern 1 -Length 124000 -Confirm:$false
        $r = @(Get-DirtyBitmapRange -Node $node.Name -Name b)
        $r.Count | Should -Be 1
        $r[0].Offset | Should -Be 851968
        $r[0].Length | Should -Be (1024000 - 851968)
        $r[0].End | Should -Be 1024000
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be (3 * 65536)   # whole clusters
    }

    It 'the whole node written is one range of the node size' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1024000 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+1024000')
    }

    It 'a 2 GiB-granularity bitmap has one range, the node' {
        $null = New-DirtyBitmap -Node $node.Name -Name huge -Granularity 2GB
        Write-BlockNode -Node $node.Name -Offset 500000 -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name huge | Should -Be @('0+1024000')
    }

    It 'ranges follow a grown node' {
        Write-BlockNode -Node $node.Name -Offset 1023999 -Pattern 1 -Length 1 -Confirm:$false
        Resize-BlockNode -Node $node.Name -Size 64MB -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('983040+66125824') -Because 'growth marks the range it added'
        Write-BlockNode -Node $node.Name -Offset (64MB - 1) -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('983040+66125824')
    }

    It 'takes node and name by position, and the node as an object' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        @(Get-DirtyBitmapRange $node.Name b | ForEach-Object { "$_" }) | Should -Be @('0+65536')
        @(Get-DirtyBitmapRange -Node $node -Name b | ForEach-Object { "$_" }) | Should -Be @('0+65536')
    }

    It 'takes bitmaps from the pipeline: the ranges of each, tagged with node and bitmap' {
        $other = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $node.Name -Name c -Granularity 4096
        $null = New-DirtyBitmap -Node $other.Name -Name b
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        Write-BlockNode -Node $other.Name -Offset 200000 -Pattern 1 -Length 1 -Confirm:$false
        $r = @(Get-DirtyBitmap -Node $node.Name | Get-DirtyBitmapRange)
        @($r | ForEach-Object { '{0}/{1}:{2}' -f $_.Node, $_.Bitmap, $_ }) | Should -Be @("$($node.Name)/b:0+65536", "$($node.Name)/c:0+4096")
        $all = @(Get-DirtyBitmap | Get-DirtyBitmapRange)
        $all.Count | Should -Be 3
        ($all | Where-Object Node -EQ $other.Name).Offset | Should -Be 196608
    }

    It 'the sum of the lengths is Count when the last cluster is clean' {
        Write-BlockNode -Node $node.Name -Offset 10 -Pattern 1 -Length 300000 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 600000 -Pattern 1 -Length 1 -Confirm:$false
        (Get-DirtyBitmapRange -Node $node.Name -Name b | Measure-Object -Property Length -Sum).Sum |
            Should -Be (Get-DirtyBitmap -Node $node.Name -Name b).Count
    }

    It 'refuses an unknown bitmap with BitmapNotFound, naming node and bitmap' {
        $e = Assert-BlockError { Get-DirtyBitmapRange -Node $node.Name -Name nope -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'nope'", "'$($node.Name)'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'nope'
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { Get-DirtyBitmapRange -Node nosuchnode -Name b -ErrorAction Stop } `
            -ErrorId "NodeNotFound,$Cmd" -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'goes on after an unknown bitmap in the pipeline' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        $r = @([pscustomobject]@{ Node = $node.Name; Name = 'nope' }, [pscustomobject]@{ Node = $node.Name; Name = 'b' } |
                Get-DirtyBitmapRange -ErrorAction SilentlyContinue -ErrorVariable ev)
        $r.Count | Should -Be 1
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "BitmapNotFound,$Cmd"
    }
}
