#!/usr/bin/env pwsh
<#
.SYNOPSIS
    Help for the module's cmdlets without platyPS: markdown pages (Scaffold) and MAML built from them (Maml).
.DESCRIPTION
    Always run in a fresh pwsh (a binary module cannot be reloaded), e.g. from build.ps1:
        dotnet "$PSHOME/pwsh.dll" -NoProfile -NonInteractive -File build/Help.ps1 -Mode Maml -Strict -ModulePath out/BitmapBackup/BitmapBackup.psd1 -DocsPath docs/help

    -Mode Scaffold writes docs/help/<Cmdlet>.md in the platyPS 2.0.0 schema for every exported cmdlet that has no
    page yet (existing pages are never touched). Syntax and the yaml block of each parameter come from Get-Command;
    the prose is {{ ... }} placeholders to replace.

    -Mode Maml reads the prose of the pages (synopsis, description, examples, parameter descriptions, default
    values, inputs, outputs, notes, related links) and takes the syntax and every parameter attribute from the
    cmdlets themselves (parameter sets, type, mandatory, position, pipeline input, aliases, wildcards, accepted
    values), so the MAML can never disagree with the code. It writes <ModuleBase>/en-US/<Assembly>.dll-Help.xml.
    A page whose SYNTAX or yaml blocks drifted from the code only gets a warning.

    -Strict makes these fail the run (exit code 1): an exported cmdlet without a page, a page for a cmdlet that is
    not exported, an undocumented parameter, a documented parameter that does not exist, leftover {{ ... }}
    placeholders, and an empty synopsis, description, example list or parameter description.
.EXAMPLE
    dotnet pwsh -NoProfile -NonInteractive -File build/Help.ps1 -Mode Scaffold -ModulePath out/BitmapBackup/BitmapBackup.psd1 -DocsPath docs/help
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory)]
    [ValidateSet('Scaffold', 'Maml')]
    [string] $Mode,

    # The staged module manifest (out/BitmapBackup/BitmapBackup.psd1).
    [Parameter(Mandatory)]
    [string] $ModulePath,

    # The folder of the markdown pages (docs/help).
    [Parameter(Mandatory)]
    [string] $DocsPath,

    # Fail on missing, extra or unfinished documentation.
    [switch] $Strict
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$PSStyle.OutputRendering = 'PlainText'

$NsMaml = 'http://schemas.microsoft.com/maml/2004/10'
$NsCommand = 'http://schemas.microsoft.com/maml/dev/command/2004/10'
$NsDev = 'http://schemas.microsoft.com/maml/dev/2004/10'
$NsMSHelp = 'http://msdn.microsoft.com/mshelp'
$ShouldProcessParameters = @('WhatIf', 'Confirm')
$CommonNames = @([System.Management.Automation.Cmdlet]::CommonParameters) + @([System.Management.Automation.Cmdlet]::OptionalCommonParameters)
$StandardText = @{
    WhatIf  = 'Shows what would happen if the cmdlet runs. The cmdlet is not run.'
    Confirm = 'Prompts you for confirmation before running the cmdlet.'
}
$Problems = [System.Collections.Generic.List[string]]::new()
$ModelCache = @{}   # cmdlet name -> parameter model

#region Reflection

function Get-ShortTypeName([type] $Type) {
    if ($Type.IsArray) { return (Get-ShortTypeName $Type.GetElementType()) + '[]' }
    $under = [Nullable]::GetUnderlyingType($Type)
    if ($under) { return Get-ShortTypeName $under }
    if ($Type.IsGenericType) { return ($Type.Name -replace '`\d+$') + '[' + (($Type.GetGenericArguments() | ForEach-Object { Get-ShortTypeName $_ }) -join ',') + ']' }
    return $Type.Name
}

function Get-FullTypeName([type] $Type) {
    if ($Type.IsArray) { return (Get-FullTypeName $Type.GetElementType()) + '[]' }
    $under = [Nullable]::GetUnderlyingType($Type)
    if ($under) { return Get-FullTypeName $under }
    return $Type.FullName
}

function Test-ShouldProcess($Command) {
    return $Command.Parameters.ContainsKey('WhatIf') -and $Command.Parameters.ContainsKey('Confirm')
}

function Get-PipelineText([bool] $ByValue, [bool] $ByPropertyName) {
    $kinds = @()
    if ($ByPropertyName) { $kinds += 'ByPropertyName' }
    if ($ByValue) { $kinds += 'ByValue' }
    if ($kinds.Count -eq 0) { return 'False' }
    return "True ($($kinds -join ', '))"
}

