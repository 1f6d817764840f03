"""What each Windows backend is given: Windows Firewall rules and HNS ACL policies, as
plain values (rendered to PowerShell and HNS JSON elsewhere, compared for drift)."""

from __future__ import annotations

from dataclasses import dataclass

INBOUND, OUTBOUND = "Inbound", "Outbound"


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """One Windows Firewall rule (New-NetFirewallRule's parameters). Windows Firewall has
    no order: a packet matching any Block rule is blocked, else any Allow rule allows it,
    else the profile's default action (Block, set by the agent) decides. Empty address
    and port tuples mean Any. Addresses are `a.b.c.d`, `a.b.c.d/len` or `first-last`."""

    name: str                          # unique in the group: bulkhead-<generation>-...
    direction: str                     # Inbound | Outbound
    action: str                        # Allow | Block
    protocol: int | None = None        # None: Any
    local_addresses: tuple[str, ...] = ()
    remote_addresses: tuple[str, ...] = ()
    local_ports: tuple[str, ...] = ()  # "80", "1000-2000"
    remote_ports: tuple[str, ...] = ()
    icmp_types: tuple[str, ...] = ()   # "8", "8:0"
    interface_alias: str | None = None  # None: every interface
    description: str = ""              # the rules it comes from
    # Shown in the Windows Firewall console; the agent sets the compiler's name here
    # when it renames the rule for a generation (bulkhead.dataplane.windows.powershell).
    display_name: str = ""


@dataclass(frozen=True, slots=True)
class AclRule:
    """One HNS ACL policy (HCN AclPolicySetting). Lower priority is evaluated first;
    an endpoint with any ACL denies what no ACL allows. Addresses and ports are
    comma-separated in HNS; empty tuples mean unrestricted (never the text "Any")."""

    id: str
    action: str                        # Allow | Block
    direction: str                     # In | Out
    priority: int
    protocols: str = ""                # "6", "17", ""; one protocol number per rule
    local_addresses: tuple[str, ...] = ()
    remote_addresses: tuple[str, ...] = ()
    local_ports: tuple[str, ...] = ()
    remote_ports: tuple[str, ...] = ()
    rule_type: str = "Switch"          # Switch | Host
