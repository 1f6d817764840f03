# Bulkhead: the rules of the group bulkhead and the profiles, as JSON
& {
    $ErrorActionPreference = 'Stop'
    $ProgressPreference = 'SilentlyContinue'
    $rules = @(Get-NetFirewallRule -Group 'bulkhead' -ErrorAction 'SilentlyContinue')
    $listed = @(foreach ($r in $rules) {
        $a = $r | Get-NetFirewallAddressFilter
        $p = $r | Get-NetFirewallPortFilter
        $i = $r | Get-NetFirewallInterfaceFilter
        [pscustomobject]@{
            Name = $r.Name; DisplayName = $r.DisplayName; Description = $r.Description
            Direction = [string]$r.Direction; Action = [string]$r.Action
            Enabled = [string]$r.Enabled; Protocol = [string]$p.Protocol
            LocalAddress = @($a.LocalAddress); RemoteAddress = @($a.RemoteAddress)
            LocalPort = @($p.LocalPort); RemotePort = @($p.RemotePort)
            IcmpType = @($p.IcmpType); InterfaceAlias = @($i.InterfaceAlias)
        }
    })
    $profiles = @(foreach ($f in @(Get-NetFirewallProfile -Name 'Domain', 'Private', 'Public')) {
        [pscustomobject]@{
            Name = $f.Name; Enabled = [string]$f.Enabled
            DefaultInboundAction = [string]$f.DefaultInboundAction
            DefaultOutboundAction = [string]$f.DefaultOutboundAction
        }
    })
    [pscustomobject]@{ Rules = $listed; Profiles = $profiles } | ConvertTo-Json -Depth 4 -Compress
}

