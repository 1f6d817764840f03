"""The projectcalico.org/v3 kinds a host-endpoint system needs, as frozen dataclasses.

Each kind is read from decoded YAML by `parse_resource` (strict: unknown fields are
errors, every error names kind, name and field) and written back by `Resource.dump()`
in Calico's YAML shape, with defaults applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from bulkhead import api
from bulkhead.model.checks import (
    PORT_PROTOCOLS,
    NamedPort,
    Port,
    check_annotations,
    check_cidr,
    check_domain,
    check_interface,
    check_ip,
    check_labels,
    check_name,
    check_policy_name,
    check_port,
    check_protocol,
    check_rule_net,
    check_selector,
    check_tier_name,
    protocol_number,
    read_cidrs,
)
from bulkhead.model.errors import ValidationError
from bulkhead.model.reader import Reader, show
from bulkhead.net import Span, parse_spans
from bulkhead.selector import Selector, parse

API_VERSION = api.API_VERSION
ACTIONS = ("Allow", "Deny", "Log", "Pass")
INGRESS, EGRESS = "Ingress", "Egress"
DEFAULT_TIER = "default"
DEFAULT_TIER_ORDER = 1_000_000.0
DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"
# Per-host enforcement mode (docs/policy.md): a HostEndpoint labelled observe is
# logged as its policies decide but never blocked; enforce (the default) blocks.
ENFORCEMENT_LABEL = "microseg.bulkhead.io/enforcement"
OBSERVE, ENFORCE = "observe", "enforce"
ENFORCEMENT_MODES = (ENFORCE, OBSERVE)


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    """Drop empty values, as Calico's `omitempty` does."""
    return {k: v for k, v in d.items() if v not in (None, [], {}, "")}


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True, slots=True)
class Metadata:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str | None = None
    uid: str | None = None
    creation_timestamp: str | None = None
    generation: int | None = None

    def dump(self) -> dict[str, Any]:
        return _prune({
            "name": self.name, "labels": dict(self.labels),
            "annotations": dict(self.annotations), "resourceVersion": self.resource_version,
            "uid": self.uid, "creationTimestamp": self.creation_timestamp,
            "generation": self.generation,
        })


def _read_metadata(r: Reader, name_check: Any = check_name) -> Metadata:
    if r.has("namespace"):
        r.get("namespace")
        raise r.fail(f"{r.kind} is not namespaced", "namespace")
    name = r.string("name", required=True, check=name_check)
    assert name is not None
    labels = r.str_map("labels")
    check_labels(r.child("labels", labels), labels)
    annotations = r.str_map("annotations")
    check_annotations(r.child("annotations", annotations), annotations)
    version = _resource_version(r)
    generation = r.integer("generation", 0, 2**63 - 1)
    meta = Metadata(
        name=name, labels=labels, annotations=annotations,
        resource_version=version,
        uid=r.string("uid"), creation_timestamp=_timestamp(r), generation=generation,
    )
    r.done()
    return meta


def _resource_version(r: Reader) -> str | None:
    """The version a write expects the resource to be at: opaque text, as in Kubernetes
    and Calico (a manifest exported from another datastore carries its own, such as
    "123/456"), or a number as YAML reads one; empty is none. At most 64 printable
    characters. Only the server's own (digits) can match: a PUT with another gets 409."""
    version = r.get("resourceVersion")
    if version is None or version == "":
        return None
    text = str(version) if isinstance(version, int) and not isinstance(version, bool) \
        and version.bit_length() < 256 else version
    if not (isinstance(text, str) and len(text) <= 64 and text.isprintable()):
        raise r.fail(f"must be a version as the server wrote it (text of at most 64 "
                     f"printable characters), not {show(version)}", "resourceVersion")
    return text


def _timestamp(r: Reader) -> str | None:
    value = r.get("creationTimestamp")
    return None if value is None else str(value)


# ------------------------------------------------------------------------------ rules
@dataclass(frozen=True, slots=True)
class ICMPMatch:
    type: int | None = None
    code: int | None = None

    def dump(self) -> dict[str, Any]:
        return _prune({"type": self.type, "code": self.code})


