# Bulkhead: the host's interfaces and addresses, as JSON
& {
    $ErrorActionPreference = 'Stop'
    $ProgressPreference = 'SilentlyContinue'
    $found = @(Get-NetIPAddress | ForEach-Object {
        [pscustomobject]@{ InterfaceAlias = $_.InterfaceAlias; IPAddress = $_.IPAddress }
    })
    ConvertTo-Json -InputObject $found -Depth 2 -Compress
}

