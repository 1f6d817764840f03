"""Render a node's plan as one nftables table, `inet bulkhead`. Pure: no kernel involved.

Layout, per direction (ingress = the `input` hook, egress = `output`):

    input:   ct established,related accept; ct invalid drop; lo accept; IPv6 neighbour
             discovery accept; failsafe ports accept;
             iifname vmap @ep_in  (interface -> jump to its endpoint's chain)
             jump <the "*" endpoint's chain>, if the node has one
    e_<h>:   jump p_<h> per untracked / pre-DNAT policy; jump t_<h> per tier; jump r_<h>
             per profile; drop.  (Always ends in a verdict.)
    t_<h>:   the tier's rules for this endpoint, in policy then rule order: Allow accept,
             Deny drop, Pass return (to the next tier), Log log; then drop if the tier's
             defaultAction is Deny (Pass: fall back to the endpoint chain).
    r_<h>:   a profile's rules; Pass returns to the next profile.

Untracked (doNotTrack) policies are evaluated first a second time, at raw priority,
before connection tracking (`raw_prerouting`, `raw_output`; only when an endpoint has
one): lo, neighbour discovery and failsafe ports are left alone, then the endpoint's
untracked policies (chains n_<h>, interface -> u_<h> through @raw_in / @raw_out): Allow
goes to `untracked_accept` (`notrack accept`), Deny drops, no match goes on to conntrack
and the filter chains, which evaluate the same policies again and reach the same verdict.

Flow logs (`render(..., flow_logs=FlowLogging())`): every decision above that ends or
passes on a connection also counts the hit in a named counter and logs the packet to an
NFLOG group (inbound and outbound apart) with a prefix that names the decision, such as
`AI0|default|allow-web` (action, direction, rule index | tier | policy), or `AI0|#<hash>`
when that would be longer than 63 characters. `Ruleset.decisions` maps each prefix back
to its `Decision`. Only first packets get there: established traffic is accepted before.
A verdict-map element then goes to a small chain (`l_<h>`) that counts, logs and gives
the verdict; a Pass from such a chain returns to the endpoint chain, as the tier's own
`return` would. Loopback and neighbour discovery log nothing. At raw priority only an
untracked policy's Deny is logged (the packet ends there); its Allow and no-match go on
to the filter chains, which evaluate the policy again and log there. An untracked
(doNotTrack) flow has no connection to be first in, so each of its packets is logged.

Observe mode (an endpoint whose plan says `mode: observe`, docs/policy.md): its chains
are rendered with every Deny of a policy, a profile, a tier's defaultAction and the end
of the endpoint chain (no profile) giving `accept` instead of `drop`, after the same
counter and log (the prefix still names the Deny, so flow logs say what enforcement
would block); Allow, Pass and the failsafe ports are as in enforce. At raw priority an
untracked Deny of an observe endpoint accepts the packet out of the raw hook (no
`notrack`, nothing logged there): it goes on to connection tracking and the filter
chains, which log the Deny and accept. An endpoint in enforce mode renders exactly as
without modes.

Domains (docs/dns.md): a rule's `destination.domains`, and the allowedEgressDomains of
the network sets an egress Allow rule's destination selector takes, match through domain
sets (`d4_<h>`, `d6_<h>`: `flags timeout`, keyed by the sorted patterns): `ip daddr
@d4_<h>` beside the rule's other matches, or as an alternative to the selector's own set.
They are declared empty: the agent fills them from DNS answers, each element with the
answer's TTL as its timeout, and `Ruleset.domain_sets` tells it which patterns each set
holds. With `dns=DnsSnooping(...)`, UDP port 53 to and from the trusted resolvers is
logged whole to an NFLOG group, first in the input and output chains (before
established traffic is accepted), for the agent's snooper; with `hold`, answers are also
dropped while the `dns_hold` set has its element, and the agent sends them on (marked)
once their addresses are in the domain sets.

Chains are named by a hash of their content, so endpoints that need the same program share
one chain, and an unchanged chain keeps its name. Selectors become named sets keyed by
their canonical form (`s4_<h>`, `s6_<h>`), named ports sets of address . protocol . port
(`np4_<h>`), so a label change moves set elements and leaves every rule as it is.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bulkhead.dataplane.nftables.ruleset import Chain, NftSet, Ruleset
from bulkhead.dataplane.nftables.vmap import (
    Box,
    RunCompiler,
    TooManyCells,
    compile_texts,
    field_expr,
    field_type,
    is_plain,
    rule_boxes,
)
from bulkhead.model import EGRESS, INGRESS, OBSERVE
from bulkhead.net import AddressSet, address_text, merge
from bulkhead.policy.plan import (
    DIRECTIONS,
    DirectionPlan,
    EndpointPlan,
    NamedPortKey,
    NodePlan,
    PolicyPlan,
    RulePlan,
    SidePlan,
)
from bulkhead.policy.semantics import icmp_protocol
from bulkhead.policy.trace import (
    Decision,
    failsafe,
    no_profile,
    profile_rule,
    rule_decision,
    tier_end,
)
from bulkhead.selector import Selector

TABLE = "bulkhead"
VERDICT = {"Allow": "accept", "Deny": "drop", "Pass": "return"}
UNTRACKED_ACCEPT = "untracked_accept"
# At raw priority an Allow also takes the packet out of connection tracking.
RAW_VERDICT = {**VERDICT, "Allow": f"goto {UNTRACKED_ACCEPT}"}
# Observe mode: nothing is blocked; a Deny is logged as decided and accepted.
OBSERVE_VERDICT = {**VERDICT, "Deny": "accept"}
# At raw priority an observed Deny leaves the raw hook, tracked, for the filter chains.
OBSERVE_RAW_VERDICT = {**RAW_VERDICT, "Deny": "accept"}
HOOK = {INGRESS: "input", EGRESS: "output"}
RAW_HOOK = {INGRESS: "prerouting", EGRESS: "output"}
ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert"
MAX_PREFIX = 63       # NFLOG prefixes are at most 64 bytes with the terminating NUL
# DNS answers held for the agent (DnsSnooping.hold): the set whose one element (port 53,
# with a timeout the agent renews) turns holding on, the mark of answers the agent sends
# on, and the bytes of a held answer copied (all of it: it is sent on from the copy).
HOLD_SET = "dns_hold"
HOLD_PREFIX = "dns-held"
RELEASE_MARK = 0x0BD50000
RELEASE_MASK = 0xFFFF0000
HOLD_SNAPLEN = 65535


@dataclass(frozen=True)
class FlowLogging:
    """Where the table logs first packets: one NFLOG group per direction (felix uses 1
    for inbound and 2 for outbound), the bytes of each packet copied (headers only)."""

    inbound_group: int = 1
    outbound_group: int = 2
    snaplen: int = 128

    def group(self, direction: str) -> int:
        return self.inbound_group if direction == INGRESS else self.outbound_group


@dataclass(frozen=True)
class DnsSnooping:
    """DNS over UDP between this host and its trusted resolvers, logged whole to one NFLOG
    group before anything else in the input and output chains (established traffic
    included): answers fill the domain sets, queries pair with them for DNS logs.

    `hold` (felix's DelayDNSResponse, without NFQUEUE): while the agent keeps the
    element of HOLD_SET alive (a timeout it renews), an answer is logged and *dropped*;
    the agent sends it on (a raw socket, marked RELEASE_MARK, which these rules let
    through) once the domain sets hold its addresses. When the agent stops renewing
    (stopped, hung), the element times out and answers pass as in no-delay mode."""

    servers: tuple[str, ...]      # the resolvers' addresses (IPv4 and IPv6)
    group: int = 3
    snaplen: int = 8192           # bytes copied: an EDNS answer of 4096 bytes fits
    hold: bool = False

    def rules(self, direction: str) -> list[str]:
        ingress = direction == INGRESS
        out = []
        for family, word in ((4, "ip"), (6, "ip6")):
            servers = sorted({str(a) for a in map(ipaddress.ip_address, self.servers)
                              if a.version == family})
            if not servers:
                continue
            peer, port = ("saddr", "sport") if ingress else ("daddr", "dport")
            match = f"meta l4proto udp {word} {peer} {{ {', '.join(servers)} }} udp {port} 53"
            if ingress:
                # Only replies to this host's queries (and untracked traffic): a packet
                # forged or unsolicited from the resolver's address is neither logged nor
                # held, so a flood of them cannot push real answers out of the buffer.
                match += " ct state established,untracked"
            if ingress and self.hold:
                match += f" meta mark & {RELEASE_MASK:#x} != {RELEASE_MARK:#x}"
                out.append(f"{match} udp sport @{HOLD_SET} log prefix \"{HOLD_PREFIX}\" group "
                           f"{self.group} snaplen {HOLD_SNAPLEN} drop comment "
                           f"\"dns answers held for the agent\"")
            out.append(f"{match} log group {self.group} snaplen {self.snaplen} "
                       f"comment \"dns {'answers' if ingress else 'queries'}\"")
        return out


def log_prefix(decision: Decision) -> str:
    """The NFLOG prefix naming `decision`: readable where it fits, hashed where not."""
    rule = "-" if decision.rule is None else str(decision.rule)
    head = f"{decision.action[0].upper()}{decision.direction[0]}{rule}|"
    body = f"{decision.tier}|{decision.policy}"
    text = head + body
    if len(text) > MAX_PREFIX or not all(ch.isalnum() or ch in "|.-_:/" for ch in text):
        text = head + "#" + _h(body + chr(10) + text)
    return text


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _quote(text: str, limit: int) -> str:
    clean = "".join(ch if ch.isalnum() or ch in " .:_-/()=,*" else "_" for ch in text)
    return '"' + clean[:limit] + '"'


def _ranges(ports: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merge(ports))


def _nets(nets: AddressSet) -> str:
    return ", ".join([*nets.texts(4), *nets.texts(6)])


# Where a run of rules is decided, for flow logs: (direction, tier, raw); tier "profile"
# for a profile's rules; raw: at raw priority, where only a Deny is logged (an Allow or
# a no-match goes on to the filter chains, which log it); None: nothing is logged.
Place = tuple[str, str, bool] | None


class RenderCache:
    """What one render keeps for the next (the agent renders its table on every change):
    each verdict map's compiler (`vmap.RunCompiler`, which cuts again only what moved) and
    each selector set's elements, by the address set they were written from. The next
    render takes from it what its inputs did not change; what it did not use is dropped."""

    def __init__(self) -> None:
        self.runs: dict[tuple[object, ...], RunCompiler] = {}
        self.sets: dict[tuple[int, int], tuple[AddressSet, tuple[str, ...]]] = {}
        self._used_runs: set[tuple[object, ...]] = set()
        self._used_sets: set[tuple[int, int]] = set()
        self._boxes: dict[tuple[int, int], tuple[RulePlan, tuple[int, ...], tuple[object, ...],
                                                 list[Box]]] = {}
        self._used_boxes: set[tuple[int, int]] = set()

    def compiler(self, key: tuple[object, ...]) -> RunCompiler:
        self._used_runs.add(key)
        found = self.runs.get(key)
        if found is None:
            found = self.runs[key] = RunCompiler()
        return found

    def boxes(self, rule: RulePlan, family: int, inputs: tuple[object, ...],
              make: Callable[[], list[Box]]) -> list[Box]:
        """A rule's boxes, made again when the rule or its inputs (the address sets and
        named ports it uses) are other objects than last time."""
        key = (id(rule), family)
        self._used_boxes.add(key)
        ids = tuple(map(id, inputs))
        kept = self._boxes.get(key)
        # (The kept entry holds the rule and the inputs, so their ids stay theirs.)
        if kept is not None and kept[0] is rule and kept[1] == ids:
            return kept[3]
        boxes = make()
        self._boxes[key] = (rule, ids, inputs, boxes)
        return boxes

    def set_elements(self, members: AddressSet, family: int) -> tuple[str, ...]:
        key = (id(members), family)
        self._used_sets.add(key)
        kept = self.sets.get(key)
        if kept is not None and kept[0] is members:
            return kept[1]
        elements = tuple(sorted(members.texts(family)))
        self.sets[key] = (members, elements)
        return elements

    def done(self) -> None:
        """After a render: forget what it did not use."""
        self.runs = {k: v for k, v in self.runs.items() if k in self._used_runs}
        self.sets = {k: v for k, v in self.sets.items() if k in self._used_sets}
        self._boxes = {k: v for k, v in self._boxes.items() if k in self._used_boxes}
        self._used_runs, self._used_sets, self._used_boxes = set(), set(), set()


class _Renderer:
    def __init__(self, plan: NodePlan, table: str, compile_runs: bool,
                 flow_logs: FlowLogging | None, dns: DnsSnooping | None = None,
                 cache: RenderCache | None = None) -> None:
        self.plan = plan
        self.compile = compile_runs
        self.flow_logs = flow_logs
        self.dns = dns
        self.cache = cache
        self.rs = Ruleset(table, warnings=list(plan.warnings), notes=list(plan.notes))
        # Address lists the incremental calculator patched: each one's id -> the list it
        # replaced and the ranges it changed in (a verdict map's leaf is redone there).
        self.hints: dict[int, tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]]] = {}
        for sel, (before, regions) in plan.moved_from.items():
            after = plan.selector_sets.get(sel)
            for family in (4, 6):
                if after is not None and after.spans(family) is not before.spans(family):
                    self.hints[id(after.spans(family))] = (
                        before.spans(family),
                        [(lo, hi) for f, lo, hi in regions if f == family])

    # -- flow logs --------------------------------------------------------------------
    def logged(self, decision: Decision) -> str:
        """Statements that count and log a decision (before its verdict); "" when flow
        logs are off."""
        if self.flow_logs is None:
            return ""
        prefix = log_prefix(decision)
        counter = f"c_{_h(prefix)}"
        self.rs.decisions[prefix] = decision
        self.rs.counters[counter] = prefix
        return (f'counter name "{counter}" log prefix "{prefix}" '
                f"group {self.flow_logs.group(decision.direction)} "
                f"snaplen {self.flow_logs.snaplen} ")

    def decision_of(self, rule: RulePlan, place: Place) -> Decision | None:
        if place is None or self.flow_logs is None or rule.action not in VERDICT:
            return None
        direction, tier, raw = place
        if raw and rule.action != "Deny":
            return None
        if tier == "profile":
            return profile_rule(direction, rule.owner, rule.index, rule.action)
        return rule_decision(direction, tier, rule.owner, rule.index, rule.action)

    # -- sets -------------------------------------------------------------------------
    def selector_set(self, selector: Selector, family: int) -> str:
        name = f"s{family}_{_h(selector.canonical)}"
        if name not in self.rs.sets:
            members = self.plan.selector_sets[selector]
            elements = self.cache.set_elements(members, family) if self.cache is not None \
                else tuple(sorted(members.texts(family)))
            self.rs.sets[name] = NftSet(name, f"ipv{family}_addr", ("interval",), elements)
        return name

    def domain_set(self, domains: Sequence[str], family: int) -> str:
        """The set of addresses `domains` resolve to: filled by the agent from DNS
        answers, each element with a timeout (never rendered with elements)."""
        name = f"d{family}_{_h(chr(10).join(domains))}"
        if name not in self.rs.sets:
            self.rs.sets[name] = NftSet(name, f"ipv{family}_addr", ("timeout",))
            self.rs.domain_sets[name] = tuple(domains)
        return name

    def port_set(self, key: NamedPortKey, family: int) -> str:
        selector, port_name = key
        name = f"np{family}_{_h(port_name if selector is None else f'{port_name} {selector}')}"
        if name not in self.rs.sets:
            entries = [e for e in self.plan.named_ports.get(key, ()) if e.family == family]
            self.rs.sets[name] = NftSet(
                name, f"ipv{family}_addr . inet_proto . inet_service",
                elements=tuple(sorted({f"{address_text(e.address, family)} . {e.protocol} . "
                                       f"{e.port}" for e in entries})))
        return name

    def rules(self, rules: Sequence[RulePlan], label: str,
              verdicts: Mapping[str, str] = VERDICT, place: Place = None) -> list[str]:
        """Rule lines for a sequence of rules: runs of two or more plain rules become one
        verdict-map lookup per IP family, the others one nft rule (or a few) each."""
        out: list[str] = []
        run: list[RulePlan] = []

        def flush() -> None:
            lines: list[str] | None = None
            if len(run) >= 2 and self.compile:
                chains = len(self.rs.chains)
                try:
                    lines = self.run_lookup(run, label, verdicts, place)
                except TooManyCells:
                    # Cells multiplying past the run's budget: the rules one by one cost
                    # their own intervals. The chains the lookup made for its cells' flow
                    # logs (the newest) go: the rules log inline.
                    for name in list(self.rs.chains)[chains:]:
                        del self.rs.chains[name]
            if lines is None:
                lines = [line for r in run for line in self.rule(r, verdicts, place)]
            out.extend(lines)
            run.clear()

        for rule in rules:
            if is_plain(rule) and not self.plan.domains_of(rule):
                run.append(rule)
                continue
            flush()
            out.extend(self.rule(rule, verdicts, place))
        flush()
        return out

    def run_lookup(self, run: Sequence[RulePlan], label: str,
                   verdicts: Mapping[str, str] = VERDICT, place: Place = None) -> list[str]:
        per_family = any(r.ip_version is not None or r.source.needs_addresses
                         or r.destination.needs_addresses or r.source.nets
                         or r.destination.nets for r in run)
        families = (4, 6) if per_family else (4,)
        comment = f"comment {_quote(label + ': ' + run[0].where + ' .. ' + run[-1].where, 120)}"
        # With flow logs, each rule's cells go to its own chain that counts and logs.
        keys = [r.action for r in run]
        decisions = [self.decision_of(r, place) for r in run]
        if any(decisions):
            keys = [str(i) for i in range(len(run))]
            verdicts = {key: self.log_chain(d, verdicts[r.action]) if d else verdicts[r.action]
                        for key, r, d in zip(keys, run, decisions, strict=True)}
        compiled = []   # every family's first: TooManyCells leaves no map half made
        for family in families:
            boxes = [(b, key) for r, key in zip(run, keys, strict=True)
                     for b in self.boxes(r, family)]
            compiled.append((family, self.compiled(
                (label, *(r.where for r in run), family, *sorted(verdicts.items())),
                boxes, family, verdicts)))
        lines = []
        for family, (fields, interval, elements) in compiled:
            if not elements:
                continue
            prefix = f"meta nfproto ipv{family} " if per_family else ""
            if not fields:  # a rule with no criteria: its verdict for everything
                lines.append(f"{prefix}{elements[0]} {comment}")
                continue
            identity = "\n".join([label, *(r.where for r in run), *fields,
                                   str(interval), *sorted(verdicts.values())])
            name = f"m{family if per_family else ''}_{_h(identity)}"
            self.rs.sets[name] = NftSet(
                name, " . ".join(field_type(f, family) for f in fields),
                ("interval",) if interval else (), elements, map_to="verdict")
            key = " . ".join(field_expr(f, family) for f in fields)
            lines.append(f"{prefix}{key} vmap @{name} {comment}")
        return lines

    def boxes(self, rule: RulePlan, family: int) -> list[Box]:
        """The rule's boxes (`vmap.rule_boxes`), kept in the cache while the rule and the
        address sets and named ports it uses are the same objects."""
        if self.cache is None:
            return rule_boxes(rule, family, self.plan.selector_sets, self.plan.named_ports)
        inputs = tuple(self.plan.selector_sets.get(sel) if sel is not None else None
                       for side in (rule.source, rule.destination)
                       for sel in (side.selector,)) + tuple(
            self.plan.named_ports.get(side.port_key(name))
            for side in (rule.source, rule.destination) for name in side.named_ports)
        return self.cache.boxes(rule, family, inputs, lambda: rule_boxes(
            rule, family, self.plan.selector_sets, self.plan.named_ports))

    def compiled(self, key: tuple[object, ...], boxes: Sequence[tuple[Box, str]], family: int,
                 verdicts: Mapping[str, str]) -> tuple[tuple[str, ...], bool, Sequence[str]]:
        """A run's (fields, interval, sorted element texts); with no fields, its one
        verdict for everything (no element: the run matches nothing)."""
        if self.cache is not None:
            return self.cache.compiler(key).compile(boxes, family, verdicts, self.hints)
        return compile_texts(boxes, family, verdicts)

    def log_chain(self, decision: Decision, verdict: str) -> str:
        """`goto` a chain that counts and logs the decision, then gives `verdict` (a
        Pass's `return` then leaves the tier's chain, as it would have)."""
        return f"goto {self.chain('l', [self.logged(decision) + verdict])}"

    def chain(self, prefix: str, rules: Sequence[str]) -> str:
        name = f"{prefix}_{_h(chr(10).join(rules))}"
        self.rs.chains.setdefault(name, Chain(name, tuple(rules)))
        return name

    # -- rules ------------------------------------------------------------------------
    def rule(self, rule: RulePlan, verdicts: Mapping[str, str] = VERDICT,
             place: Place = None) -> list[str]:
        """nft rule lines for one Calico rule: none if it can never match, several when
        a positive match is an OR (numeric ports or a named port; IPv4 or IPv6 sets)."""
        if rule.ip_version is not None:
            families: list[int | None] = [rule.ip_version]
        elif rule.source.needs_addresses or rule.destination.needs_addresses:
            families = [4, 6]
        else:
            families = [None]
        if rule.action == "Log":
            verdict = f"log prefix {_quote('bulkhead ' + rule.where + ': ', 120)}"
        else:
            decision = self.decision_of(rule, place)
            verdict = (self.logged(decision) if decision else "") + verdicts[rule.action]
        comment = f"comment {_quote(rule.where, 120)}"
        out = []
        for family in families:
            base = self._l3l4(rule, family)
            if base is None:
                continue
            variants = [base]
            for which, side in (("s", rule.source), ("d", rule.destination)):
                domains = self.plan.domains_of(rule) if which == "d" else ()
                variants = [v + extra for v in variants
                            for extra in self._side(side, which, family, domains)]
            out += [" ".join([*v, verdict, comment]) for v in variants]
        return out

    def _l3l4(self, rule: RulePlan, family: int | None) -> list[str] | None:
        parts = [] if family is None else [f"meta nfproto ipv{family}"]
        if rule.protocol is not None:
            parts.append(f"meta l4proto {rule.protocol}")
        if rule.not_protocol is not None:
            parts.append(f"meta l4proto != {rule.not_protocol}")
        if rule.icmp is not None:
            word = "icmpv6" if rule.protocol == 58 else "icmp"
            icmp_type, code = rule.icmp
            if icmp_type is not None:
                parts.append(f"{word} type {icmp_type}")
            if code is not None:
                parts.append(f"{word} code {code}")
        if rule.not_icmp is not None:   # always with a type (rule_plan)
            # Only ICMP messages of the packet's own family, as felix's `icmp type != N`
            # (IPv4 table) and `icmpv6 type != N` (IPv6 table) match: never TCP or UDP.
            if rule.protocol is not None and rule.protocol not in (1, 58):
                return None
            if family is not None:
                if rule.protocol not in (None, icmp_protocol(family)):
                    return None
                if rule.protocol is None:
                    parts.append(f"meta l4proto {icmp_protocol(family)}")
            elif rule.protocol is None:
                parts.append("meta nfproto . meta l4proto { ipv4 . 1, ipv6 . 58 }")
            icmp_type, code = rule.not_icmp
            if code is None:
                parts.append(f"@th,0,8 != {icmp_type}")
            else:
                parts.append(f"@th,0,8 . @th,8,8 != {{ {icmp_type} . {code} }}")
        return parts

    def _side(self, side: SidePlan, which: str, family: int | None,
              domains: Sequence[str] = ()) -> list[list[str]]:
        """Alternatives (each a list of matches that must all hold) for one side.
        `domains`: the destination also matches the addresses these names resolve to
        (the rule's own `domains`, or its selector's network sets' allowedEgressDomains:
        then the selector's members or those addresses)."""
        addr = f"{'ip' if family == 4 else 'ip6'} {which}addr"
        port = f"th {which}port"
        fixed: list[str] = []
        if side.nets:
            fixed.append(f"{addr} {{ {_nets(side.nets)} }}")
        if side.not_nets:
            fixed.append(f"{addr} != {{ {_nets(side.not_nets)} }}")
        by_name = f"{addr} @{self.domain_set(domains, family)}" \
            if domains and family is not None else None
        peers: list[list[str]] = [[]]
        if side.domains and by_name:
            fixed.append(by_name)
        if side.selector and family is not None:
            selected = f"{addr} @{self.selector_set(side.selector, family)}"
            peers = [[selected], [by_name]] if by_name and not side.domains else [[selected]]
        head, fixed = fixed, []
        if side.not_selector and family is not None:
            fixed.append(f"{addr} != @{self.selector_set(side.not_selector, family)}")
        if side.not_ports:
            fixed.append(f"{port} != {{ {_ranges(side.not_ports)} }}")
        for name in side.not_named_ports:
            if family is not None:
                fixed.append(f"{addr} . meta l4proto . {port} != "
                             f"@{self.port_set(side.port_key(name), family)}")
        ported: list[list[str]] = [[]]
        if side.ports or side.named_ports:
            ported = []
            if side.ports:
                ported.append([f"{port} {{ {_ranges(side.ports)} }}"])
            for name in side.named_ports:
                if family is not None:
                    ported.append([f"{addr} . meta l4proto . {port} "
                                   f"@{self.port_set(side.port_key(name), family)}"])
        return [[*head, *peer, *fixed, *extra] for peer in peers for extra in ported]

    # -- chains -----------------------------------------------------------------------
    def direction(self, dp: DirectionPlan, direction: str, mode: str = "") -> str:
        """The endpoint chain for one direction; `mode` OBSERVE accepts where a Deny
        would drop (see the module's docstring)."""
        observe = mode == OBSERVE
        verdicts = OBSERVE_VERDICT if observe else VERDICT
        # Observe chains say so in their comments (and so never share an enforce chain).
        note = " (observe: accept)" if observe else ""
        jumps = []
        for early_tier, policies in _early_groups(dp.early):
            names = ", ".join(p.name for p in policies)
            rules = self.rules(tuple(r for p in policies for r in p.rules),
                               "policy " + names + note, verdicts, (direction, early_tier, False))
            jumps.append(f"jump {self.chain('p', rules)} comment "
                         f"{_quote('policy ' + names, 120)}")
        for tier in dp.tiers:
            rules = self.rules(tier.rules, "tier " + tier.name + note, verdicts,
                               (direction, tier.name, False))
            end = self.logged(tier_end(direction, tier.name, tier.default_action))
            if tier.default_action == "Deny":
                rules.append(f"{end}{verdicts['Deny']} comment "
                             f"{_quote('tier ' + tier.name + ' default Deny' + note, 120)}")
            elif end:   # Pass: logged, then the chain returns to the next tier
                rules.append(f"{end}comment {_quote('tier ' + tier.name + ' default Pass', 120)}")
            jumps.append(f"jump {self.chain('t', rules)} comment "
                         f"{_quote('tier ' + tier.name + ': ' + ', '.join(tier.policies), 120)}")
        for profile in dp.profiles:
            rules = self.rules(profile.rules, "profile " + profile.name + note, verdicts,
                               (direction, "profile", False))
            jumps.append(f"jump {self.chain('r', rules)} comment "
                         f"{_quote('profile ' + profile.name, 120)}")
        last = "no profile rule matched" if dp.profiles else "no profile"
        # No endpoint name in the chain: endpoints with the same program share it.
        jumps.append(f"{self.logged(no_profile(direction))}{verdicts['Deny']} comment "
                     f"{_quote(direction.lower() + ': ' + last + note, 120)}")
        return self.chain("e", jumps)

    def base(self, direction: str) -> Chain:
        ingress = direction == INGRESS
        rules = [*(self.dns.rules(direction) if self.dns else ()),
                 "ct state established,related accept", "ct state invalid drop",
                 *self.unfiltered(direction)]
        if self.dns is not None and self.dns.hold and ingress:
            self.rs.sets[HOLD_SET] = NftSet(HOLD_SET, "inet_service", ("timeout",))
        chains, star = self.by_interface(
            lambda ep: self.direction(ep.direction(direction), direction, ep.mode))
        rules += self.dispatch(direction, "ep_in" if ingress else "ep_out", chains, star)
        hook = f"type filter hook {HOOK[direction]} priority filter; policy accept;"
        return Chain(HOOK[direction], tuple(rules), hook)

    def unfiltered(self, direction: str, log: bool = True) -> list[str]:
        """Rules for what no policy decides: loopback, IPv6 neighbour discovery, the
        failsafe ports (the failsafe set is declared here; hits logged when `log`)."""
        ingress = direction == INGRESS

        def logged() -> str:
            return self.logged(failsafe(direction)) if log else ""

        ifname, peer = ("iifname", "saddr") if ingress else ("oifname", "daddr")
        rules = [f'{ifname} "lo" accept',
                 f"meta l4proto 58 icmpv6 type {{ {ND_TYPES} }} accept"]
        failsafes = self.plan.failsafes.inbound if ingress else self.plan.failsafes.outbound
        plain = sorted({f"{f.protocol} . {f.port}" for f in failsafes if f.net is None})
        if plain:
            name = "fs_in" if ingress else "fs_out"
            self.rs.sets[name] = NftSet(name, "inet_proto . inet_service",
                                        elements=tuple(plain))
            rules.append(f"meta l4proto . th dport @{name} {logged()}accept "
                         f"comment \"failsafe ports\"")
        for f in failsafes:
            if f.net is not None:
                ip = "ip" if f.net.version == 4 else "ip6"
                rules.append(f"{ip} {peer} {f.net} meta l4proto {f.protocol} th dport {f.port} "
                             f"{logged()}accept comment \"failsafe {f}\"")
        return rules

    def by_interface(self, chain_of: Callable[[EndpointPlan], str | None]
                     ) -> tuple[dict[str, str], str | None]:
        """Each interface's endpoint chain, and that of the endpoint on every interface
        (the first one an interface or "*" is given to keeps it)."""
        chains: dict[str, str] = {}
        star: str | None = None
        for ep in self.plan.endpoints:
            chain = chain_of(ep)
            if chain is None:
                continue
            if ep.interfaces == ("*",):
                star = star or chain
            else:
                for iface in ep.interfaces:
                    chains.setdefault(iface, chain)
        return chains, star

    def dispatch(self, direction: str, name: str, chains: Mapping[str, str],
                 star: str | None) -> list[str]:
        """Interface -> endpoint chain through the verdict map `name`, then the chain of
        the endpoint on every interface."""
        ifname = "iifname" if direction == INGRESS else "oifname"
        rules = []
        if chains:
            self.rs.sets[name] = NftSet(name, "ifname", map_to="verdict", elements=tuple(
                f'"{i}" : jump {c}' for i, c in sorted(chains.items())))
            rules.append(f"{ifname} vmap @{name}")
        if star:
            rules.append(f"jump {star} comment \"endpoints on every interface\"")
        return rules

    # -- untracked policies, at raw priority ----------------------------------------------
    def untracked_chain(self, dp: DirectionPlan, direction: str, mode: str = ""
                        ) -> str | None:
        observe = mode == OBSERVE
        jumps = []
        for tier, policies in _early_groups(dp.early, untracked_only=True):
            names = ", ".join(p.name for p in policies)
            # Observe: a Deny is logged by the filter chains (which accept), not here.
            rules = self.rules(tuple(r for p in policies for r in p.rules),
                               "policy " + names + (" (observe)" if observe else ""),
                               OBSERVE_RAW_VERDICT if observe else RAW_VERDICT,
                               None if observe else (direction, tier, True))
            jumps.append(f"jump {self.chain('n', rules)} comment "
                         f"{_quote('untracked policy ' + names, 120)}")
        # No match: on to connection tracking and the filter chains.
        return self.chain("u", jumps) if jumps else None

    def raw_base(self, direction: str) -> Chain | None:
        chains, star = self.by_interface(
            lambda ep: self.untracked_chain(ep.direction(direction), direction, ep.mode))
        if not chains and not star:
            return None
        self.rs.chains.setdefault(UNTRACKED_ACCEPT, Chain(UNTRACKED_ACCEPT, ("notrack accept",)))
        name = "raw_in" if direction == INGRESS else "raw_out"
        rules = [*self.unfiltered(direction, log=False),
                 *self.dispatch(direction, name, chains, star)]
        hook = f"type filter hook {RAW_HOOK[direction]} priority raw; policy accept;"
        return Chain(f"raw_{RAW_HOOK[direction]}", tuple(rules), hook)


def _early_groups(early: Sequence[PolicyPlan], untracked_only: bool = False
                  ) -> list[tuple[str, list[PolicyPlan]]]:
    """The untracked and pre-DNAT policies as runs of one stage and tier, in order: each
    run is one chain, so that a Pass (`return`) skips the rest of its tier's policies of
    that stage, as felix walks each stage tier by tier (with no end-of-tier drop)."""
    groups: list[tuple[str, bool, list[PolicyPlan]]] = []
    for policy in early:
        if untracked_only and not policy.untracked:
            continue
        if groups and groups[-1][:2] == (policy.tier, policy.untracked):
            groups[-1][2].append(policy)
        else:
            groups.append((policy.tier, policy.untracked, [policy]))
    return [(tier, policies) for tier, _, policies in groups]


def render(plan: NodePlan, table: str = TABLE, compile_runs: bool = True,
           flow_logs: FlowLogging | None = None, dns: DnsSnooping | None = None,
           cache: RenderCache | None = None) -> Ruleset:
    """The whole table for the node's plan. `compile_runs=False` renders every rule as
    its own nft rule (the layout verdict maps are measured against). The plan's untracked
    (doNotTrack) policies are also rendered at raw priority, with `notrack`. `flow_logs`:
    count and log every decision (see the module's docstring). `dns`: log DNS to and
    from the trusted resolvers for the agent's snooper (domain sets, DNS logs). `cache`:
    what the last render of this table kept (`RenderCache`); the table is the same."""
    r = _Renderer(plan, table, compile_runs, flow_logs, dns, cache)
    bases = [r.base(d) for d in DIRECTIONS]
    bases += [c for c in (r.raw_base(d) for d in DIRECTIONS) if c is not None]
    # Chains a rule jumps to are declared before it: the notrack accept, policies,
    # profiles, tiers, endpoints, then the base chains.
    rank = {"untracked": 0, "l": 0, "n": 1, "p": 1, "r": 2, "t": 3, "e": 4, "u": 4}
    others = sorted(r.rs.chains.values(),
                    key=lambda c: (rank.get(c.name.split("_")[0], 9), c.name))
    r.rs.chains = {c.name: c for c in [*others, *bases]}
    if cache is not None:
        cache.done()
    return r.rs
