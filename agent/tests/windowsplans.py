"""Representative Windows rule lists, written out as the compilers would give them (the
tests of the scripts and the enforcer do not depend on the compilers)."""

from __future__ import annotations

from dataclasses import replace

from bulkhead.dataplane.windows.rules import INBOUND, OUTBOUND, AclRule, FirewallRule

# A web host: failsafes both ways, TCP 80/443 from two networks with an explicit Block
# carved out of them, ICMP echo on both families, DNS out on one interface, GRE to a
# range, and a description with a quote in it.
WEB = [
    FirewallRule("web-ingress-1", INBOUND, "Allow", 6, local_ports=("22",),
                 description="failsafe tcp:22"),
    FirewallRule("web-egress-1", OUTBOUND, "Allow", 6, remote_ports=("7443",),
                 description="failsafe tcp:7443"),
    FirewallRule("web-ingress-2", INBOUND, "Allow", 6, local_addresses=("198.18.0.10",),
                 remote_addresses=("198.18.0.0/24", "198.18.1.0/24"),
                 local_ports=("443", "80"),
                 description="policy default.web ingress rule 0"),
    FirewallRule("web-ingress-3", INBOUND, "Block", None,
                 remote_addresses=("198.18.0.128/25",),
                 description="policy default.deny-dmz ingress rule 0"),
    FirewallRule("web-ingress-4", INBOUND, "Allow", 1, remote_addresses=("198.18.0.0/15",),
                 icmp_types=("8:0",), description="policy default.ping ingress rule 0"),
    FirewallRule("web-ingress-5", INBOUND, "Allow", 58, remote_addresses=("2001:2::/48",),
                 icmp_types=("128",), description="policy default.ping ingress rule 1"),
    FirewallRule("web-egress-2-Ethernet 2", OUTBOUND, "Allow", 17,
                 remote_addresses=("198.18.0.53", "198.18.0.54"), remote_ports=("53",),
                 interface_alias="Ethernet 2", description="policy default.dns egress rule 0"),
    FirewallRule("web-egress-3", OUTBOUND, "Allow", 47,
                 remote_addresses=("198.18.5.1-198.18.5.20",),
                 description="policy default.o'brien's-tunnel egress rule 0"),
]

# The next revision: port 443 dropped, the DMZ Block gone, a Block of telnet added.
WEB_NEXT = [
    *[r for r in WEB if r.name not in ("web-ingress-2", "web-ingress-3")],
    replace(WEB[2], local_ports=("80",)),
    FirewallRule("web-ingress-6", INBOUND, "Block", 6, local_ports=("23",),
                 description="policy default.no-telnet ingress rule 0"),
]

# The same host's ingress as HNS ACLs: priorities from 1000, bumped when the action
# changes, a default Block last.
WEB_ACLS = [
    AclRule("web-in-1", "Allow", "In", 1000, "6", local_ports=("22",)),
    AclRule("web-in-2", "Block", "In", 1001, remote_addresses=("198.18.0.128/25",)),
    AclRule("web-in-3", "Allow", "In", 1002, "6", local_addresses=("198.18.0.10",),
            remote_addresses=("198.18.0.0/24", "198.18.1.0/24"), local_ports=("80", "443")),
    AclRule("web-in-4", "Allow", "In", 1002, "1", remote_addresses=("198.18.0.0/15",)),
    AclRule("web-in-5", "Block", "In", 1003),
    AclRule("web-out-1", "Allow", "Out", 1000, "6", remote_ports=("7443",)),
    AclRule("web-out-2", "Allow", "Out", 1000, "17",
            remote_addresses=("198.18.0.53", "198.18.0.54"), remote_ports=("53",),
            rule_type="Host"),
    AclRule("web-out-3", "Block", "Out", 1001),
]