@dataclass(frozen=True, slots=True)
class EntityRule:
    """A rule's `source` or `destination`: every criterion given must hold."""

    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    selector: Selector | None = None
    not_selector: Selector | None = None
    ports: tuple[Port, ...] = ()
    not_ports: tuple[Port, ...] = ()
    domains: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == EntityRule()

    def dump(self) -> dict[str, Any]:
        return _prune({
            "nets": list(self.nets), "notNets": list(self.not_nets),
            "selector": str(self.selector) if self.selector else None,
            "notSelector": str(self.not_selector) if self.not_selector else None,
            "ports": [p.dump() for p in self.ports],
            "notPorts": [p.dump() for p in self.not_ports],
            "domains": list(self.domains),
        })


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    protocol: str | int | None = None
    not_protocol: str | int | None = None
    icmp: ICMPMatch | None = None
    not_icmp: ICMPMatch | None = None
    ip_version: int | None = None
    source: EntityRule = EntityRule()
    destination: EntityRule = EntityRule()
    annotations: Mapping[str, str] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        return _prune({
            "metadata": {"annotations": dict(self.annotations)} if self.annotations else None,
            "action": self.action, "protocol": self.protocol, "notProtocol": self.not_protocol,
            "icmp": self.icmp.dump() if self.icmp else None,
            "notICMP": self.not_icmp.dump() if self.not_icmp else None,
            "ipVersion": self.ip_version,
            "source": self.source.dump(), "destination": self.destination.dump(),
        })


_UNSUPPORTED_RULE = {
    "http": "HTTP match needs an application-layer proxy, which host endpoints do not have",
    "serviceAccounts": "service accounts exist only for Kubernetes pods",
    "namespaceSelector": "namespaces exist only for Kubernetes workloads",
    "services": "Kubernetes services are not host endpoints",
}


def _done(r: Reader, unsupported: dict[str, str]) -> None:
    """`r.done`, the fields Bulkhead does not take refused with their reason, unless given
    null, or "" for a string field: Calico cannot tell those from a field left out.
    (`http: {}` is not: Calico holds an empty match as a match, an application-layer
    one.)"""
    data = r.mapping()
    for key in unsupported:
        if key in data and (data[key] is None or (data[key] == "" and key in _STRING_FIELDS)):
            r.get(key)
    r.done(unsupported)


# The unsupported fields Calico types as strings (`""` is its zero value); the others
# (http, services, serviceAccounts) are objects, for which `""` is no value at all: the
# CRD schema (type: object) and Go's JSON decoder refuse it.
_STRING_FIELDS = frozenset({"namespaceSelector", "serviceAccountSelector"})


def _read_icmp(r: Reader) -> ICMPMatch | None:
    if r.data is None:
        return None
    r.mapping()
    icmp_type = r.integer("type", 0, 254)
    code = r.integer("code", 0, 255)
    if code is not None and icmp_type is None:
        raise r.fail("code needs a type", "code")
    r.done()
    return ICMPMatch(icmp_type, code)


# Calico's CRD bounds on an EntityRule's lists (MaxItems).
MAX_NETS = 256
MAX_PORTS = 50
# Calico's CRD bound on a policy's or a profile's rules, a direction each (MaxItems).
MAX_RULES = 1024


def _at_most(r: Reader, what: str, limit: int) -> None:
    value = r.mapping().get(what)
    if isinstance(value, list) and len(value) > limit:
        raise r.fail(f"{len(value)} entries; at most {limit}", what)