function Get-ParameterModel($Command) {
    # One object per parameter (common parameters excepted, WhatIf/Confirm kept), in the order of first appearance,
    # each with its metadata per parameter set.
    if ($script:ModelCache.ContainsKey($Command.Name)) { return $script:ModelCache[$Command.Name] }
    $sets = @(Get-OrderedSets $Command)
    $allSets = $sets.Count -eq 1 -and $sets[0].Name -eq '__AllParameterSets'
    $byName = [ordered]@{}
    foreach ($set in $sets) {
        foreach ($p in $set.Parameters) {
            if ($p.Name -in $CommonNames -and $p.Name -notin $ShouldProcessParameters) { continue }
            if (-not $byName.Contains($p.Name)) {
                $type = $p.ParameterType
                $valid = @()
                $validate = @($p.Attributes.Where({ $_ -is [System.Management.Automation.ValidateSetAttribute] }))
                if ($validate.Count -gt 0) { $valid = @($validate[0].ValidValues) }
                elseif ($type.IsEnum) { $valid = @([Enum]::GetNames($type)) }
                elseif ($type.IsArray -and $type.GetElementType().IsEnum) { $valid = @([Enum]::GetNames($type.GetElementType())) }
                $byName[$p.Name] = [pscustomobject]@{
                    Name           = $p.Name
                    Type           = $type
                    ShortType      = Get-ShortTypeName $type
                    FullType       = Get-FullTypeName $type
                    IsSwitch       = $type -eq [System.Management.Automation.SwitchParameter]
                    Aliases        = @($p.Aliases)
                    Globbing       = $p.Attributes.Where({ $_ -is [System.Management.Automation.SupportsWildcardsAttribute] }).Count -gt 0
                    ValidValues    = $valid
                    IsShouldProcess = $p.Name -in $ShouldProcessParameters
                    Sets           = [System.Collections.Generic.List[object]]::new()
                    # Merged over the sets, filled in below.
                    InAllSets      = $false
                    Mandatory      = $true
                    Position       = 'Named'
                    Pipeline       = 'False'
                }
            }
            $byName[$p.Name].Sets.Add([pscustomobject]@{
                    Set            = $set.Name
                    Mandatory      = $p.IsMandatory
                    Position       = if ($p.Position -ge 0) { "$($p.Position)" } else { 'Named' }
                    ByValue        = $p.ValueFromPipeline
                    ByPropertyName = $p.ValueFromPipelineByPropertyName
                })
        }
    }
    foreach ($m in $byName.Values) {
        $m.InAllSets = $allSets -or $m.Sets.Count -eq $sets.Count
        $byValue = $false; $byPropertyName = $false
        foreach ($s in $m.Sets) {
            if (-not $s.Mandatory) { $m.Mandatory = $false }
            if ($m.Position -eq 'Named') { $m.Position = $s.Position }
            $byValue = $byValue -or $s.ByValue
            $byPropertyName = $byPropertyName -or $s.ByPropertyName
        }
        $m.Pipeline = Get-PipelineText $byValue $byPropertyName
    }
    # ShouldProcess parameters last, as Get-Command and platyPS show them.
    $all = @($byName.Values)
    $result = @($all.Where({ -not $_.IsShouldProcess })) + @($all.Where({ $_.IsShouldProcess }))
    $script:ModelCache[$Command.Name] = $result
    return $result
}

function Get-OrderedSets($Command) {
    # The default set first, then the others in declaration order.
    $sets = @($Command.ParameterSets)
    return @($sets.Where({ $_.IsDefault })) + @($sets.Where({ -not $_.IsDefault }))
}

function Get-SyntaxParameters($Set) {
    # Parameters of one set in display order: positional by position, then named in declaration order,
    # WhatIf/Confirm last; common parameters left out.
    $params = @($Set.Parameters.Where({ $_.Name -notin $CommonNames }))
    $positional = @($params.Where({ $_.Position -ge 0 }) | Sort-Object Position)
    $named = @($params.Where({ $_.Position -lt 0 }))
    $should = @(foreach ($n in $ShouldProcessParameters) { $Set.Parameters.Where({ $_.Name -eq $n }) })
    return $positional + $named + $should
}

function Get-SyntaxText($Command, $Set) {
    $parts = @($Command.Name)
    foreach ($p in Get-SyntaxParameters $Set) {
        if ($p.ParameterType -eq [System.Management.Automation.SwitchParameter]) {
            $text = "-$($p.Name)"
        }
        else {
            $name = if ($p.Position -ge 0) { "[-$($p.Name)]" } else { "-$($p.Name)" }
            $text = "$name <$(Get-ShortTypeName $p.ParameterType)>"
        }
        if (-not $p.IsMandatory) { $text = "[$text]" }
        $parts += $text
    }
    $parts += '[<CommonParameters>]'
    return $parts -join ' '
}

function Get-ExpectedYaml($Command, $Model) {
    # The yaml blocks of one parameter as the scaffold writes them: one per distinct metadata across sets.
    $groups = [ordered]@{}
    foreach ($s in $Model.Sets) {
        $key = "$($s.Mandatory)|$($s.Position)|$($s.ByValue)|$($s.ByPropertyName)"
        if (-not $groups.Contains($key)) { $groups[$key] = [System.Collections.Generic.List[object]]::new() }
        $groups[$key].Add($s)
    }
    foreach ($g in $groups.Values) {
        $setsText = if ($Model.InAllSets -and $groups.Count -eq 1) { '(All)' } else { ($g | ForEach-Object Set) -join ', ' }
        $y = [ordered]@{
            'Type'           = $Model.ShortType
            'Parameter Sets' = $setsText
            'Aliases'        = $Model.Aliases -join ', '
        }
        if ($Model.ValidValues.Count -gt 0) { $y['Accepted values'] = $Model.ValidValues -join ', ' }
        $y['Required'] = "$($g[0].Mandatory)"
        $y['Position'] = $g[0].Position
        $y['Default value'] = 'None'
        $y['Accept pipeline input'] = Get-PipelineText $g[0].ByValue $g[0].ByPropertyName
        $y['Accept wildcard characters'] = "$($Model.Globbing)"
        $y   # dictionaries are not unrolled in the pipeline
    }
}

