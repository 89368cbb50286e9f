BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
}

Describe 'BitmapBackup module manifest' {
    AfterEach { Close-TestNode }

    It 'is a valid manifest: the DSC resources'' script root module, the cmdlets'' binary module nested in it' {
        $info = Test-ModuleManifest -Path (Get-BitmapBackupModulePath) -ErrorAction Stop
        $info.Name | Should -Be 'BitmapBackup'
        $info.RootModule | Should -Be 'BitmapBackup.psm1'
        @((Import-PowerShellDataFile (Get-BitmapBackupModulePath)).NestedModules) | Should -Be @('BitmapBackup.Cmdlets.dll')
        $binary = @((Get-Module -Name BitmapBackup).NestedModules | Where-Object ModuleType -EQ 'Binary')
        $binary.Count | Should -Be 1
        $binary[0].ImplementingAssembly.GetName().Name | Should -Be 'BitmapBackup.Cmdlets'
    }

    It 'exports exactly the cmdlets implemented in its assembly, and no function, alias or variable' {
        $module = Get-Module -Name BitmapBackup
        $assembly = ($module.NestedModules | Where-Object ModuleType -EQ 'Binary').ImplementingAssembly
        $implemented = @($assembly.GetExportedTypes() |
                Where-Object { -not $_.IsAbstract -and $_.IsDefined([System.Management.Automation.CmdletAttribute], $false) } |
                ForEach-Object {
                    $a = $_.GetCustomAttributes([System.Management.Automation.CmdletAttribute], $false)[0]
                    '{0}-{1}' -f $a.VerbName, $a.NounName
                } | Sort-Object)
        @($module.ExportedCmdlets.Keys | Sort-Object) | Should -Be $implemented
        @(Get-Command -Module BitmapBackup | Where-Object CommandType -NE 'Cmdlet').Count | Should -Be 0
        $module.ExportedFunctions.Count | Should -Be 0
        $module.ExportedAliases.Count | Should -Be 0
        $module.ExportedVariables.Count | Should -Be 0
    }

    It 'exports the 15 node and bitmap cmdlets' {
        $exported = @((Get-Module -Name BitmapBackup).ExportedCmdlets.Keys)
        foreach ($name in Get-BitmapBackupCommandName) {
            $exported | Should -Contain $name
            (Get-Command -Name $name).CommandType | Should -Be 'Cmdlet'
        }
    }

    It '<Command> supports -WhatIf and -Confirm' -ForEach @(
        @{ Command = 'New-BlockImage' }, @{ Command = 'Close-BlockNode' }, @{ Command = 'Resize-BlockNode' },
        @{ Command = 'Write-BlockNode' }, @{ Command = 'New-DirtyBitmap' }, @{ Command = 'Enable-DirtyBitmap' },
        @{ Command = 'Disable-DirtyBitmap' }, @{ Command = 'Clear-DirtyBitmap' }, @{ Command = 'Remove-DirtyBitmap' },
        @{ Command = 'Merge-DirtyBitmap' }, @{ Command = 'Start-BlockExport' }, @{ Command = 'Stop-BlockExport' }
    ) {
        $parameters = (Get-Command $Command).Parameters
        $parameters.ContainsKey('WhatIf') | Should -BeTrue
        $parameters.ContainsKey('Confirm') | Should -BeTrue
    }

    It '<Command> changes nothing and has no -WhatIf' -ForEach @(
        @{ Command = 'Open-BlockNode' }, @{ Command = 'Get-BlockNode' }, @{ Command = 'Read-BlockNode' },
        @{ Command = 'Get-DirtyBitmap' }, @{ Command = 'Get-DirtyBitmapRange' }, @{ Command = 'Get-BlockExport' }
    ) {
        (Get-Command $Command).Parameters.ContainsKey('WhatIf') | Should -BeFalse
    }
}