def _read_entity(r: Reader, side: str, direction: str) -> EntityRule:
    r.mapping()
    for what, limit in (("nets", MAX_NETS), ("notNets", MAX_NETS), ("ports", MAX_PORTS),
                        ("notPorts", MAX_PORTS)):
        _at_most(r, what, limit)
    nets = r.str_list("nets", check_rule_net)
    not_nets = r.str_list("notNets", check_rule_net)
    selector = r.string("selector")
    not_selector = r.string("notSelector")
    entity = EntityRule(
        nets=nets, not_nets=not_nets,
        selector=(check_selector(r.child("selector", selector), selector, global_allowed=False)
                  if selector else None),
        not_selector=(check_selector(r.child("notSelector", not_selector), not_selector)
                      if not_selector else None),
        ports=tuple(check_port(item, item.data) for item in r.items("ports")),
        not_ports=tuple(check_port(item, item.data) for item in r.items("notPorts")),
        domains=r.str_list("domains", check_domain),
    )
    # Calico Enterprise: domains only in the destination, of an Allow rule (checked with
    # the action), and never beside nets or selector; notNets, notSelector and ports may
    # narrow them. It lets an ingress rule carry them and ignores them there, which would
    # widen the rule: refused here instead.
    if entity.domains and not (side == "destination" and direction == "egress"):
        raise r.fail("domains can only be specified in the destination of an egress Allow "
                     "rule", "domains")
    for what, given in (("nets", entity.nets), ("selector", entity.selector)):
        if entity.domains and given:
            raise r.fail(f"must be left empty when {side}.domains is specified", what)
    _done(r, _UNSUPPORTED_RULE)
    return entity


def _read_rule(r: Reader, direction: str) -> Rule:
    r.mapping()
    action = r.string("action", required=True)
    if action not in ACTIONS:
        raise r.fail(f"{show(action)} is not an action (Allow, Deny, Log or Pass)", "action")
    protocol = None if r.get("protocol") is None else check_protocol(
        r.field("protocol"), r.get("protocol"))
    not_protocol = None if r.get("notProtocol") is None else check_protocol(
        r.field("notProtocol"), r.get("notProtocol"))
    ip_version = r.integer("ipVersion", 4, 6)
    if ip_version not in (None, 4, 6):
        raise r.fail(f"{ip_version} is not 4 or 6", "ipVersion")
    icmp = _read_icmp(r.field("icmp"))
    not_icmp = _read_icmp(r.field("notICMP"))
    annotations: dict[str, str] = {}
    if r.get("metadata") is not None:
        meta = r.field("metadata")
        annotations = meta.str_map("annotations")
        check_annotations(meta.child("annotations", annotations), annotations)
        meta.done()
    source = _read_entity(r.field("source"), "source", direction)
    destination = _read_entity(r.field("destination"), "destination", direction)
    rule = Rule(action=action, protocol=protocol, not_protocol=not_protocol, icmp=icmp,
                not_icmp=not_icmp, ip_version=ip_version, source=source,
                destination=destination, annotations=annotations)
    if destination.domains and action != "Allow":
        raise r.fail(f"only valid for Allow rules (the action is {action})",
                     "destination.domains")
    _check_rule(r, rule)
    _done(r, _UNSUPPORTED_RULE)
    return rule


def _read_rules(r: Reader) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    """The ingress and the egress rules of a policy or profile spec, at most MAX_RULES
    each, as Calico's CRDs bound them."""
    for what in ("ingress", "egress"):
        _at_most(r, what, MAX_RULES)
    return (tuple(_read_rule(item, "ingress") for item in r.items("ingress")),
            tuple(_read_rule(item, "egress") for item in r.items("egress")))