function Get-DocumentedParameters($Command) {
    # The parameters a page must describe: all but the common ones and WhatIf/Confirm.
    return @((Get-ParameterModel $Command).Where({ -not $_.IsShouldProcess }))
}

#endregion

#region Markdown reader

function Read-HelpPage([string] $Path) {
    # A line-based reader of the platyPS layout: front matter, '#'/'##'/'###' headings, code fences and text.
    $text = [IO.File]::ReadAllText($Path)
    $lines = @($text -split '\r?\n')
    $page = [pscustomobject]@{
        Path        = $Path
        Text        = $text
        FrontMatter = [ordered]@{}
        Title       = $null
        Sections    = [ordered]@{}
    }
    $i = 0
    if ($lines.Count -gt 0 -and $lines[0].Trim() -eq '---') {
        for ($i = 1; $i -lt $lines.Count -and $lines[$i].Trim() -ne '---'; $i++) {
            if ($lines[$i] -match '^\s*([^:]+?)\s*:\s*(.*?)\s*$') { $page.FrontMatter[$Matches[1]] = $Matches[2] }
        }
        $i++
    }
    $section = $null; $sub = $null; $fence = $null
    for (; $i -lt $lines.Count; $i++) {
        $line = $lines[$i]
        if ($null -ne $fence) {
            if ($line -match '^\s*(`{3,}|~{3,})\s*$' -and $Matches[1][0] -eq $fence.Marker[0] -and $Matches[1].Length -ge $fence.Marker.Length) {
                $item = [pscustomobject]@{ Kind = 'Fence'; Lang = $fence.Lang; Text = ($fence.Lines -join "`n") }
                if ($null -ne $sub) { $sub.Items.Add($item) } elseif ($null -ne $section) { $section.Items.Add($item) }
                $fence = $null
            }
            else { $fence.Lines.Add($line) }
            continue
        }
        if ($line -match '^\s*(`{3,}|~{3,})\s*([\w+-]*)') {
            $fence = [pscustomobject]@{ Marker = $Matches[1]; Lang = $Matches[2]; Lines = [System.Collections.Generic.List[string]]::new() }
            continue
        }
        if ($line -match '^#\s+(.+?)\s*#*\s*$') { $page.Title = $Matches[1]; $section = $null; $sub = $null; continue }
        if ($line -match '^##\s+(.+?)\s*#*\s*$') {
            $section = [pscustomobject]@{ Title = $Matches[1]; Items = [System.Collections.Generic.List[object]]::new(); Subs = [System.Collections.Generic.List[object]]::new() }
            $page.Sections[$Matches[1].ToUpperInvariant()] = $section
            $sub = $null
            continue
        }
        if ($line -match '^###\s+(.+?)\s*#*\s*$' -and $null -ne $section) {
            $sub = [pscustomobject]@{ Title = $Matches[1]; Items = [System.Collections.Generic.List[object]]::new() }
            $section.Subs.Add($sub)
            continue
        }
        $item = [pscustomobject]@{ Kind = 'Text'; Lang = ''; Text = $line }
        if ($null -ne $sub) { $sub.Items.Add($item) } elseif ($null -ne $section) { $section.Items.Add($item) }
    }
    if ($null -ne $fence) { Add-Problem "${Path}: a code fence is not closed." }
    return $page
}

function ConvertFrom-InlineMarkdown([string] $Text) {
    $t = $Text -replace '\[([^\]]+)\]\([^)]*\)', '$1'       # [text](link) -> text
    $t = $t -replace '\*\*([^*]+)\*\*', '$1'                 # **bold**
    $t = $t -replace '(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])', '$1'  # *italic*
    $t = $t -replace '`([^`]+)`', '$1'                       # `code`
    $t = $t -replace '\\([\\`*_{}\[\]()#+.!<>|-])', '$1'     # backslash escapes
    return $t.Trim()
}

function ConvertTo-Paragraphs($Items) {
    # Text items become paragraphs: blank lines end one, each list item starts one; a fence is one verbatim paragraph.
    $paras = [System.Collections.Generic.List[string]]::new()
    $current = [System.Collections.Generic.List[string]]::new()
    foreach ($item in @($Items) + @([pscustomobject]@{ Kind = 'End'; Lang = ''; Text = '' })) {
        $line = $item.Text
        $end = $item.Kind -ne 'Text' -or $line.Trim() -eq '' -or $line -match '^\s*([-*+]|\d+[.)])\s+'
        if ($end -and $current.Count -gt 0) {
            $para = ConvertFrom-InlineMarkdown ($current -join ' ')
            if ($para -ne '') { $paras.Add($para) }
            $current.Clear()
        }
        if ($item.Kind -eq 'Fence') { if ($item.Text.Trim() -ne '') { $paras.Add($item.Text) } }
        elseif ($item.Kind -eq 'Text' -and $line.Trim() -ne '') { $current.Add($line.Trim()) }
    }
    return , $paras.ToArray()
}

