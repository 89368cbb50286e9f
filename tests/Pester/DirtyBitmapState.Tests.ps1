BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
}

Describe 'Recording: what writes mark' {
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 1024000   # not a multiple of 64 KiB: the last cluster is partial
        $null = New-DirtyBitmap -Node $node.Name -Name g512 -Granularity 512
        $null = New-DirtyBitmap -Node $node.Name -Name g4k -Granularity 4096
        $null = New-DirtyBitmap -Node $node.Name -Name g64k
        $null = New-DirtyBitmap -Node $node.Name -Name g2g -Granularity 2GB
        $null = New-DirtyBitmap -Node $node.Name -Name off -Disabled
    }

    It 'a write marks every recording bitmap: Count = dirty clusters x granularity' {
        Write-BlockNode -Node $node.Name -Offset 5000 -Pattern 1 -Length 10000 -Confirm:$false
        $b = @{}
        Get-DirtyBitmap -Node $node.Name | ForEach-Object { $b[$_.Name] = $_ }
        $b['g512'].Count | Should -Be (21 * 512)     # clusters 9..29
        $b['g4k'].Count | Should -Be (3 * 4096)      # clusters 1..3
        $b['g64k'].Count | Should -Be 65536          # cluster 0
        $b['g2g'].Count | Should -Be 2147483648      # one bit covers the whole node
        $b['off'].Count | Should -Be 0
        Get-RangeText -Node $node.Name -Name g512 | Should -Be @('4608+10752')
        Get-RangeText -Node $node.Name -Name g4k | Should -Be @('4096+12288')
        Get-RangeText -Node $node.Name -Name g64k | Should -Be @('0+65536')
        Get-RangeText -Node $node.Name -Name g2g | Should -Be @('0+1024000')
        Get-RangeText -Node $node.Name -Name off | Should -BeNullOrEmpty
    }

    It 'separate writes give separate ranges, and touching ones merge' {
        Write-BlockNode -Node $node.Name -Offset 8192 -Pattern 1 -Length 4096 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 4096 -Confirm:$false
        Get-RangeText -Node $node.Name -Name g4k | Should -Be @('0+4096', '8192+4096')
        Write-BlockNode -Node $node.Name -Offset 4096 -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name g4k | Should -Be @('0+12288')
        (Get-DirtyBitmap -Node $node.Name -Name g4k).Count | Should -Be 12288
    }

    It 'a write to the last, partial cluster counts a whole cluster but its range is clipped' {
        Write-BlockNode -Node $node.Name -Offset 1023999 -Pattern 1 -Length 1 -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name g64k).Count | Should -Be 65536
        Get-RangeText -Node $node.Name -Name g64k | Should -Be @('983040+40960')
    }

    It 'rewriting the same bytes does not count twice' {
        1..3 | ForEach-Object { Write-BlockNode -Node $node.Name -Offset 100 -Pattern $_ -Length 10 -Confirm:$false }
        (Get-DirtyBitmap -Node $node.Name -Name g512).Count | Should -Be 512
    }
}