def _check_rule(r: Reader, rule: Rule) -> None:
    number = None if rule.protocol is None else protocol_number(rule.protocol)
    versions: set[int] = set()
    for side_name, side in (("source", rule.source), ("destination", rule.destination)):
        for what, ports in (("ports", side.ports), ("notPorts", side.not_ports)):
            if number is not None and ports and number not in PORT_PROTOCOLS:
                raise r.fail(f"ports are only allowed with protocol TCP, UDP or SCTP "
                             f"(protocol is {show(rule.protocol)})", f"{side_name}.{what}")
            if number is None and any(not isinstance(p, NamedPort) for p in ports):
                raise r.fail("a numeric port or range needs protocol TCP, UDP or SCTP "
                             "(protocol is unset)", f"{side_name}.{what}")
        for what, nets in (("nets", side.nets), ("notNets", side.not_nets)):
            for i, net in enumerate(nets):
                version = 6 if ":" in net else 4
                versions.add(version)
                if rule.ip_version and version != rule.ip_version:
                    raise r.fail(f"{show(net)} is IPv{version} but ipVersion is "
                                 f"{rule.ip_version}", f"{side_name}.{what}[{i}]")
                if what == "notNets" and net in ("0.0.0.0/0", "::/0"):
                    raise r.fail(f"{show(net)} would exclude every address",
                                 f"{side_name}.{what}[{i}]")
    if len(versions) > 1:
        raise r.fail("mixes IPv4 and IPv6 nets; write one rule per IP version")
    if rule.icmp is not None and number not in (1, 58):
        raise r.fail("is only allowed with protocol ICMP or ICMPv6", "icmp")
    for what, proto in (("protocol", rule.protocol), ("notProtocol", rule.not_protocol)):
        if proto is None or rule.ip_version is None:
            continue
        if (protocol_number(proto), rule.ip_version) in ((1, 6), (58, 4)):
            raise r.fail(f"{what} {proto} does not go with ipVersion {rule.ip_version}",
                         "ipVersion")


# --------------------------------------------------------------------------- policies
@dataclass(frozen=True, slots=True)
class PolicySpec:
    """The spec of a GlobalNetworkPolicy or a StagedGlobalNetworkPolicy."""

    tier: str = DEFAULT_TIER
    order: float | None = None
    selector: Selector = field(default_factory=lambda: parse(""))
    types: tuple[str, ...] = (INGRESS,)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    apply_on_forward: bool = False
    pre_dnat: bool = False
    do_not_track: bool = False
    staged_action: str | None = None  # Set | Delete, staged policies only
    performance_hints: tuple[str, ...] = ()  # Calico's hints to Felix; no effect here

    def rules(self, direction: str) -> tuple[Rule, ...]:
        """The rules that apply in `direction`: none when `types` leaves it out (Calico keeps
        such rules in the resource but never evaluates them)."""
        if direction not in self.types:
            return ()
        return self.ingress if direction == INGRESS else self.egress

    def dump(self) -> dict[str, Any]:
        if self.staged_action == "Delete":  # only the tier says what it deletes
            return {"stagedAction": "Delete", "tier": self.tier}
        out = _prune({
            "stagedAction": self.staged_action,
            "tier": self.tier, "order": _order_out(self.order),
            "selector": str(self.selector), "types": list(self.types),
            "ingress": [x.dump() for x in self.ingress],
            "egress": [x.dump() for x in self.egress],
            "performanceHints": list(self.performance_hints),
        })
        for key, value in (("applyOnForward", self.apply_on_forward),
                           ("preDNAT", self.pre_dnat), ("doNotTrack", self.do_not_track)):
            if value:
                out[key] = True
        return out


def _order_out(order: float | None) -> float | int | None:
    if order is None:
        return None
    return int(order) if order == int(order) else order


PERFORMANCE_HINTS = ("AssumeNeededOnEveryNode",)

_UNSUPPORTED_POLICY = {
    "namespaceSelector": "namespaces exist only for Kubernetes workloads",
    "serviceAccountSelector": "service accounts exist only for Kubernetes pods",
}


def _unset(value: Any) -> bool:
    """A value Calico cannot tell from a field left out: null, empty, "" and false (Go's
    zero values). A number is not: `order` is a pointer, so `order: 0` is set."""
    return value is None or value is False or (isinstance(value, (str, list, dict))
                                               and not value)


