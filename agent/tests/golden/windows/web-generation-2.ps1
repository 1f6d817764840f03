# Bulkhead: firewall rules of generation 2 (1 Block, 7 Allow); 8 rules of the group bulkhead before
& {
    $ErrorActionPreference = 'Stop'
    $ProgressPreference = 'SilentlyContinue'
    try {
        New-NetFirewallRule -Name 'bulkhead-2-8' -DisplayName 'web-ingress-6' -Group 'bulkhead' -Direction 'Inbound' -Action 'Block' -Protocol 'TCP' -LocalPort '23' -Description 'policy default.no-telnet ingress rule 0' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-1' -DisplayName 'web-ingress-1' -Group 'bulkhead' -Direction 'Inbound' -Action 'Allow' -Protocol 'TCP' -LocalPort '22' -Description 'failsafe tcp:22' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-2' -DisplayName 'web-egress-1' -Group 'bulkhead' -Direction 'Outbound' -Action 'Allow' -Protocol 'TCP' -RemotePort '7443' -Description 'failsafe tcp:7443' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-3' -DisplayName 'web-ingress-4' -Group 'bulkhead' -Direction 'Inbound' -Action 'Allow' -Protocol 'ICMPv4' -RemoteAddress '198.18.0.0/15' -IcmpType '8:0' -Description 'policy default.ping ingress rule 0' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-4' -DisplayName 'web-ingress-5' -Group 'bulkhead' -Direction 'Inbound' -Action 'Allow' -Protocol 'ICMPv6' -RemoteAddress '2001:2::/48' -IcmpType '128' -Description 'policy default.ping ingress rule 1' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-5' -DisplayName 'web-egress-2-Ethernet 2' -Group 'bulkhead' -Direction 'Outbound' -Action 'Allow' -Protocol 'UDP' -RemoteAddress '198.18.0.53', '198.18.0.54' -RemotePort '53' -InterfaceAlias 'Ethernet 2' -Description 'policy default.dns egress rule 0' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-6' -DisplayName 'web-egress-3' -Group 'bulkhead' -Direction 'Outbound' -Action 'Allow' -Protocol '47' -RemoteAddress '198.18.5.1-198.18.5.20' -Description 'policy default.o''brien''s-tunnel egress rule 0' -Enabled 'True' -Profile 'Any' | Out-Null
        New-NetFirewallRule -Name 'bulkhead-2-7' -DisplayName 'web-ingress-2' -Group 'bulkhead' -Direction 'Inbound' -Action 'Allow' -Protocol 'TCP' -LocalAddress '198.18.0.10' -RemoteAddress '198.18.0.0/24', '198.18.1.0/24' -LocalPort '80' -Description 'policy default.web ingress rule 0' -Enabled 'True' -Profile 'Any' | Out-Null
    } catch {
        Remove-NetFirewallRule -Name 'bulkhead-2-1', 'bulkhead-2-2', 'bulkhead-2-3', 'bulkhead-2-4', 'bulkhead-2-5', 'bulkhead-2-6', 'bulkhead-2-7', 'bulkhead-2-8' -ErrorAction 'SilentlyContinue'
        throw
    }
    Write-Output 'bulkhead-added 2'
    Remove-NetFirewallRule -Name 'bulkhead-1-1', 'bulkhead-1-2', 'bulkhead-1-3', 'bulkhead-1-5', 'bulkhead-1-6', 'bulkhead-1-7', 'bulkhead-1-8'
    Remove-NetFirewallRule -Name 'bulkhead-1-4'
    Set-NetFirewallProfile -Profile 'Domain', 'Private', 'Public' -Enabled 'True' -DefaultInboundAction 'Block' -DefaultOutboundAction 'Block'
    Write-Output 'bulkhead-applied 2'
}