Describe 'Disable-DirtyBitmap and Enable-DirtyBitmap' {
    BeforeAll {
        $Disable = 'BitmapBackup.DisableDirtyBitmapCommand'
        $Enable = 'BitmapBackup.EnableDirtyBitmapCommand'
    }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
    }

    It 'a disabled bitmap keeps its bits and does not record; enabled again, it records new writes only' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        Disable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeFalse
        Write-BlockNode -Node $node.Name -Offset 200KB -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+65536')
        Enable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeTrue
        Write-BlockNode -Node $node.Name -Offset 500KB -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('0+65536', '458752+65536')
    }

    It 'only the disabled bitmap stops recording' {
        $null = New-DirtyBitmap -Node $node.Name -Name other
        Disable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 0
        (Get-DirtyBitmap -Node $node.Name -Name other).Count | Should -Be 65536
    }

    It 'a bitmap created -Disabled records once enabled' {
        $null = New-DirtyBitmap -Node $node.Name -Name late -Disabled
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        Enable-DirtyBitmap -Node $node.Name -Name late -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 128KB -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name late | Should -Be @('131072+65536')
    }

    It 'is idempotent: disabling twice and enabling twice are no errors' {
        Disable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop
        Disable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeFalse
        Enable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop
        Enable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeTrue
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 65536
    }

    It '-PassThru writes the bitmap after the change' {
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        $d = Disable-DirtyBitmap -Node $node.Name -Name b -PassThru -Confirm:$false
        $d | Should -BeOfType ([BitmapBackup.DirtyBitmapInfo])
        $d.Recording | Should -BeFalse
        $d.Count | Should -Be 65536
        (Enable-DirtyBitmap -Node $node.Name -Name b -PassThru -Confirm:$false).Recording | Should -BeTrue
    }

    It 'disables every bitmap piped from Get-DirtyBitmap, and enables them back' {
        $other = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name c
        $null = New-DirtyBitmap -Node $other.Name -Name b
        Get-DirtyBitmap | Disable-DirtyBitmap -Confirm:$false
        @(Get-DirtyBitmap | Where-Object Recording).Count | Should -Be 0
        Get-DirtyBitmap -Node $other.Name | Enable-DirtyBitmap -Confirm:$false
        @(Get-DirtyBitmap | Where-Object Recording | ForEach-Object { "$_" }) | Should -Be @("$($other.Name)/b")
    }

    It 'takes node and name by position and the node as an object' {
        Disable-DirtyBitmap $node.Name b -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeFalse
        Enable-DirtyBitmap -Node $node -Name b -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeTrue
    }

    It '<Verb>-DirtyBitmap refuses an unknown bitmap with BitmapNotFound, naming node and bitmap' -ForEach @(
        @{ Verb = 'Enable' }, @{ Verb = 'Disable' }
    ) {
        $fqid = "BitmapNotFound,BitmapBackup.${Verb}DirtyBitmapCommand"
        $e = Assert-BlockError { & "$Verb-DirtyBitmap" -Node $node.Name -Name nope -Confirm:$false -ErrorAction Stop } `
            -ErrorId $fqid -MessageContains "'nope'", "'$($node.Name)'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'nope'
    }

    It '<Verb>-DirtyBitmap refuses an unknown node with NodeNotFound' -ForEach @(
        @{ Verb = 'Enable' }, @{ Verb = 'Disable' }
    ) {
        Assert-BlockError { & "$Verb-DirtyBitmap" -Node nosuchnode -Name b -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeNotFound,BitmapBackup.${Verb}DirtyBitmapCommand" -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'goes on after an unknown bitmap in the pipeline' {
        $null = New-DirtyBitmap -Node $node.Name -Name c
        @([pscustomobject]@{ Node = $node.Name; Name = 'b' }, [pscustomobject]@{ Node = $node.Name; Name = 'nope' },
            [pscustomobject]@{ Node = $node.Name; Name = 'c' }) |
            Disable-DirtyBitmap -Confirm:$false -ErrorAction SilentlyContinue -ErrorVariable ev
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "BitmapNotFound,$Disable"
        @(Get-DirtyBitmap -Node $node.Name | Where-Object Recording).Count | Should -Be 0
    }
}

Describe 'Clear-DirtyBitmap' {
    BeforeAll { $Cmd = 'BitmapBackup.ClearDirtyBitmapCommand' }
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    BeforeEach {
        $node = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $node.Name -Name b
        $null = New-DirtyBitmap -Node $node.Name -Name keep
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 300000 -Confirm:$false
    }

    It 'resets every bit of that bitmap only, and it keeps recording' {
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be (5 * 65536)
        Clear-DirtyBitmap -Node $node.Name -Name b -Confirm:$false | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 0
        Get-DirtyBitmapRange -Node $node.Name -Name b | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name keep).Count | Should -Be (5 * 65536)
        (Get-DirtyBitmap -Node $node.Name -Name b).Recording | Should -BeTrue
        Write-BlockNode -Node $node.Name -Offset 700000 -Pattern 1 -Length 1 -Confirm:$false
        Get-RangeText -Node $node.Name -Name b | Should -Be @('655360+65536')
    }

    It 'clears a disabled bitmap, which stays disabled' {
        Disable-DirtyBitmap -Node $node.Name -Name b -Confirm:$false
        $c = Clear-DirtyBitmap -Node $node.Name -Name b -PassThru -Confirm:$false
        $c | Should -BeOfType ([BitmapBackup.DirtyBitmapInfo])
        $c.Count | Should -Be 0
        $c.Recording | Should -BeFalse
    }

    It 'clearing an empty bitmap is no error' {
        Clear-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop
        Clear-DirtyBitmap -Node $node.Name -Name b -Confirm:$false -ErrorAction Stop
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 0
    }

    It 'clears bitmaps piped from Get-DirtyBitmap' {
        Get-DirtyBitmap -Node $node.Name -Name b | Clear-DirtyBitmap -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name -Name b).Count | Should -Be 0
        (Get-DirtyBitmap -Node $node.Name -Name keep).Count | Should -Be (5 * 65536)
        Get-DirtyBitmap -Node $node.Name | Clear-DirtyBitmap -Confirm:$false
        (Get-DirtyBitmap -Node $node.Name | Measure-Object -Property Count -Sum).Sum | Should -Be 0
    }

    It 'clears a bitmap of a read-only node' {
        Close-BlockNode -Node $node.Name -Confirm:$false -WarningAction SilentlyContinue
        $ro = Open-BlockNode -Path $node.Path -Name (New-TestName) -ReadOnly
        $rw = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $rw.Name -Name w
        Write-BlockNode -Node $rw.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        $null = New-DirtyBitmap -Node $ro.Name -Name r
        Merge-DirtyBitmap -Node $ro.Name -Name r -Source (Get-DirtyBitmap -Node $rw.Name -Name w) -Confirm:$false
        (Get-DirtyBitmap -Node $ro.Name -Name r).Count | Should -Be 65536
        Clear-DirtyBitmap -Node $ro.Name -Name r -Confirm:$false -ErrorAction Stop
        (Get-DirtyBitmap -Node $ro.Name -Name r).Count | Should -Be 0
    }

    It 'refuses an unknown bitmap with BitmapNotFound, naming node and bitmap' {
        $e = Assert-BlockError { Clear-DirtyBitmap -Node $node.Name -Name nope -Confirm:$false -ErrorAction Stop } `
            -ErrorId "BitmapNotFound,$Cmd" -MessageContains "'nope'", "'$($node.Name)'" -Category ObjectNotFound
        $e.TargetObject | Should -BeExactly 'nope'
    }

    It 'refuses an unknown node with NodeNotFound' {
        Assert-BlockError { Clear-DirtyBitmap -Node nosuchnode -Name b -Confirm:$false -ErrorAction Stop } `
            -ErrorId "NodeNotFound,$Cmd" -MessageContains "'nosuchnode'" -Category ObjectNotFound
    }

    It 'rejects an empty bitmap name at binding' {
        { Clear-DirtyBitmap -Node $node.Name -Name '' -Confirm:$false -ErrorAction Stop } |
            Should -Throw -ErrorId "ParameterArgumentValidationErrorEmptyStringNotAllowed,$Cmd"
    }
}
