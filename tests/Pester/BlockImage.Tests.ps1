BeforeAll {
    Import-Module (Join-Path $PSScriptRoot 'TestHelpers.psm1') -Force
    Import-BitmapBackupModule
    $Cmd = 'BitmapBackup.NewBlockImageCommand'
}

Describe 'New-BlockImage' {
    AfterEach { Close-TestNode }
    AfterAll { Close-TestNode }

    It 'creates a sparse raw image of the size given and writes a BlockImageInfo' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.img')
        $info = New-BlockImage -Path $path -Size 1MB -Confirm:$false
        $info | Should -BeOfType ([BitmapBackup.BlockImageInfo])
        $info.Path | Should -Be $path
        $info.Format | Should -Be 'Raw'
        $info.Size | Should -Be 1048576
        "$info" | Should -Be $path
        (Get-Item $path).Length | Should -Be 1048576
        Find-ByteMismatch -Bytes (Get-FileBytes -Path $path -Offset 0 -Length 4096) -Value 0 | Should -Be -1
    }

    It 'takes sizes like 64MB and 1GB (sparse, fast)' {
        $dir = New-TestDirectory
        (New-BlockImage -Path (Join-Path $dir 'a.img') -Size 64MB -Confirm:$false).Size | Should -Be 67108864
        (New-BlockImage -Path (Join-Path $dir 'b.img') -Size 1GB -Confirm:$false).Size | Should -Be 1073741824
        (Get-Item (Join-Path $dir 'a.img')).Length | Should -Be 64MB
        (Get-Item (Join-Path $dir 'b.img')).Length | Should -Be 1GB
    }

    It 'takes the smallest size, 512 bytes' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.img')
        (New-BlockImage $path 512 -Confirm:$false).Size | Should -Be 512
    }

    It 'resolves a relative path against the current PowerShell location' {
        $dir = New-TestDirectory
        Push-Location $dir
        try {
            $info = New-BlockImage -Path rel.img -Size 1MB -Confirm:$false
        }
        finally { Pop-Location }
        $info.Path | Should -Be (Join-Path $dir 'rel.img')
        Test-Path (Join-Path $dir 'rel.img') | Should -BeTrue
    }

    It 'resolves a PowerShell drive path (TestDrive:)' {
        $name = (New-TestName) + '.img'
        $info = New-BlockImage -Path "TestDrive:/$name" -Size 1MB -Confirm:$false
        $info.Path | Should -Be (Join-Path (Get-PSDrive TestDrive).Root $name)
        Test-Path (Join-Path (Get-PSDrive TestDrive).Root $name) | Should -BeTrue
        (Open-BlockNode -Path "TestDrive:/$name" -Name (New-TestName)).Path | Should -Be $info.Path
    }

    It 'an explicit -Format Raw wins over a .qcow2 extension' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.qcow2')
        $info = New-BlockImage -Path $path -Size 1MB -Format Raw -Confirm:$false
        $info.Format | Should -Be 'Raw'
        (Get-Item $path).Length | Should -Be 1MB
    }

    It 'pipes into Open-BlockNode (Path by property name)' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName 'p') + '.img')
        $node = New-BlockImage -Path $path -Size 2MB -Confirm:$false | Open-BlockNode
        $node.Path | Should -Be $path
        $node.Size | Should -Be 2MB
        $node.Name | Should -Be ([IO.Path]::GetFileNameWithoutExtension($path))
    }

    It 'refuses a size of <Size> with InvalidImageSize, naming the path, and creates no file' -ForEach @(
        @{ Size = 0 }, @{ Size = -512 }, @{ Size = 1000 }, @{ Size = 513 }, @{ Size = 1048575 }
    ) {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.img')
        $e = Assert-BlockError { New-BlockImage -Path $path -Size $Size -Confirm:$false -ErrorAction Stop } `
            -ErrorId "InvalidImageSize,$Cmd" -MessageContains "'$path'", "$Size" -Category InvalidArgument
        $e.TargetObject | Should -Be $path
        Test-Path $path | Should -BeFalse
    }

    It 'refuses an existing file with ImageAlreadyExists and leaves it untouched' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.img')
        Set-Content -Path $path -Value 'precious' -NoNewline
        Assert-BlockError { New-BlockImage -Path $path -Size 1MB -Confirm:$false -ErrorAction Stop } `
            -ErrorId "ImageAlreadyExists,$Cmd" -MessageContains "'$path'" -Category ResourceExists
        Get-Content -Path $path -Raw | Should -BeExactly 'precious'
    }

    It 'refuses an image it created itself a second time with ImageAlreadyExists' {
        $path = New-TestImage -Size 1MB
        Assert-BlockError { New-BlockImage -Path $path -Size 2MB -Confirm:$false -ErrorAction Stop } `
            -ErrorId "ImageAlreadyExists,$Cmd" -MessageContains "'$path'"
        (Get-Item $path).Length | Should -Be 1MB
    }

    It 'refuses a path in a folder that does not exist with ImageNotFound' {
        $path = Join-Path (Get-TestDirectory) 'no-such-folder/x.img'
        Assert-BlockError { New-BlockImage -Path $path -Size 1MB -Confirm:$false -ErrorAction Stop } `
            -ErrorId "ImageNotFound,$Cmd" -MessageContains "'$path'" -Category ObjectNotFound
        Test-Path $path | Should -BeFalse
    }

    It 'writes a non-terminating error (the script goes on) without -ErrorAction Stop' {
        $path = New-TestImage
        New-BlockImage -Path $path -Size 1MB -Confirm:$false -ErrorAction SilentlyContinue -ErrorVariable ev | Should -BeNullOrEmpty
        $ev.Count | Should -Be 1
        $ev[0].FullyQualifiedErrorId | Should -BeExactly "ImageAlreadyExists,$Cmd"
    }

    It 'rejects an empty path at binding' {
        { New-BlockImage -Path '' -Size 1MB -Confirm:$false -ErrorAction Stop } |
            Should -Throw -ErrorId 'ParameterArgumentValidationError,BitmapBackup.NewBlockImageCommand'
    }
}

# qcow2 comes later: when New-BlockImage learns to create qcow2 images, update this block.
Describe 'New-BlockImage: format and size checks' {
    It 'checks the size of a qcow2 image too' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.qcow2')
        Assert-BlockError { New-BlockImage -Path $path -Size 1000 -Confirm:$false -ErrorAction Stop } `
            -ErrorId 'InvalidImageSize,BitmapBackup.NewBlockImageCommand'
        Test-Path $path | Should -BeFalse
    }

    It 'refuses a cluster size or a backing file for a raw image' {
        $path = Join-Path (Get-TestDirectory) ((New-TestName) + '.img')
        Assert-BlockError { New-BlockImage -Path $path -Size 1MB -ClusterSize 4096 -Confirm:$false -ErrorAction Stop } `
            -ErrorId 'UnsupportedFormat,BitmapBackup.NewBlockImageCommand' -MessageContains "'$path'" -Category InvalidArgument
        Test-Path $path | Should -BeFalse
    }
}