function Get-SectionItems($Page, [string] $Name) {
    # Emits the items (unrolled); wrap calls in @().
    if ($Page.Sections.Contains($Name)) { $Page.Sections[$Name].Items }
}

function Get-SectionSubs($Page, [string] $Name) {
    # Emits the '###' subsections (unrolled); wrap calls in @().
    if ($Page.Sections.Contains($Name)) { $Page.Sections[$Name].Subs }
}

function Read-Yaml([string] $Text) {
    $y = [ordered]@{}
    foreach ($l in $Text -split '\n') {
        if ($l -match '^\s*([^:#][^:]*?)\s*:\s*(.*?)\s*$') { $y[$Matches[1]] = $Matches[2] }
    }
    return $y
}

function Get-PageModel($Page) {
    # The prose of a page, as the MAML needs it.
    $examples = foreach ($sub in @(Get-SectionSubs $Page 'EXAMPLES')) {
        $code = @($sub.Items.Where({ $_.Kind -eq 'Fence' }).ForEach('Text')) -join "`n`n"
        [pscustomobject]@{
            Title   = ConvertFrom-InlineMarkdown $sub.Title
            Code    = $code
            Remarks = ConvertTo-Paragraphs @($sub.Items.Where({ $_.Kind -eq 'Text' }))
        }
    }
    $parameters = [ordered]@{}
    foreach ($sub in @(Get-SectionSubs $Page 'PARAMETERS')) {
        if ($sub.Title -notmatch '^-(\S+)') { continue }   # CommonParameters and the like
        $yaml = @(foreach ($f in $sub.Items.Where({ $_.Kind -eq 'Fence' -and $_.Lang -eq 'yaml' })) { Read-Yaml $f.Text })
        $parameters[$Matches[1]] = [pscustomobject]@{
            Name        = $Matches[1]
            Description = ConvertTo-Paragraphs @($sub.Items.Where({ -not ($_.Kind -eq 'Fence' -and $_.Lang -eq 'yaml') }))
            Yaml        = $yaml
        }
    }
    $types = {
        param($Section)
        foreach ($sub in @(Get-SectionSubs $Page $Section)) {
            [pscustomobject]@{ Type = ConvertFrom-InlineMarkdown $sub.Title; Description = ConvertTo-Paragraphs $sub.Items }
        }
    }
    $links = foreach ($item in @(Get-SectionItems $Page 'RELATED LINKS')) {
        if ($item.Kind -ne 'Text') { continue }
        foreach ($m in [regex]::Matches($item.Text, '\[([^\]]+)\]\(([^)]*)\)')) {
            $uri = if ($m.Groups[2].Value -match '^https?://') { $m.Groups[2].Value } else { '' }
            [pscustomobject]@{ Text = $m.Groups[1].Value; Uri = $uri }
        }
    }
    $online = if ($Page.FrontMatter.Contains('online version')) { "$($Page.FrontMatter['online version'])".Trim() } else { '' }
    if ($online -match '^https?://') {
        # As platyPS does: the first link carries the URI that Get-Help -Online opens.
        $links = @([pscustomobject]@{ Text = 'Online Version:'; Uri = $online }) + @($links)
    }
    $notes = [System.Collections.Generic.List[object]]::new()
    foreach ($item in @(Get-SectionItems $Page 'NOTES')) { $notes.Add($item) }
    foreach ($sub in @(Get-SectionSubs $Page 'NOTES')) {
        $notes.Add([pscustomobject]@{ Kind = 'Text'; Lang = ''; Text = '' })
        $notes.Add([pscustomobject]@{ Kind = 'Text'; Lang = ''; Text = $sub.Title })
        $notes.Add([pscustomobject]@{ Kind = 'Text'; Lang = ''; Text = '' })
        foreach ($item in $sub.Items) { $notes.Add($item) }
    }
    return [pscustomobject]@{
        Synopsis    = ConvertTo-Paragraphs @(Get-SectionItems $Page 'SYNOPSIS')
        Description = ConvertTo-Paragraphs @(Get-SectionItems $Page 'DESCRIPTION')
        Examples    = @($examples)
        Parameters  = $parameters
        Inputs      = @(& $types 'INPUTS')
        Outputs     = @(& $types 'OUTPUTS')
        Notes       = ConvertTo-Paragraphs $notes
        Links       = @($links)
        Syntax      = @((@(Get-SectionItems $Page 'SYNTAX') + @(foreach ($sub in @(Get-SectionSubs $Page 'SYNTAX')) { $sub.Items })).Where({ $_.Kind -eq 'Fence' }).ForEach('Text'))
    }
}

#endregion

#region Checks

function Add-Problem([string] $Message) { $script:Problems.Add($Message) }