def _read_policy_spec(r: Reader, name: str, staged: bool) -> PolicySpec:
    r.mapping()
    staged_action = None
    if staged:
        staged_action = r.string("stagedAction") or "Set"
        if staged_action in ("Learn", "Ignore"):
            raise r.fail(f"{staged_action} is not supported; use Set or Delete", "stagedAction")
        if staged_action not in ("Set", "Delete"):
            raise r.fail(f"{show(staged_action)} is not Set or Delete", "stagedAction")
        if staged_action == "Delete":
            extra = sorted(k for k, v in r.mapping().items()
                           if k not in ("stagedAction", "tier") and not _unset(v))
            if extra:
                raise r.fail(f"with stagedAction Delete, every field but tier must be empty "
                             f"({', '.join(extra)} given)", extra[0])
    # An empty string is an unset field in Calico (omitempty), so the CRD default applies.
    tier = r.string("tier", check=lambda rr, v: None if v == "" else check_tier_name(rr, v))
    tier = tier or None
    prefix = name.split(".", 1)[0] if "." in name else None
    if tier is None and prefix not in (None, DEFAULT_TIER):
        raise r.fail(f"policy name {show(name)} has the prefix {show(prefix + '.')} but no "
                     f"tier is set (so it would go to the default tier); set tier: "
                     f"{prefix}", "tier")
    if tier is None:
        tier = DEFAULT_TIER
    elif prefix is not None and prefix != tier:
        raise r.fail(f"policy name {show(name)} has the prefix {show(prefix + '.')} but "
                     f"the tier is {show(tier)}; write {show(tier + '.' + name.split('.', 1)[1])}"
                     " or drop the prefix", "tier")
    order = r.number("order")
    selector_text = r.string("selector") or ""
    selector = check_selector(r.child("selector", selector_text), selector_text,
                              global_allowed=False)
    ingress, egress = _read_rules(r)
    types_given = r.str_list("types")
    for i, t in enumerate(types_given):
        if t not in (INGRESS, EGRESS):
            raise r.fail(f"{show(t)} is not Ingress or Egress", f"types[{i}]")
    if len(set(types_given)) != len(types_given):
        raise r.fail("lists a type twice", "types")
    hints = r.str_list("performanceHints")
    for i, hint in enumerate(hints):
        if hint not in PERFORMANCE_HINTS:
            raise r.fail(f"{show(hint)} is not a performance hint "
                         f"({', '.join(PERFORMANCE_HINTS)})", f"performanceHints[{i}]")
    if len(set(hints)) != len(hints):
        raise r.fail("lists a hint twice", "performanceHints")
    pre_dnat = bool(r.flag("preDNAT"))
    if pre_dnat and (egress or EGRESS in types_given):
        raise r.fail("a preDNAT policy can only have ingress rules", "egress")
    if types_given:
        types = tuple(t for t in (INGRESS, EGRESS) if t in types_given)
    elif egress and not ingress and not pre_dnat:
        types = (EGRESS,)
    elif egress and ingress:
        types = (INGRESS, EGRESS)
    else:
        types = (INGRESS,)
    # Rules of a direction `types` leaves out are kept and never evaluated, as in Calico
    # (validator_test: "allow Types without ingress when Ingress present").
    spec = PolicySpec(
        tier=tier, order=order, selector=selector, types=types, ingress=ingress,
        egress=egress, apply_on_forward=bool(r.flag("applyOnForward")), pre_dnat=pre_dnat,
        do_not_track=bool(r.flag("doNotTrack")), staged_action=staged_action,
        performance_hints=hints,
    )
    if spec.pre_dnat:
        if spec.do_not_track:
            raise r.fail("preDNAT and doNotTrack cannot both be true", "preDNAT")
        if not spec.apply_on_forward:
            raise r.fail("preDNAT needs applyOnForward: true", "applyOnForward")
    if spec.do_not_track and not spec.apply_on_forward:
        raise r.fail("doNotTrack needs applyOnForward: true", "applyOnForward")
    _done(r, _UNSUPPORTED_POLICY)
    return spec


# ------------------------------------------------------------------------------ kinds
@dataclass(frozen=True, slots=True)
class Resource:
    kind: ClassVar[str] = ""
    metadata: Metadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def labels(self) -> Mapping[str, str]:
        return self.metadata.labels

    def spec_dump(self) -> dict[str, Any]:
        raise NotImplementedError

    def dump(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": self.kind,
                "metadata": self.metadata.dump(), "spec": self.spec_dump()}

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: str | int
    port: int

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "protocol": self.protocol, "port": self.port}