Describe 'Format views' {
    AfterEach { Close-TestNode }

    It 'has a table view for <TypeName>' -ForEach @(
        @{ TypeName = 'BitmapBackup.DirtyBitmapInfo' }, @{ TypeName = 'BitmapBackup.BlockNodeInfo' },
        @{ TypeName = 'BitmapBackup.DirtyRange' }, @{ TypeName = 'BitmapBackup.BlockImageInfo' }, @{ TypeName = 'BitmapBackup.BlockExportInfo' }
    ) {
        $data = Get-FormatData -TypeName $TypeName
        $data | Should -Not -BeNullOrEmpty
        $data.FormatViewDefinition[0].Control | Should -BeOfType [System.Management.Automation.TableControl]
    }

    It 'gives every enum column of every table view room for its longest value' {
        [xml] $views = Get-Content -Raw (Join-Path (Split-Path (Get-BitmapBackupModulePath)) 'BitmapBackup.format.ps1xml')
        $assembly = ((Get-Module -Name BitmapBackup).NestedModules | Where-Object ModuleType -EQ 'Binary').ImplementingAssembly
        $checked = 0
        foreach ($view in $views.Configuration.ViewDefinitions.View) {
            $type = $assembly.GetType($view.ViewSelectedBy.TypeName)
            $headers = @($view.TableControl.TableHeaders.TableColumnHeader)
            $items = @($view.TableControl.TableRowEntries.TableRowEntry.TableColumnItems.TableColumnItem)
            for ($i = 0; $i -lt $items.Count; $i++) {
                $property = $items[$i].SelectSingleNode('PropertyName')
                if (-not $property) { continue }
                $propertyType = $type.GetProperty($property.InnerText).PropertyType
                $propertyType = [Nullable]::GetUnderlyingType($propertyType) ?? $propertyType
                if (-not $propertyType.IsEnum) { continue }
                $longest = ([enum]::GetNames($propertyType) | Measure-Object -Property Length -Maximum).Maximum
                $width = $headers[$i].SelectSingleNode('Width')
                if ($width) { [int]$width.InnerText | Should -BeGreaterOrEqual $longest -Because "$($view.Name).$($property.InnerText) shows $propertyType" }
                $checked++
            }
        }
        $checked | Should -BeGreaterThan 1
    }

    It 'shows an incremental backup''s sync mode whole' {
        $sample = [pscustomobject]@{ Node = 'vm'; Sync = [BitmapBackup.Core.Jobs.BackupSyncMode]::Incremental; Bitmap = 'daily'; Succeeded = $true
            BytesCopied = 1; Duration = [timespan]::FromSeconds(1); BytesPerSecond = 1; Target = '/b/inc.qcow2' }
        $sample.PSObject.TypeNames.Insert(0, 'BitmapBackup.BackupResult')
        ($sample | Out-String -Width 80) | Should -Match '\bIncremental\b'
    }

    It 'formats a bitmap with the DirtyBitmapInfo table' {
        $node = New-TestNode
        $text = New-DirtyBitmap -Node $node.Name -Name fmtbm | Out-String -Width 200
        $text | Should -Match 'Granularity\s+Count\s+Recording\s+Busy\s+Persistent\s+Inconsistent'
        $text | Should -Match ([regex]::Escape($node.Name) + '\s+fmtbm\s+65536\s+0\s+True\s+False\s+False\s+False')
    }

    It 'formats a node with the BlockNodeInfo table: name, format, size, path' {
        $node = New-TestNode
        $text = Get-BlockNode -Name $node.Name | Out-String -Width 300
        $text | Should -Match 'Name\s+Format\s+Size\s+Path'
        $text | Should -Match ([regex]::Escape($node.Name) + '\s+Raw\s+1048576\s+' + [regex]::Escape($node.Path))
    }

    It 'formats dirty ranges with the DirtyRange table' {
        $node = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name b
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
        $text = Get-DirtyBitmapRange -Node $node.Name -Name b | Out-String -Width 200
        $text | Should -Match 'Node\s+Bitmap\s+Offset\s+Length'
        $text | Should -Match ([regex]::Escape($node.Name) + '\s+b\s+0\s+65536')
    }
}