function Test-HelpPage($Command, $Page, $Model) {
    # Strict problems go to $Problems; drift of the generated parts of the page only warns (the MAML uses reflection).
    $file = Split-Path -Leaf $Page.Path
    foreach ($m in [regex]::Matches($Page.Text, '\{\{[^{}]*\}\}')) { Add-Problem "${file}: leftover placeholder $($m.Value)" }
    if ($Page.Title -ne $Command.Name) { Add-Problem "${file}: the title is '$($Page.Title)', expected '# $($Command.Name)'." }
    if ($Model.Synopsis.Count -eq 0) { Add-Problem "${file}: the SYNOPSIS is empty." }
    if ($Model.Description.Count -eq 0) { Add-Problem "${file}: the DESCRIPTION is empty." }
    if ($Model.Examples.Count -eq 0) { Add-Problem "${file}: there is no example (### Example 1 under ## EXAMPLES)." }
    foreach ($e in $Model.Examples) {
        if ($e.Code.Trim() -eq '') { Add-Problem "${file}: '$($e.Title)' has no code block." }
    }
    $params = @(Get-ParameterModel $Command)
    $known = @($params.ForEach('Name'))
    foreach ($p in $params.Where({ -not $_.IsShouldProcess })) {
        if (-not $Model.Parameters.Contains($p.Name)) {
            $snippet = (Get-ParameterMarkdown $Command $p (Get-DefaultValues $Command)).TrimEnd() -replace '(?m)^', '    '
            Add-Problem "${file}: parameter -$($p.Name) is not documented. Add under ## PARAMETERS, with a real description:`n$snippet"
        }
        elseif ($Model.Parameters[$p.Name].Description.Count -eq 0) { Add-Problem "${file}: parameter -$($p.Name) has no description." }
    }
    foreach ($name in $Model.Parameters.Keys) {
        if ($name -notin $known) { Add-Problem "${file}: documents parameter -$name, which $($Command.Name) does not have." }
    }

    # Drift warnings
    $expectedSyntax = @(foreach ($set in Get-OrderedSets $Command) { Get-SyntaxText $Command $set })
    $norm = { param($s) ($s -replace '\s+', ' ').Trim() }
    $docSyntax = @(foreach ($s in $Model.Syntax) { & $norm $s })
    foreach ($s in $expectedSyntax) {
        if ((& $norm $s) -notin $docSyntax) { Write-Warning "${file}: the SYNTAX section lacks or differs from: $s" }
    }
    foreach ($p in $params) {
        if (-not $Model.Parameters.Contains($p.Name)) { continue }
        $docBlocks = @($Model.Parameters[$p.Name].Yaml)
        $expected = @(Get-ExpectedYaml $Command $p)
        if ($docBlocks.Count -ne $expected.Count) {
            Write-Warning "${file}: -$($p.Name) has $($docBlocks.Count) yaml block(s), the cmdlet's metadata needs $($expected.Count)."
            continue
        }
        for ($k = 0; $k -lt $expected.Count; $k++) {
            foreach ($key in $expected[$k].Keys) {
                if ($key -eq 'Default value') { continue }
                $doc = if ($docBlocks[$k].Contains($key)) { $docBlocks[$k][$key] } else { '' }
                if ("$doc".Trim() -ne "$($expected[$k][$key])".Trim()) {
                    Write-Warning "${file}: -$($p.Name) yaml '${key}: $doc' differs from the cmdlet ('$($expected[$k][$key])')."
                }
            }
        }
    }
}

#endregion

#region Scaffold

function Get-DefaultValues($Command) {
    # Defaults read from a fresh instance of the cmdlet class. Zero, False, null and empty count as none; an enum
    # always shows its value (the author corrects it where the real default depends on other parameters).
    $values = @{}
    try { $instance = [Activator]::CreateInstance($Command.ImplementingType) } catch { return $values }
    foreach ($prop in $Command.ImplementingType.GetProperties()) {
        if ($prop.Name -in $CommonNames -or -not $prop.CanRead) { continue }
        try { $v = $prop.GetValue($instance) } catch { continue }
        if ($null -eq $v) { continue }
        $t = $prop.PropertyType
        if ($t.IsValueType -and -not $t.IsEnum -and $v -eq [Activator]::CreateInstance($t)) { continue }   # 0, False: no default worth showing
        if ($v -is [System.Management.Automation.SwitchParameter]) { if ($v.IsPresent) { $values[$prop.Name] = 'True' }; continue }
        if ($v -is [Array] -and $v.Length -eq 0) { continue }
        if ($v -is [string] -and $v -eq '') { continue }
        $values[$prop.Name] = if ($v -is [Array]) { $v -join ', ' } else { "$v" }
    }
    return $values
}

function Get-ParameterMarkdown($Command, $Model, [hashtable] $Defaults = @{}) {
    # The '### -Name' part of a page for one parameter: a placeholder description and its yaml block(s).
    $lines = [System.Collections.Generic.List[string]]::new()
    $lines.Add("### -$($Model.Name)")
    $lines.Add($(if ($Model.IsShouldProcess) { $StandardText[$Model.Name] } else { "{{ Fill $($Model.Name) Description }}" }))
    $lines.Add('')
    foreach ($y in @(Get-ExpectedYaml $Command $Model)) {
        if ($Defaults.ContainsKey($Model.Name)) { $y['Default value'] = $Defaults[$Model.Name] }
        elseif ($Model.IsSwitch) { $y['Default value'] = 'False' }
        $lines.Add('```yaml')
        foreach ($key in $y.Keys) {
            $lines.Add("${key}: $($y[$key])".TrimEnd())
            if ($key -eq 'Aliases' -or $key -eq 'Accepted values') { $lines.Add('') }
        }
        $lines.Add('```')
        $lines.Add('')
    }
    return ($lines -join "`n") + "`n"
}