@dataclass(frozen=True, slots=True)
class HostEndpoint(Resource):
    kind: ClassVar[str] = "HostEndpoint"
    node: str = ""
    interface_name: str | None = None
    expected_ips: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    ports: tuple[EndpointPort, ...] = ()

    def spec_dump(self) -> dict[str, Any]:
        return _prune({
            "node": self.node, "interfaceName": self.interface_name,
            "expectedIPs": list(self.expected_ips), "profiles": list(self.profiles),
            "ports": [p.dump() for p in self.ports],
        })


@dataclass(frozen=True, slots=True)
class GlobalNetworkPolicy(Resource):
    kind: ClassVar[str] = "GlobalNetworkPolicy"
    spec: PolicySpec = PolicySpec()
    staged: ClassVar[bool] = False

    def spec_dump(self) -> dict[str, Any]:
        return self.spec.dump()

    @property
    def bare_name(self) -> str:
        """The name without its `<tier>.` prefix: how staged and enforced policies pair up."""
        prefix = self.spec.tier + "."
        return self.name[len(prefix):] if self.name.startswith(prefix) else self.name


@dataclass(frozen=True, slots=True)
class StagedGlobalNetworkPolicy(GlobalNetworkPolicy):
    kind: ClassVar[str] = "StagedGlobalNetworkPolicy"
    staged: ClassVar[bool] = True

    def enforced(self) -> GlobalNetworkPolicy:
        """The GlobalNetworkPolicy this staged policy becomes when promoted (stagedAction
        Set): its name, labels and annotations and its spec without stagedAction, as
        libcalico-go's ConvertStagedGlobalPolicyToEnforced copies them; what the server
        owns (resourceVersion, uid, creationTimestamp, generation) is the server's again."""
        meta = Metadata(name=self.name, labels=dict(self.metadata.labels),
                        annotations=dict(self.metadata.annotations))
        return GlobalNetworkPolicy(metadata=meta, spec=replace(self.spec, staged_action=None))


@dataclass(frozen=True, slots=True)
class Tier(Resource):
    kind: ClassVar[str] = "Tier"
    order: float | None = None
    default_action: str = "Deny"

    def spec_dump(self) -> dict[str, Any]:
        return _prune({"order": _order_out(self.order), "defaultAction": self.default_action})


@dataclass(frozen=True, slots=True)
class GlobalNetworkSet(Resource):
    kind: ClassVar[str] = "GlobalNetworkSet"
    nets: tuple[str, ...] = ()
    allowed_egress_domains: tuple[str, ...] = ()
    # The nets as spans (`spans()`): read with the nets, or from them when first asked.
    # Not an argument, so that `dataclasses.replace` never carries them to other nets.
    _spans: tuple[tuple[Span, ...], tuple[Span, ...]] | None = field(
        default=None, init=False, compare=False, repr=False)

    @classmethod
    def read(cls, metadata: Metadata, nets: tuple[str, ...],
             allowed_egress_domains: tuple[str, ...],
             spans: tuple[tuple[Span, ...], tuple[Span, ...]] | None) -> GlobalNetworkSet:
        """A network set whose nets were read with their spans (`checks.read_cidrs`)."""
        netset = cls(metadata=metadata, nets=nets, allowed_egress_domains=allowed_egress_domains)
        object.__setattr__(netset, "_spans", spans)
        return netset

    def spans(self) -> tuple[tuple[Span, ...], tuple[Span, ...]]:
        """The IPv4 and the IPv6 spans (first and last address) of the nets, in order."""
        if self._spans is None:
            v4, v6 = parse_spans(self.nets)
            object.__setattr__(self, "_spans", (tuple(v4), tuple(v6)))
            assert self._spans is not None
        return self._spans

    def spec_dump(self) -> dict[str, Any]:
        return _prune({"nets": list(self.nets),
                       "allowedEgressDomains": list(self.allowed_egress_domains)})