Describe 'Tab completion' {
    AfterEach { Close-TestNode }

    BeforeAll {
        function Get-Completion([string] $InputScript) {
            $result = TabExpansion2 -inputScript $InputScript -cursorColumn $InputScript.Length
            return [string[]]@($result.CompletionMatches | ForEach-Object CompletionText)
        }
    }

    It 'completes open node names for -Node and -Name parameters (<Command>)' -ForEach @(
        @{ Command = 'Get-BlockNode -Name ' }, @{ Command = 'Close-BlockNode -Node ' }, @{ Command = 'Resize-BlockNode -Node ' },
        @{ Command = 'Write-BlockNode -Node ' }, @{ Command = 'Read-BlockNode -Node ' }, @{ Command = 'New-DirtyBitmap -Node ' },
        @{ Command = 'Get-DirtyBitmap -Node ' }, @{ Command = 'Enable-DirtyBitmap -Node ' }, @{ Command = 'Merge-DirtyBitmap -Node ' },
        @{ Command = 'Get-DirtyBitmapRange -Node ' }
    ) {
        $prefix = New-TestName 'tab'
        $a = New-TestNode -Name "${prefix}alpha"
        $b = New-TestNode -Name "${prefix}beta"
        $other = New-TestNode
        $matches1 = Get-Completion ($Command + $prefix)
        $matches1 | Should -Be @($a.Name, $b.Name)
        Get-Completion ($Command + "${prefix}b") | Should -Be @($b.Name)
        $matches1 | Should -Not -Contain $other.Name
    }

    It 'completes node names for the first positional argument of Close-BlockNode' {
        $node = New-TestNode
        Get-Completion ('Close-BlockNode ' + $node.Name.Substring(0, 8)) | Should -Be @($node.Name)
    }

    It 'completes bitmap names of the -Node given, not those of other nodes' {
        $n1 = New-TestNode
        $n2 = New-TestNode
        $null = New-DirtyBitmap -Node $n1.Name -Name daily
        $null = New-DirtyBitmap -Node $n1.Name -Name weekly
        $null = New-DirtyBitmap -Node $n2.Name -Name dangling
        Get-Completion "Enable-DirtyBitmap -Node $($n1.Name) -Name " | Should -Be @('daily', 'weekly')
        Get-Completion "Enable-DirtyBitmap -Node $($n1.Name) -Name d" | Should -Be @('daily')
        Get-Completion "Get-DirtyBitmapRange -Node $($n2.Name) -Name d" | Should -Be @('dangling')
        Get-Completion "Merge-DirtyBitmap -Node $($n1.Name) -Name daily -Source w" | Should -Be @('weekly')
    }

    It 'completes bitmap names of every node (once each) when no -Node is given' {
        $prefix = New-TestName 'bm'
        $n1 = New-TestNode
        $n2 = New-TestNode
        $null = New-DirtyBitmap -Node $n1.Name -Name "${prefix}x"
        $null = New-DirtyBitmap -Node $n2.Name -Name "${prefix}x"
        $null = New-DirtyBitmap -Node $n2.Name -Name "${prefix}y"
        Get-Completion "Get-DirtyBitmap -Name $prefix" | Should -Be @("${prefix}x", "${prefix}y")
    }

    It 'quotes a completed bitmap name with a space' {
        $node = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name 'my bitmap'
        Get-Completion "Clear-DirtyBitmap -Node $($node.Name) -Name my" | Should -Be @("'my bitmap'")
    }
}

