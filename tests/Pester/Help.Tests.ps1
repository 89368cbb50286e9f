<#
    Checks the help that build/Help.ps1 writes from docs/help/*.md (out/BitmapBackup/en-US/*-Help.xml):
    every exported cmdlet has real help, not the text Get-Help makes up when a cmdlet has no MAML entry.
    Runs against the staged module given by BITMAPBACKUP_MODULE (build.ps1 Test sets it).
#>

BeforeDiscovery {
    $manifest = if ($env:BITMAPBACKUP_MODULE) { $env:BITMAPBACKUP_MODULE } else { Join-Path $PSScriptRoot '../../out/BitmapBackup/BitmapBackup.psd1' }
    $Cmdlets = @((Import-PowerShellDataFile $manifest).CmdletsToExport)
}

BeforeAll {
    # A binary module cannot be reloaded (and removing it closes every node), so import it once, globally.
    if (-not (Get-Module -Name BitmapBackup)) {
        $manifest = if ($env:BITMAPBACKUP_MODULE) { $env:BITMAPBACKUP_MODULE } else { Join-Path $PSScriptRoot '../../out/BitmapBackup/BitmapBackup.psd1' }
        Import-Module $manifest -Global -ErrorAction Stop
    }
    $script:CommonParameters = @([System.Management.Automation.Cmdlet]::CommonParameters) +
        @([System.Management.Automation.Cmdlet]::OptionalCommonParameters | Where-Object { $_ -notin 'WhatIf', 'Confirm' })
    $script:ModuleCommands = @((Get-Module BitmapBackup).ExportedCmdlets.Keys)

    function Get-HelpText($Value) {
        # Get-Help text fields are arrays of objects with a Text property (or plain strings).
        return (@($Value) | ForEach-Object { if ($_ -is [string]) { $_ } elseif ($_) { $_.Text } }) -join "`n"
    }
}

Describe 'Help of <_>' -ForEach $Cmdlets {
    BeforeAll {
        $name = $_
        $command = Get-Command -Name $name -Module BitmapBackup
        $help = Get-Help -Name $name -Full
        $parameters = @($command.Parameters.Values | Where-Object { $_.Name -notin $CommonParameters })
    }

    It 'has a synopsis that is not the generated syntax' {
        $synopsis = "$($help.Synopsis)".Trim()
        $synopsis | Should -Not -BeNullOrEmpty
        # Without a MAML entry, Get-Help uses the syntax ("Name [-Param] <type> ...") as the synopsis.
        $synopsis | Should -Not -BeLike "$name*"
        $synopsis | Should -Not -Match '\{\{'
    }

    It 'has a description' {
        $text = Get-HelpText $help.description
        $text.Trim() | Should -Not -BeNullOrEmpty
        $text | Should -Not -Match '\{\{'
    }

    It 'has at least one example with code and an explanation' {
        $examples = @($help.examples.example)
        $examples.Count | Should -BeGreaterThan 0
        foreach ($e in $examples) {
            "$($e.code)".Trim() | Should -Not -BeNullOrEmpty -Because "every example of $name needs code ($($e.title))"
            (Get-HelpText $e.remarks).Trim() | Should -Not -BeNullOrEmpty -Because "every example of $name needs an explanation ($($e.title))"
            "$($e.code)" | Should -Not -Match '\{\{'
        }
    }

    It 'has a syntax section for every parameter set' {
        $items = @($help.syntax.syntaxItem)
        $items.Count | Should -Be @($command.ParameterSets).Count
        foreach ($item in $items) {
            $item.name | Should -Be $name
        }
        # Every parameter appears in at least one syntax item.
        $inSyntax = @($items | ForEach-Object { @($_.parameter) } | ForEach-Object { $_.name }) | Select-Object -Unique
        $missing = @($parameters.Name | Where-Object { $_ -notin $inSyntax })
        $missing | Should -BeNullOrEmpty -Because "the syntax of $name must show every parameter"
    }

    It 'describes every parameter' {
        $helpParameters = @{}
        foreach ($p in @($help.parameters.parameter)) { if ($p) { $helpParameters[$p.name] = $p } }
        $undocumented = @($parameters.Name | Where-Object {
                -not $helpParameters.ContainsKey($_) -or -not (Get-HelpText $helpParameters[$_].description).Trim()
            })
        $undocumented | Should -BeNullOrEmpty -Because "every parameter of $name needs a description"
        $unknown = @($helpParameters.Keys | Where-Object { $_ -notin $parameters.Name })
        $unknown | Should -BeNullOrEmpty -Because "the help of $name must not document parameters it does not have"
    }

    It 'shows the parameter metadata of the cmdlet' {
        foreach ($p in @($help.parameters.parameter)) {
            $info = $command.Parameters[$p.name]
            $sets = @($info.ParameterSets.Values)
            $mandatory = @($sets | Where-Object { -not $_.IsMandatory }).Count -eq 0
            $p.required | Should -Be "$mandatory".ToLowerInvariant() -Because "-$($p.name) of $name"
            $byValue = @($sets | Where-Object ValueFromPipeline).Count -gt 0
            $byName = @($sets | Where-Object ValueFromPipelineByPropertyName).Count -gt 0
            ($p.pipelineInput -like '*ByValue*') | Should -Be $byValue -Because "-$($p.name) of $name (pipeline by value)"
            ($p.pipelineInput -like '*ByPropertyName*') | Should -Be $byName -Because "-$($p.name) of $name (pipeline by property name)"
        }
    }

    It 'has related links, and its local ones name cmdlets of the module or about_ topics' {
        $all = @($help.relatedLinks.navigationLink | Where-Object { $_ -and "$($_.linkText)$($_.uri)".Trim() })
        $all.Count | Should -BeGreaterThan 0
        foreach ($l in $all | Where-Object { -not "$($_.uri)".Trim() }) {
            if ("$($l.linkText)".Trim() -like 'about_*') { continue }   # a help topic (about_Jobs): Get-Help finds it, not a browser
            "$($l.linkText)".Trim() | Should -BeIn $ModuleCommands -Because "a related link of $name without a URI must name a cmdlet"
        }
    }
}