function New-HelpPageText($Command, [string] $ModuleName) {
    $nl = "`n"
    $sb = [System.Text.StringBuilder]::new()
    $add = { param([string] $s = '') [void]$sb.Append($s).Append($nl) }
    & $add '---'
    & $add "external help file: $($Command.HelpFile)"
    & $add "Module Name: $ModuleName"
    & $add 'online version:'
    & $add 'schema: 2.0.0'
    & $add '---'
    & $add
    & $add "# $($Command.Name)"
    & $add
    & $add '## SYNOPSIS'
    & $add '{{ Fill in the Synopsis }}'
    & $add
    & $add '## SYNTAX'
    & $add
    $sets = @(Get-OrderedSets $Command)
    foreach ($set in $sets) {
        if ($sets.Count -gt 1 -or $set.Name -ne '__AllParameterSets') {
            & $add ("### $($set.Name)" + $(if ($set.IsDefault) { ' (Default)' } else { '' }))
        }
        & $add '```'
        & $add (Get-SyntaxText $Command $set)
        & $add '```'
        & $add
    }
    & $add '## DESCRIPTION'
    & $add '{{ Fill in the Description }}'
    & $add
    & $add '## EXAMPLES'
    & $add
    & $add '### Example 1'
    & $add '```powershell'
    & $add 'PS C:\> {{ Add example code here }}'
    & $add '```'
    & $add
    & $add '{{ Add example description here }}'
    & $add
    & $add '## PARAMETERS'
    & $add
    $defaults = Get-DefaultValues $Command
    $params = @(Get-ParameterModel $Command | Sort-Object { [int]$_.IsShouldProcess }, Name)
    foreach ($p in $params) { [void]$sb.Append((Get-ParameterMarkdown $Command $p $defaults)) }
    & $add '### CommonParameters'
    & $add 'This cmdlet supports the common parameters: -Debug, -ErrorAction, -ErrorVariable, -InformationAction, -InformationVariable, -OutBuffer, -OutVariable, -PipelineVariable, -ProgressAction, -Verbose, -WarningAction, and -WarningVariable. For more information, see [about_CommonParameters](http://go.microsoft.com/fwlink/?LinkID=113216).'
    & $add
    & $add '## INPUTS'
    & $add
    $inputs = @(Get-ParameterModel $Command | Where-Object { $_.Pipeline -ne 'False' } | ForEach-Object FullType | Select-Object -Unique)
    if ($inputs.Count -eq 0) { $inputs = @('None') }
    foreach ($t in $inputs) { & $add "### $t"; & $add '{{ Describe the input }}'; & $add }
    & $add '## OUTPUTS'
    & $add
    $outputs = @($Command.OutputType | Where-Object { $_.Type -ne [void] } | ForEach-Object { if ($_.Type) { Get-FullTypeName $_.Type } else { $_.Name } } | Select-Object -Unique)
    if ($outputs.Count -eq 0) { $outputs = @('None') }
    foreach ($t in $outputs) { & $add "### $t"; & $add '{{ Describe the output }}'; & $add }
    & $add '## NOTES'
    & $add
    & $add '## RELATED LINKS'
    & $add
    & $add '{{ Fill in the related links here }}'
    return $sb.ToString()
}

#endregion

#region MAML

function Write-Paras([System.Xml.XmlWriter] $W, $Paras) {
    $W.WriteStartElement('maml', 'description', $NsMaml)
    foreach ($p in @($Paras)) { $W.WriteElementString('maml', 'para', $NsMaml, $p) }
    $W.WriteEndElement()
}

function Write-MamlParameter([System.Xml.XmlWriter] $W, $Model, $SetInfo, $Description, [string] $Default) {
    # $SetInfo: the metadata of one set (syntax), or $null for the parameters section (merged over sets).
    $required = if ($SetInfo) { $SetInfo.Mandatory } else { $Model.Mandatory }
    $position = if ($SetInfo) { $SetInfo.Position } else { $Model.Position }
    $pipeline = if ($SetInfo) { Get-PipelineText $SetInfo.ByValue $SetInfo.ByPropertyName } else { $Model.Pipeline }
    $W.WriteStartElement('command', 'parameter', $NsCommand)
    $W.WriteAttributeString('required', "$required".ToLowerInvariant())
    $W.WriteAttributeString('variableLength', "$($Model.Type.IsArray)".ToLowerInvariant())
    $W.WriteAttributeString('globbing', "$($Model.Globbing)".ToLowerInvariant())
    $W.WriteAttributeString('pipelineInput', $pipeline)
    $W.WriteAttributeString('position', $position.ToLowerInvariant())
    $W.WriteAttributeString('aliases', $(if ($Model.Aliases.Count -gt 0) { $Model.Aliases -join ', ' } else { 'none' }))
    $W.WriteElementString('maml', 'name', $NsMaml, $Model.Name)
    Write-Paras $W $Description
    if ($Model.ValidValues.Count -gt 0) {
        $W.WriteStartElement('command', 'parameterValueGroup', $NsCommand)
        foreach ($v in $Model.ValidValues) {
            $W.WriteStartElement('command', 'parameterValue', $NsCommand)
            $W.WriteAttributeString('required', 'false')
            $W.WriteAttributeString('command', 'variableLength', $NsCommand, 'false')
            $W.WriteString($v)
            $W.WriteEndElement()
        }
        $W.WriteEndElement()
    }
    if (-not ($Model.IsSwitch -and $SetInfo)) {
        $W.WriteStartElement('command', 'parameterValue', $NsCommand)
        $W.WriteAttributeString('required', "$(-not $Model.IsSwitch)".ToLowerInvariant())
        $W.WriteAttributeString('variableLength', "$($Model.Type.IsArray)".ToLowerInvariant())
        $W.WriteString($Model.ShortType)
        $W.WriteEndElement()
    }
    $W.WriteStartElement('dev', 'type', $NsDev)
    $W.WriteElementString('maml', 'name', $NsMaml, $Model.FullType)
    $W.WriteElementString('maml', 'uri', $NsMaml, '')
    $W.WriteEndElement()
    $W.WriteElementString('dev', 'defaultValue', $NsDev, $Default)
    $W.WriteEndElement()
}