@dataclass(frozen=True, slots=True)
class Profile(Resource):
    kind: ClassVar[str] = "Profile"
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    labels_to_apply: Mapping[str, str] = field(default_factory=dict)

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == INGRESS else self.egress

    def spec_dump(self) -> dict[str, Any]:
        return _prune({"ingress": [x.dump() for x in self.ingress],
                       "egress": [x.dump() for x in self.egress],
                       "labelsToApply": dict(self.labels_to_apply)})


DEFAULT_ALLOW = Profile(
    metadata=Metadata(name=DEFAULT_ALLOW_PROFILE),
    ingress=(Rule(action="Allow"),), egress=(Rule(action="Allow"),),
)
DEFAULT_TIER_RESOURCE = Tier(metadata=Metadata(name=DEFAULT_TIER), order=DEFAULT_TIER_ORDER)

KINDS: dict[str, type[Resource]] = {
    cls.kind: cls for cls in (HostEndpoint, GlobalNetworkPolicy, StagedGlobalNetworkPolicy,
                              Tier, GlobalNetworkSet, Profile)
}
assert tuple(KINDS) == api.KINDS, "bulkhead.api names the kinds the model reads"


# ------------------------------------------------------------------------------ parse
def check_enforcement_label(kind: str, name: str, path: str, labels: Mapping[str, str]
                            ) -> None:
    """The enforcement label, where it is given, is observe or enforce."""
    value = labels.get(ENFORCEMENT_LABEL)
    if value is not None and value not in ENFORCEMENT_MODES:
        raise ValidationError(kind, name, f'{path}["{ENFORCEMENT_LABEL}"]',
                              f"{show(value)} is not an enforcement mode (expected "
                              f"{OBSERVE} or {ENFORCE})")


def _read_hep(r: Reader, meta: Metadata) -> HostEndpoint:
    check_enforcement_label(r.kind, r.name, "metadata.labels", meta.labels)
    node = r.string("node", required=True, check=check_name)
    iface = r.string("interfaceName",  # "" is unset, as in Calico (omitempty)
                     check=lambda rr, v: None if v == "" else check_interface(rr, v)) or None
    ips = r.str_list("expectedIPs", check_ip)
    if not iface and not ips:
        raise r.fail("a HostEndpoint needs interfaceName or expectedIPs")
    profiles = r.str_list("profiles", check_name)
    ports: list[EndpointPort] = []
    for item in r.items("ports"):
        item.mapping()
        name = item.string("name", required=True)
        assert name is not None
        port = check_port(item.child("name", name), name)
        if not isinstance(port, NamedPort):
            raise item.fail(f"{show(name)} is not a port name", "name")
        raw_proto = item.get("protocol")
        if raw_proto is None:
            raise item.fail("is required", "protocol")
        proto = check_protocol(item.field("protocol"), raw_proto)
        if protocol_number(proto) not in PORT_PROTOCOLS:
            raise item.fail(f"{show(proto)}: named ports need TCP, UDP or SCTP", "protocol")
        number = item.integer("port", 1, 65535)
        if number is None:
            raise item.fail("is required", "port")
        # A name listed twice is accepted, as Calico does; a rule naming it matches any.
        item.done()
        ports.append(EndpointPort(name, proto, number))
    r.done()
    assert node is not None
    return HostEndpoint(metadata=meta, node=node, interface_name=iface, expected_ips=ips,
                        profiles=profiles, ports=tuple(ports))


# Calico's well-known tiers: their order and defaultAction are fixed (CEL rules on Tier).
FIXED_TIERS: dict[str, tuple[float, str]] = {
    DEFAULT_TIER: (DEFAULT_TIER_ORDER, "Deny"),
    "kube-admin": (1_000.0, "Pass"),
    "kube-baseline": (10_000_000.0, "Pass"),
}


