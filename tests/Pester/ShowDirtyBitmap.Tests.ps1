# A picture of the dirty map (issue 12, part 4): Show-DirtyBitmap as text (the strip of block characters, caption, axis,
# scale, legend) and as SVG, asserted for bitmaps whose dirty clusters are known exactly.
BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule

    $script:Legend = "Dirty share of a cell: ' ' none  '▁' under 12.5 %  '▂' 12.5-25 %  '▃' 25-37.5 %  '▄' 37.5-50 %  '▅' 50-62.5 %  '▆' 62.5-75 %  '▇' 75-87.5 %  '█' 87.5 % or more"

    function New-KnownBitmap {
        <#
        An 8 MiB raw node (128 clusters of 64 KiB) with bitmap 'b' dirty in: cluster 0 (1 of cell 0's 4 at -Width 32),
        clusters 40-41 (2 of cell 10's), 96-111 (all of cells 24-27) and 124-126 (3 of cell 31's): 22 clusters, 4 extents.
        #>
        param([string] $Bitmap = 'b')
        $node = New-TestNode -Size 8MB
        $null = New-DirtyBitmap -Node $node.Name -Name $Bitmap -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 10 -Pattern 1 -Length 1 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset (40 * 64KB + 100) -Pattern 1 -Length (64KB) -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset (96 * 64KB) -Pattern 1 -Length 1MB -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset (124 * 64KB) -Zero -Length (3 * 64KB) -Confirm:$false
        return $node
    }
}