function Write-MamlCommand([System.Xml.XmlWriter] $W, $Command, $Model) {
    $params = @(Get-ParameterModel $Command)
    $descriptions = @{}
    $defaults = @{}
    foreach ($p in $params) {
        $doc = if ($Model.Parameters.Contains($p.Name)) { $Model.Parameters[$p.Name] } else { $null }
        $descriptions[$p.Name] = if ($doc -and $doc.Description.Count -gt 0) { $doc.Description }
        elseif ($StandardText.ContainsKey($p.Name) -and $p.IsShouldProcess) { @($StandardText[$p.Name]) }
        else { @() }
        $default = $null
        if ($doc) { foreach ($y in $doc.Yaml) { if ($y.Contains('Default value') -and $y['Default value'] -ne '') { $default = $y['Default value']; break } } }
        $defaults[$p.Name] = if ($default) { $default } elseif ($p.IsSwitch) { 'False' } else { 'None' }
    }

    $W.WriteStartElement('command', 'command', $NsCommand)
    $W.WriteAttributeString('xmlns', 'maml', $null, $NsMaml)
    $W.WriteAttributeString('xmlns', 'command', $null, $NsCommand)
    $W.WriteAttributeString('xmlns', 'dev', $null, $NsDev)
    $W.WriteAttributeString('xmlns', 'MSHelp', $null, $NsMSHelp)

    $W.WriteStartElement('command', 'details', $NsCommand)
    $W.WriteElementString('command', 'name', $NsCommand, $Command.Name)
    $W.WriteElementString('command', 'verb', $NsCommand, $Command.Verb)
    $W.WriteElementString('command', 'noun', $NsCommand, $Command.Noun)
    Write-Paras $W $Model.Synopsis
    $W.WriteEndElement()

    Write-Paras $W $Model.Description

    $W.WriteStartElement('command', 'syntax', $NsCommand)
    $byName = @{}
    foreach ($p in $params) { $byName[$p.Name] = $p }
    foreach ($set in Get-OrderedSets $Command) {
        $W.WriteStartElement('command', 'syntaxItem', $NsCommand)
        $W.WriteElementString('maml', 'name', $NsMaml, $Command.Name)
        foreach ($sp in Get-SyntaxParameters $set) {
            $m = $byName[$sp.Name]
            $info = $m.Sets.Where({ $_.Set -eq $set.Name }, 'First')[0]
            Write-MamlParameter $W $m $info $descriptions[$m.Name] $defaults[$m.Name]
        }
        $W.WriteEndElement()
    }
    $W.WriteEndElement()

    $W.WriteStartElement('command', 'parameters', $NsCommand)
    foreach ($p in $params | Sort-Object { [int]$_.IsShouldProcess }, Name) {
        Write-MamlParameter $W $p $null $descriptions[$p.Name] $defaults[$p.Name]
    }
    $W.WriteEndElement()

    foreach ($kind in @(@('inputTypes', 'inputType', $Model.Inputs), @('returnValues', 'returnValue', $Model.Outputs))) {
        $W.WriteStartElement('command', $kind[0], $NsCommand)
        foreach ($t in @($kind[2])) {
            $W.WriteStartElement('command', $kind[1], $NsCommand)
            $W.WriteStartElement('dev', 'type', $NsDev)
            $W.WriteElementString('maml', 'name', $NsMaml, $t.Type)
            $W.WriteEndElement()
            Write-Paras $W $t.Description
            $W.WriteEndElement()
        }
        $W.WriteEndElement()
    }

    $W.WriteStartElement('maml', 'alertSet', $NsMaml)
    $W.WriteStartElement('maml', 'alert', $NsMaml)
    foreach ($n in @($Model.Notes)) { $W.WriteElementString('maml', 'para', $NsMaml, $n) }
    $W.WriteEndElement()
    $W.WriteEndElement()

    $W.WriteStartElement('command', 'examples', $NsCommand)
    foreach ($e in $Model.Examples) {
        $W.WriteStartElement('command', 'example', $NsCommand)
        $W.WriteElementString('maml', 'title', $NsMaml, "--------- $($e.Title) ---------")
        $W.WriteElementString('dev', 'code', $NsDev, $e.Code)
        $W.WriteStartElement('dev', 'remarks', $NsDev)
        foreach ($r in @($e.Remarks)) { $W.WriteElementString('maml', 'para', $NsMaml, $r) }
        $W.WriteElementString('maml', 'para', $NsMaml, '')   # a blank line before the next example
        $W.WriteEndElement()
        $W.WriteEndElement()
    }
    $W.WriteEndElement()

    $W.WriteStartElement('command', 'relatedLinks', $NsCommand)
    foreach ($l in $Model.Links) {
        $W.WriteStartElement('maml', 'navigationLink', $NsMaml)
        $W.WriteElementString('maml', 'linkText', $NsMaml, $l.Text)
        $W.WriteElementString('maml', 'uri', $NsMaml, $l.Uri)
        $W.WriteEndElement()
    }
    $W.WriteEndElement()

    $W.WriteEndElement()
}

