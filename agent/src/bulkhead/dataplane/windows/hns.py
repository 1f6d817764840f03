"""A flattened list (`flatten`) as HNS ACL policies (`rules.AclRule`) for one endpoint
and direction.

HNS evaluates an endpoint's ACLs by priority, lower first; with any ACL on the endpoint,
what no ACL allows is blocked. The list is first-match, so its entries are written in
order with priorities as Calico's Windows dataplane gives them
(felix/dataplane/windows/policysets/policysets.go, `GetPolicySetRules`): from
`BASE_PRIORITY` (1000, Calico's PolicyRuleBasePriority), one more each time the action
changes, so rules of one action may share a priority (their order among themselves does
not matter) and rules of different actions never do; at most `MAX_PRIORITY` (65000,
Calico's PolicyRuleMaxPriority).

Each entry becomes one rule per protocol (HNS takes one protocol number, or none for any
protocol), with its addresses as CIDRs (`bulkhead.net.cidr_blocks`) and its ports as
"a" or "a-b"; a list of more than `PER_RULE` addresses or ports is split over several
rules, every combination of the chunks (Calico's ipPortsPerRule, 4000, in
`protoRulesToHnsRules`: "Microsoft recommended limiting the number of entries per rule to
a few thousand"). An entry for all addresses of a family names the family's whole range
("0.0.0.0/0" or "::/0") as its remote address, so it stays in its family (an HNS rule
with no addresses matches both). The lists of both families end with an entry matching
everything: an Allow end becomes an Allow rule (one for both families, with no protocol
and no address, when both end so; else with its family's range), and the last rule is
always a Block of everything (no protocol, no address), as Calico ends a policy set
with a Block: it decides what the lists deny at their end. So the rules decide every
packet themselves and never rely on HNS's implicit default deny.

Refused with `Unsupported`, naming the entry's rule: ICMP types and codes (HNS ACLs have
no such field), ports of protocols other than TCP and UDP, more than `max_rules` rules,
priorities past `MAX_PRIORITY`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import product

from bulkhead.model import EGRESS, INGRESS
from bulkhead.model.flowlog import PORTED
from bulkhead.net import BITS, address_text, cidr_blocks

from .flat import (
    ALL_ICMP,
    ALL_PORTS,
    ALL_PROTOCOLS,
    ALLOW,
    DENY,
    Box,
    Entry,
    Flat,
    Spans,
    Unsupported,
)
from .rules import AclRule

HNS_DIRECTIONS = {INGRESS: "In", EGRESS: "Out"}
BASE_PRIORITY = 1000
MAX_PRIORITY = 65000
PER_RULE = 4000
MAX_RULES = 10_000          # chosen, not measured: a bound on one endpoint's direction
PORT_PROTOCOLS = (6, 17)    # the protocols whose ports HNS ACLs match
FAMILY_RANGE = {4: "0.0.0.0/0", 6: "::/0"}


def address_texts(spans: Spans, family: int) -> tuple[str, ...]:
    """The spans as CIDRs, each with its prefix length ("198.18.0.10/32", as Calico)."""
    return tuple(f"{address_text(first, family)}/{length}"
                 for span in spans for first, length in cidr_blocks(span, family))


def port_texts(spans: Spans) -> tuple[str, ...]:
    return tuple(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in spans)


def _chunks(items: tuple[str, ...]) -> list[tuple[str, ...]]:
    if not items:
        return [()]
    return [items[i:i + PER_RULE] for i in range(0, len(items), PER_RULE)]


def _protocols(entry: Entry, ports: bool) -> Iterator[str]:
    """The HNS protocol of each rule of the entry: "" for any protocol, else a number."""
    if entry.box.protocols == ALL_PROTOCOLS and not ports:
        yield ""
        return
    for lo, hi in entry.box.protocols:
        for protocol in range(lo, hi + 1):
            if ports and protocol not in PORTED:
                continue   # no packet of it has ports: none of it is in the box
            if ports and protocol not in PORT_PROTOCOLS:
                raise Unsupported(entry.where, "ports", f"HNS ACLs match the ports of TCP "
                                  f"and UDP only, not of protocol {protocol}")
            yield str(protocol)


class _Writer:
    def __init__(self, direction: str, name: str, max_rules: int) -> None:
        self.direction, self.name, self.max_rules = direction, name, max_rules
        self.hns_direction = HNS_DIRECTIONS[direction]
        self.rules: list[AclRule] = []
        self.priority = BASE_PRIORITY

    def entry(self, entry: Entry, family: int | None) -> None:
        """The rules of one entry; `family` None: the entry matches every packet of
        both families (no protocol, no address)."""
        box = entry.box
        if box.icmp != ALL_ICMP:
            raise Unsupported(entry.where, "icmp", "HNS ACLs match no ICMP type or code")
        ports = box.local_ports != ALL_PORTS or box.remote_ports != ALL_PORTS
        local: tuple[str, ...] = ()
        remote: tuple[str, ...] = ()
        if family is not None:
            whole = ((0, (1 << BITS[family]) - 1),)
            local = () if box.local == whole else address_texts(box.local, family)
            remote = () if box.remote == whole else address_texts(box.remote, family)
            if not local and not remote:
                remote = (FAMILY_RANGE[family],)
        local_ports = () if box.local_ports == ALL_PORTS else port_texts(box.local_ports)
        remote_ports = () if box.remote_ports == ALL_PORTS else port_texts(box.remote_ports)
        action = "Allow" if entry.action == ALLOW else "Block"
        if self.rules and self.rules[-1].action != action:
            self.priority += 1
            if self.priority > MAX_PRIORITY:
                raise Unsupported(entry.where, "priority", f"the {self.direction} rules "
                                  f"change action more than {MAX_PRIORITY - BASE_PRIORITY} "
                                  "times (HNS priorities end at 65000)")
        for protocol in _protocols(entry, ports):
            for la, ra, lp, rp in product(_chunks(local), _chunks(remote),
                                          _chunks(local_ports), _chunks(remote_ports)):
                if len(self.rules) >= self.max_rules:
                    raise Unsupported(entry.where, "rules", f"the {self.direction} list "
                                      f"needs more than {self.max_rules} HNS ACL rules")
                self.rules.append(AclRule(
                    id=f"{self.name}-{self.hns_direction.lower()}-{len(self.rules)}",
                    action=action, direction=self.hns_direction, priority=self.priority,
                    protocols=protocol, local_addresses=la, remote_addresses=ra,
                    local_ports=lp, remote_ports=rp))


def compile(flat: Mapping[int, Flat], direction: str, name: str,
            max_rules: int = MAX_RULES) -> list[AclRule]:
    """The HNS ACL rules of one endpoint's `flat` lists (family -> list, each ending with
    an entry matching everything) in `direction` (Ingress or Egress). Rule ids are
    `<name>-in-<n>` or `<name>-out-<n>`. Raises Unsupported (see the module)."""
    if direction not in HNS_DIRECTIONS:
        raise ValueError(f"direction {direction!r}: expected {INGRESS} or {EGRESS}")
    writer = _Writer(direction, name, max_rules)
    last: dict[int, Entry] = {}
    for family in sorted(flat):
        entries = flat[family]
        if not entries or entries[-1].box != Box.everything(family):
            raise ValueError(f"{name}: the IPv{family} list does not end with an entry "
                             "matching every packet")
        for entry in entries[:-1]:
            writer.entry(entry, family)
        last[family] = entries[-1]
    # The ends: Allow ones (observe mode, a default-allow profile) before the last rule,
    # one for both families when both end so; the last rule, Calico's end-of-tier Block,
    # decides what the lists deny at their end.
    allowing = [f for f, e in last.items() if e.action == ALLOW]
    if len(allowing) == 2:
        writer.entry(last[allowing[0]], None)
    else:
        for family in allowing:
            writer.entry(last[family], family)
    denying = [e for e in last.values() if e.action != ALLOW]
    writer.entry(Entry(DENY, Box.everything(4), denying[0].where if denying else
                       "the last rule (Calico's end-of-tier Block)"), None)
    return writer.rules