Describe 'Show-DirtyBitmap text' {
    AfterEach { Close-TestNode }

    It 'draws a known bitmap: caption, strip, axis, scale and legend' {
        $node = New-KnownBitmap
        $lines = @(Show-DirtyBitmap -Node $node.Name -Name b -Width 32)
        $lines.Count | Should -Be 5
        $lines | ForEach-Object { $_ | Should -BeOfType [string] }
        $lines[0] | Should -BeExactly "Dirty bitmap 'b' of node '$($node.Name)': 1.3 MiB dirty (1,441,792 of 8,388,608 bytes, 17.19 %), 22 of 128 clusters of 64 KiB, 4 extents"
        $lines[1] | Should -BeExactly ('|▃' + (' ' * 9) + '▅' + (' ' * 13) + '████' + (' ' * 3) + '▇|')
        $lines[2] | Should -BeExactly (' 0' + (' ' * 13) + '4 MiB' + (' ' * 8) + '8 MiB')
        $lines[3] | Should -BeExactly 'Scale: 32 cells, each 256 KiB of the disk (4 clusters of 64 KiB).'
        $lines[4] | Should -BeExactly $script:Legend
    }

    It 'uses 64 cells by default, and one cell per cluster when the bitmap has fewer clusters than -Width' {
        $node = New-KnownBitmap
        (Show-DirtyBitmap -Node $node.Name -Name b)[1].Length | Should -Be 66
        $small = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $small.Name -Name s -Confirm:$false
        Write-BlockNode -Node $small.Name -Offset (3 * 64KB) -Pattern 7 -Length (2 * 64KB) -Confirm:$false
        $lines = @(Show-DirtyBitmap -Node $small.Name -Name s -Width 64)
        $lines[1] | Should -BeExactly ('|   ██' + (' ' * 11) + '|')
        $lines[3] | Should -BeExactly 'Scale: 16 cells, each 64 KiB of the disk (1 cluster of 64 KiB).'
        $lines[0] | Should -BeLike '*: 128 KiB dirty (131,072 of 1,048,576 bytes, 12.5 %), 2 of 16 clusters of 64 KiB, 1 extent'
    }

    It 'says "about" when the cells are not all the same size, and counts every dirty cluster once' {
        $node = New-TestNode -Size 1MB
        $null = New-DirtyBitmap -Node $node.Name -Name g -Granularity 4096 -Confirm:$false
        Write-BlockNode -Node $node.Name -Offset 0 -Pattern 3 -Length 1MB -Confirm:$false
        $lines = @(Show-DirtyBitmap -Node $node.Name -Name g -Width 10)
        $lines[1] | Should -BeExactly ('|' + ('█' * 10) + '|')
        $lines[3] | Should -BeExactly 'Scale: 10 cells, each about 102.3 KiB of the disk (25-26 clusters of 4 KiB).'
        $lines[0] | Should -BeLike '*: 1 MiB dirty (1,048,576 of 1,048,576 bytes, 100 %), 256 of 256 clusters of 4 KiB, 1 extent'
    }

    It 'draws a clean bitmap as an empty strip, and a single dirty cluster among thousands as ▁' {
        $node = New-TestNode -Size 1GB
        $null = New-DirtyBitmap -Node $node.Name -Name c -Confirm:$false
        (Show-DirtyBitmap -Node $node.Name -Name c -Width 16)[1] | Should -BeExactly ('|' + (' ' * 16) + '|')
        Write-BlockNode -Node $node.Name -Offset (1GB - 1) -Pattern 1 -Length 1 -Confirm:$false
        $lines = @(Show-DirtyBitmap -Node $node.Name -Name c -Width 16)
        $lines[1] | Should -BeExactly ('|' + (' ' * 15) + '▁|')
        $lines[3] | Should -BeExactly 'Scale: 16 cells, each 64 MiB of the disk (1,024 clusters of 64 KiB).'
    }

    It 'takes bitmaps from the pipeline (Get-DirtyBitmap)' {
        $node = New-KnownBitmap
        $null = New-DirtyBitmap -Node $node.Name -Name other -Confirm:$false
        $lines = @(Get-DirtyBitmap -Node $node.Name | Show-DirtyBitmap -Width 32)
        $lines.Count | Should -Be 10
        $lines[0] | Should -BeLike "Dirty bitmap 'b' *"
        $lines[5] | Should -BeLike "Dirty bitmap 'other' *0 B dirty (0 of 8,388,608 bytes, 0 %), 0 of 128 clusters of 64 KiB, 0 extents"
    }

    It 'reports NodeNotFound, BitmapNotFound, and refuses a -Width out of range' {
        $node = New-KnownBitmap
        Assert-BlockError { Show-DirtyBitmap -Node nosuchnode -Name b -ErrorAction Stop } -ErrorId 'NodeNotFound,BitmapBackup.ShowDirtyBitmapCommand'
        Assert-BlockError { Show-DirtyBitmap -Node $node.Name -Name nosuch -ErrorAction Stop } -ErrorId 'BitmapNotFound,BitmapBackup.ShowDirtyBitmapCommand'
        { Show-DirtyBitmap -Node $node.Name -Name b -Width 7 } | Should -Throw -ErrorId 'ParameterArgumentValidationError,BitmapBackup.ShowDirtyBitmapCommand'
    }
}