#endregion

#region Main

try {
    $watch = [System.Diagnostics.Stopwatch]::StartNew()
    $manifest = Resolve-Path -LiteralPath $ModulePath -ErrorAction Stop
    $module = Import-Module -Name $manifest.ProviderPath -PassThru -Force -ErrorAction Stop
    $commands = @($module.ExportedCmdlets.Values | Sort-Object Name)
    if ($commands.Count -eq 0) { throw "Module '$($module.Name)' exports no cmdlet." }
    $docs = if (Test-Path -LiteralPath $DocsPath) { (Resolve-Path -LiteralPath $DocsPath).ProviderPath } else { $null }

    if ($Mode -eq 'Scaffold') {
        if (-not $docs) { $docs = (New-Item -ItemType Directory -Path $DocsPath -Force).FullName }
        $created = 0
        foreach ($c in $commands) {
            $file = Join-Path $docs "$($c.Name).md"
            if (Test-Path -LiteralPath $file) { continue }
            [IO.File]::WriteAllText($file, (New-HelpPageText $c $module.Name), [Text.UTF8Encoding]::new($false))
            Write-Host "Created $file"
            $created++
        }
        Write-Host "Help scaffold: $created page(s) created, $($commands.Count - $created) already present ($([int]$watch.Elapsed.TotalMilliseconds) ms)."
        exit 0
    }

    # Maml
    if (-not $docs) { throw "The help folder '$DocsPath' does not exist; run with -Mode Scaffold first." }
    $pages = @{}
    foreach ($f in Get-ChildItem -LiteralPath $docs -Filter '*.md' -File) { $pages[$f.BaseName] = $f.FullName }
    foreach ($name in $pages.Keys | Sort-Object) {
        if ($name -notin $commands.Name -and $name -notin @('README', 'index', 'about')) {
            Add-Problem "$name.md: documents a cmdlet the module does not export."
        }
    }
    $files = @{}   # help file name -> list of (command, page model)
    foreach ($c in $commands) {
        if (-not $pages.ContainsKey($c.Name)) {
            Add-Problem "$($c.Name) is exported but has no page $($c.Name).md in $docs (run build.ps1 HelpScaffold)."
            continue
        }
        $page = Read-HelpPage $pages[$c.Name]
        $model = Get-PageModel $page
        Test-HelpPage $c $page $model
        if (-not $files.ContainsKey($c.HelpFile)) { $files[$c.HelpFile] = [System.Collections.Generic.List[object]]::new() }
        $files[$c.HelpFile].Add([pscustomobject]@{ Command = $c; Model = $model })
    }
    if ($Problems.Count -gt 0) {
        $word = if ($Strict) { 'error' } else { 'warning' }
        foreach ($p in $Problems) { [Console]::Error.WriteLine("Help ${word}: $p") }
        if ($Strict) {
            [Console]::Error.WriteLine("Help generation failed: $($Problems.Count) problem(s) in $docs (see above).")
            exit 1
        }
    }

    $outDir = Join-Path $module.ModuleBase 'en-US'
    $null = New-Item -ItemType Directory -Path $outDir -Force
    foreach ($helpFile in $files.Keys) {
        $target = Join-Path $outDir $helpFile
        $temp = "$target.tmp"
        $settings = [System.Xml.XmlWriterSettings]::new()
        $settings.Indent = $true
        $settings.IndentChars = '  '
        $settings.Encoding = [Text.UTF8Encoding]::new($false)
        $settings.NewLineChars = "`n"
        $w = [System.Xml.XmlWriter]::Create($temp, $settings)
        try {
            $w.WriteStartDocument()
            $w.WriteStartElement('helpItems', 'http://msh')
            $w.WriteAttributeString('schema', 'maml')
            foreach ($entry in $files[$helpFile]) { Write-MamlCommand $w $entry.Command $entry.Model }
            $w.WriteEndElement()
            $w.WriteEndDocument()
        }
        finally { $w.Dispose() }
        $null = [xml][IO.File]::ReadAllText($temp)   # well-formed
        Move-Item -LiteralPath $temp -Destination $target -Force
        Write-Host "Help: wrote $target ($($files[$helpFile].Count) cmdlets, $([int]$watch.Elapsed.TotalMilliseconds) ms)."
    }
    exit 0
}
catch {
    [Console]::Error.WriteLine("Help generation failed: $($_.Exception.Message)")
    if ($_.InvocationInfo) { [Console]::Error.WriteLine($_.InvocationInfo.PositionMessage) }
    exit 1
}

#endregion