Describe 'Tab completion of names that are not bare words' {
    # Each accepted completion is run: it must act on exactly the bitmap it shows. Next to the special names the
    # node has the bitmaps that a wrongly quoted completion would hit instead ('daily' for 'daily$old', 'a' for
    # 'a;b', '16' for '0x10', 'True' for '$true', ...).
    BeforeAll {
        $Special = @('daily$old', 'a;b', 'x,y', '(p)', '{q}', '@s', '#h', 'b`t', "it's", 'say"hi"', "sm$([char]0x2019)s", '-dash', 'a&b',
            'a|b', '<lt', '>gt', '0x10', '1kb', '$true', 'sp ace', 'a$(b)', '--%', "it''s")
        $Decoys = @('daily', 'old', 'a', 'b', 'x', 'y', 'p', 'q', 's', 'h', 'bt', 'it', 'say', 'sm', 'dash', 'lt', 'gt', '16', '1024', 'True', 'sp', 'ace')

        function New-CompletionNode {
            <# A node with every special name and every decoy as bitmaps, each with 64 KiB dirty. #>
            $node = New-TestNode
            foreach ($name in $Special + $Decoys) { $null = New-DirtyBitmap -Node $node.Name -Name $name -ErrorAction Stop }
            Write-BlockNode -Node $node.Name -Offset 0 -Pattern 1 -Length 1 -Confirm:$false
            return $node.Name
        }

        function Get-AcceptedLine {
            <# The command line after accepting the completion shown as -Name (TabExpansion2's replacement applied). #>
            param([string] $Line, [string] $Name)
            $result = TabExpansion2 -inputScript $Line -cursorColumn $Line.Length
            $match = @($result.CompletionMatches | Where-Object { $_.ListItemText -ceq $Name })
            $match.Count | Should -Be 1 -Because "'$Name' is offered once for: $Line"
            return $Line.Substring(0, $result.ReplacementIndex) + $match[0].CompletionText + $Line.Substring($result.ReplacementIndex + $result.ReplacementLength)
        }

        function Get-Completion([string] $InputScript) {
            $result = TabExpansion2 -inputScript $InputScript -cursorColumn $InputScript.Length
            return [string[]]@($result.CompletionMatches | ForEach-Object CompletionText)
        }

        function Get-DirtyCount([string] $Node) {
            $counts = @{}
            Get-DirtyBitmap -Node $Node -ErrorAction Stop | ForEach-Object { $counts[$_.Name] = $_.Count }
            return $counts
        }
    }
    AfterEach { Close-TestNode }

    It 'the completion of <Name> clears exactly that bitmap' -ForEach @(
        'daily$old', 'a;b', 'x,y', '(p)', '{q}', '@s', '#h', 'b`t', "it's", 'say"hi"', "sm$([char]0x2019)s", '-dash', 'a&b', 'a|b',
        '<lt', '>gt', '0x10', '1kb', '$true', 'sp ace', 'a$(b)', '--%', "it''s" | ForEach-Object { @{ Name = $_ } }
    ) {
        $node = New-CompletionNode
        $start = "Clear-DirtyBitmap -ErrorAction Stop -Confirm:`$false -Node $node -Name "
        $line = Get-AcceptedLine -Line $start -Name $Name
        $line | Should -Not -BeExactly ($start + $Name) -Because 'the name is not a bare word'
        Invoke-Expression $line
        $counts = Get-DirtyCount $node
        $counts[$Name] | Should -Be 0 -Because "'$Name' was cleared by: $line"
        @($counts.Keys | Where-Object { $_ -cne $Name -and $counts[$_] -ne 64KB }) | Should -BeNullOrEmpty -Because "only '$Name' may be cleared by: $line"
    }

    It "offers daily`$old quoted after 'dai' (the issue's case), and a word begun with a quote keeps it" {
        $node = New-CompletionNode
        Get-Completion "Clear-DirtyBitmap -Node $node -Name dai" | Should -Be @("'daily`$old'", 'daily')
        Get-Completion "Clear-DirtyBitmap -Node $node -Name `"dai" | Should -Be @('"daily`$old"', '"daily"')
        Get-Completion "Clear-DirtyBitmap -Node $node -Name 'it''" | Should -Be @("'it''s'", "'it''''s'")
        $line = Get-AcceptedLine -Line "Clear-DirtyBitmap -ErrorAction Stop -Confirm:`$false -Node $node -Name `"dai" -Name 'daily$old'
        Invoke-Expression $line
        (Get-DirtyCount $node)['daily$old'] | Should -Be 0
        (Get-DirtyCount $node)['daily'] | Should -Be 64KB
    }

    It 'escapes wildcard characters for a parameter that takes wildcards, and only there' {
        $node = New-TestNode
        foreach ($name in 'a*', 'ab', 'w[1]', 'w1') { $null = New-DirtyBitmap -Node $node.Name -Name $name }
        Get-Completion "Get-DirtyBitmap -Node $($node.Name) -Name a" | Should -Be @("'a``*'", 'ab')
        Get-Completion "Clear-DirtyBitmap -Node $($node.Name) -Name a" | Should -Be @('a*', 'ab')
        foreach ($name in 'a*', 'w[1]') {
            $line = Get-AcceptedLine -Line "Get-DirtyBitmap -Node $($node.Name) -Name " -Name $name
            @(Invoke-Expression $line | ForEach-Object Name) | Should -Be @($name) -Because "the completion of '$name' gets only it: $line"
        }
    }

    It 'keeps node names and bitmap names that are bare words bare' {
        $node = New-TestNode -Name (New-TestName 'x-y.z_')
        Get-Completion "Get-BlockNode -Name $($node.Name.Substring(0, 6))" | Should -Be @($node.Name)
        $bare = @('daily', 'a#b', 'a=b', 'ab.c-d', 'x:y', 'w1+2', 'ü-ß')
        foreach ($name in $bare) { $null = New-DirtyBitmap -Node $node.Name -Name $name }
        Get-Completion "Clear-DirtyBitmap -Node $($node.Name) -Name " | Should -Be $bare
    }
}

Describe '-WhatIf changes nothing' {
    AfterEach { Close-TestNode }

    BeforeEach {
        $node = New-TestNode
        $null = New-DirtyBitmap -Node $node.Name -Name on
        $null = New-DirtyBitmap -Node $node.Name -Name off -Disabled
        $null = New-DirtyBitmap -Node $node.Name -Name src -Granularity 512
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 0x11 -Length 100 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 300000 -Pattern 0x22 -Length 10 -Confirm:$false
    }

    It 'New-BlockImage -WhatIf creates no file' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.img')
        New-BlockImage -Path $path -Size 1MB -WhatIf | Should -BeNullOrEmpty
        Test-Path $path | Should -BeFalse
    }

    It 'Close-BlockNode -WhatIf leaves the node open' {
        Close-BlockNode -Node $node.Name -WhatIf
        (Get-BlockNode -Name $node.Name).Name | Should -Be $node.Name
    }

    It 'Resize-BlockNode -WhatIf keeps the size' {
        Resize-BlockNode -Node $node.Name -Size 2MB -PassThru -WhatIf | Should -BeNullOrEmpty
        (Get-BlockNode -Name $node.Name).Size | Should -Be 1MB
        (Get-Item $node.Path).Length | Should -Be 1MB
    }

    It 'Write-BlockNode -WhatIf writes nothing and marks nothing (<Set>)' -ForEach @(
        @{ Set = 'Data'; Arguments = @{ Data = [byte[]](1, 2, 3) } },
        @{ Set = 'Pattern'; Arguments = @{ Pattern = 0x7F; Length = 4096 } },
        @{ Set = 'Zero'; Arguments = @{ Zero = $true; Length = 100 } }
    ) {
        Write-BlockNode -Node $node.Name -Offset 500000 @Arguments -WhatIf
        Write-BlockNode -Node $node.Name -Offset 0 -Zero -Length 100 -WhatIf
        Get-RangeText -Node $node.Name -Name on | Should -Be @('0+65536', '262144+65536')
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 500000 -Length 4096) -Value 0 | Should -Be -1
        Find-ByteMismatch -Bytes (Read-BlockNode -Node $node.Name -Offset 0 -Length 100) -Value 0x11 | Should -Be -1
    }

    It 'New-DirtyBitmap -WhatIf adds no bitmap' {
        New-DirtyBitmap -Node $node.Name -Name ghost -WhatIf | Should -BeNullOrEmpty
        Get-DirtyBitmap -Node $node.Name -Name ghost -ErrorAction SilentlyContinue | Should -BeNullOrEmpty
    }

    It 'Enable-DirtyBitmap -WhatIf leaves a disabled bitmap disabled' {
        Enable-DirtyBitmap -Node $node.Name -Name off -PassThru -WhatIf | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name off).Recording | Should -BeFalse
    }

    It 'Disable-DirtyBitmap -WhatIf leaves a recording bitmap recording' {
        Disable-DirtyBitmap -Node $node.Name -Name on -PassThru -WhatIf | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name on).Recording | Should -BeTrue
    }

    It 'Clear-DirtyBitmap -WhatIf keeps the bits' {
        Clear-DirtyBitmap -Node $node.Name -Name on -PassThru -WhatIf | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name on).Count | Should -Be (2 * 64KB)
    }

    It 'Remove-DirtyBitmap -WhatIf keeps the bitmap' {
        Remove-DirtyBitmap -Node $node.Name -Name on -WhatIf
        (Get-DirtyBitmap -Node $node.Name -Name on).Name | Should -Be 'on'
        (Get-DirtyBitmap -Node $node.Name -Name src).Name | Should -Be 'src'
    }

    It 'Merge-DirtyBitmap -WhatIf keeps the target bits' {
        Merge-DirtyBitmap -Node $node.Name -Name off -Source on -PassThru -WhatIf | Should -BeNullOrEmpty
        (Get-DirtyBitmap -Node $node.Name -Name off).Count | Should -Be 0
    }
}