Describe 'Show-DirtyBitmap -OutFile (SVG)' {
    AfterEach { Close-TestNode }

    It 'writes an SVG with the node, bitmap, time and counts as text and one shaded rect per cell' {
        $node = New-KnownBitmap
        $path = Join-Path (New-TestDirectory) 'map.svg'
        $before = [DateTimeOffset]::UtcNow.AddSeconds(-2)
        Show-DirtyBitmap -Node $node.Name -Name b -Width 32 -OutFile $path | Should -BeNullOrEmpty
        $after = [DateTimeOffset]::UtcNow.AddSeconds(2)
        $bytes = [IO.File]::ReadAllBytes($path)
        $bytes[0] | Should -Be ([byte][char]'<') -Because 'the file has no byte order mark'
        [xml] $svg = [Text.Encoding]::UTF8.GetString($bytes)
        $root = $svg.DocumentElement
        $root.LocalName | Should -Be 'svg'
        $root.NamespaceURI | Should -Be 'http://www.w3.org/2000/svg'
        $root.GetAttribute('data-node') | Should -Be $node.Name
        $root.GetAttribute('data-bitmap') | Should -Be 'b'
        $ns = [Xml.XmlNamespaceManager]::new($svg.NameTable)
        $ns.AddNamespace('s', 'http://www.w3.org/2000/svg')
        $text = { param($id) $svg.SelectSingleNode("//s:text[@id='$id']", $ns).InnerText }
        & $text 'title' | Should -BeExactly "Dirty bitmap 'b' of node '$($node.Name)'"
        & $text 'caption' | Should -BeExactly "Dirty bitmap 'b' of node '$($node.Name)': 1.3 MiB dirty (1,441,792 of 8,388,608 bytes, 17.19 %), 22 of 128 clusters of 64 KiB, 4 extents"
        & $text 'scale' | Should -BeExactly 'Scale: 32 cells, each 256 KiB of the disk (4 clusters of 64 KiB).'
        $stamp = (& $text 'time') -replace '^Read at ', ''
        $stamp | Should -Match '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$'
        $time = [DateTimeOffset]::Parse($stamp, [Globalization.CultureInfo]::InvariantCulture)
        $time | Should -BeGreaterOrEqual $before
        $time | Should -BeLessOrEqual $after

        $cells = @($svg.SelectNodes("//s:g[@id='cells']/s:rect[@class='cell']", $ns))
        $cells.Count | Should -Be 32
        $levels = @($cells | ForEach-Object { [int]$_.GetAttribute('data-level') })
        $expected = @(0) * 32
        $expected[0] = 3; $expected[10] = 5; $expected[24] = 8; $expected[25] = 8; $expected[26] = 8; $expected[27] = 8; $expected[31] = 7
        $levels | Should -Be $expected
        $cells[10].GetAttribute('data-offset') | Should -Be ([string](10 * 256KB))
        $cells[10].GetAttribute('data-length') | Should -Be ([string](256KB))
        $cells[10].GetAttribute('data-dirty-clusters') | Should -Be '2'
        $cells[10].GetAttribute('fill-opacity') | Should -Be '0.625'
        $cells[31].SelectSingleNode('s:title', $ns).InnerText | Should -BeExactly '7.7 MiB to 8 MiB: 3 of 4 clusters dirty'
        [int]$cells[1].GetAttribute('x') - [int]$cells[0].GetAttribute('x') | Should -Be 30
        @($svg.SelectNodes("//s:g[@id='legend']/s:rect[@class='swatch']", $ns)).Count | Should -Be 9
        @($svg.SelectNodes("//s:g[@id='axis']/s:text", $ns) | ForEach-Object InnerText) | Should -Be @('0', '4 MiB', '8 MiB')
    }

    It '-PassThru writes the text too, and any bitmap name is escaped' {
        $name = 'a<b&"c''d'
        $node = New-KnownBitmap -Bitmap $name
        $path = Join-Path (New-TestDirectory) 'odd.svg'
        $lines = @(Show-DirtyBitmap -Node $node.Name -Name $name -Width 32 -OutFile $path -PassThru)
        $lines.Count | Should -Be 5
        $lines[1] | Should -BeExactly ('|▃' + (' ' * 9) + '▅' + (' ' * 13) + '████' + (' ' * 3) + '▇|')
        [xml] $svg = Get-Content -Raw $path
        $svg.DocumentElement.GetAttribute('data-bitmap') | Should -BeExactly $name
        $svg.DocumentElement.title | Should -BeExactly "Dirty bitmap '$name' of node '$($node.Name)'"
    }

    It 'ImageIOFailed when the file cannot be written' {
        $node = New-KnownBitmap
        $path = Join-Path (New-TestDirectory) 'missing/map.svg'
        Assert-BlockError { Show-DirtyBitmap -Node $node.Name -Name b -OutFile $path -ErrorAction Stop } -ErrorId 'ImageIOFailed,BitmapBackup.ShowDirtyBitmapCommand' -MessageContains $path -Category WriteError
    }
}