def _read_tier(r: Reader, meta: Metadata) -> Tier:
    order = r.number("order")
    action = r.string("defaultAction") or "Deny"  # the CRD's default
    if action not in ("Deny", "Pass"):
        raise r.fail(f"{show(action)} is not Deny or Pass", "defaultAction")
    r.done()
    fixed = FIXED_TIERS.get(meta.name)
    if fixed is not None:
        fixed_order, fixed_action = fixed
        if order != fixed_order:
            raise r.fail(f"the {meta.name} tier's order is fixed at {int(fixed_order)}"
                         + ("; write it" if order is None else ""), "order")
        if action != fixed_action:
            raise r.fail(f"the {meta.name} tier's defaultAction is always {fixed_action}",
                         "defaultAction")
    return Tier(metadata=meta, order=order, default_action=action)


# Calico's validateGlobalNetworkSet: this label maps a namespace into Calico's v1 model.
RESERVED_NETWORK_SET_LABEL = "projectcalico.org/namespace"


def _read_network_set(r: Reader, meta: Metadata) -> GlobalNetworkSet:
    if RESERVED_NETWORK_SET_LABEL in meta.labels:
        raise ValidationError(r.kind, r.name, "metadata.labels",
                              f"{RESERVED_NETWORK_SET_LABEL} is not a valid label name "
                              "(Calico reserves it)")
    # A million nets are read in bulk; value by value only where one is not a CIDR.
    read = read_cidrs(r.get("nets"))
    nets = r.str_list("nets", check_cidr) if read is None else read[0]
    domains = r.str_list("allowedEgressDomains", check_domain)
    r.done()
    return GlobalNetworkSet.read(meta, nets, domains, None if read is None else read[1])


def _read_profile(r: Reader, meta: Metadata) -> Profile:
    ingress, egress = _read_rules(r)
    labels = r.str_map("labelsToApply")
    check_labels(r.child("labelsToApply", labels), labels)
    # labelsToApply become the endpoint's labels, this one included.
    check_enforcement_label(r.kind, r.name, r.sub_path("labelsToApply"), labels)
    r.done()
    return Profile(metadata=meta, ingress=ingress, egress=egress, labels_to_apply=labels)


def _name_check(kind: str) -> Callable[[Reader, str], None]:
    if kind == "Tier":
        return check_tier_name
    return check_policy_name if kind.endswith("GlobalNetworkPolicy") else check_name


def check_resource_name(kind: str, name: str) -> None:
    """Raise ValidationError (`problem`: what is wrong) unless `name` can name a `kind`."""
    _name_check(kind)(Reader(kind, "", "", name), name)


def parse_resource(obj: Any) -> Resource:
    """Validate one decoded document and return the resource it describes."""
    if not isinstance(obj, dict):
        raise ValidationError("", "", "", f"a resource must be a mapping, not {show(obj)}")
    kind = obj.get("kind")
    meta_data = obj.get("metadata")
    name = meta_data.get("name") if isinstance(meta_data, dict) else None
    name = name if isinstance(name, str) else ""
    top = Reader(str(kind or ""), name, "", obj)
    if not isinstance(kind, str) or kind not in KINDS:
        raise top.fail(f"{show(kind)} is not a supported kind ({', '.join(KINDS)})", "kind")
    version = top.get("apiVersion")
    if version != API_VERSION:
        raise top.fail(f"{show(version)}: expected {API_VERSION}", "apiVersion")
    top.get("kind")
    if meta_data is None:
        raise top.fail("is required", "metadata")
    meta = _read_metadata(top.field("metadata"), _name_check(kind))
    spec = top.field("spec")
    spec.mapping()
    top.done({"status": "status is written by the system"})
    resource: Resource
    if kind in ("GlobalNetworkPolicy", "StagedGlobalNetworkPolicy"):
        staged = kind == "StagedGlobalNetworkPolicy"
        cls = StagedGlobalNetworkPolicy if staged else GlobalNetworkPolicy
        resource = cls(metadata=meta, spec=_read_policy_spec(spec, meta.name, staged))
    elif kind == "HostEndpoint":
        resource = _read_hep(spec, meta)
    elif kind == "Tier":
        resource = _read_tier(spec, meta)
    elif kind == "GlobalNetworkSet":
        resource = _read_network_set(spec, meta)
    else:
        resource = _read_profile(spec, meta)
    return resource
