"""HNS ACLs as the JSON the Host Compute Network service takes, and back (for drift).

An endpoint's ACLs go to HCN as one ModifyEndpointSettingRequest (`ResourceType`
"Policy", `RequestType` "Update" replaces the endpoint's policies) whose `Settings` is a
PolicyEndpointRequest: `{"Policies": [{"Type": "ACL", "Settings": AclPolicySetting}]}`.
The field names and their JSON spelling are those of hcsshim's `hcn` package
(hcnpolicy.go: AclPolicySetting with Protocols, Action, Direction, LocalAddresses,
RemoteAddresses, LocalPorts, RemotePorts, RuleType, Priority; empty values omitted;
hcnendpoint.go: the request types). Lists are comma-separated strings; an unrestricted
field is left out, never "Any" (HNS refuses "Any" as an address). Priority is a uint16
that HCN omits when 0, so 1-65535 here.

AclPolicySetting has no identifier: an AclRule's `id` is not sent, and rules parsed back
get ids `<prefix>-<n>` by their place; compare with `comparable` (id left out).

Not run against HNS here (no Windows host); the shapes are read from hcsshim's source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from bulkhead.dataplane.windows.rules import AclRule

ACTIONS = ("Allow", "Block")
DIRECTIONS = ("In", "Out")
RULE_TYPES = ("Switch", "Host")
MAX_RULES = 50_000
MAX_VALUES = 10_000
_PROTOCOL = re.compile(r"^[0-9]{1,3}$")
_PORT = re.compile(r"^[0-9]{1,5}(-[0-9]{1,5})?$")
_ADDRESS = re.compile(r"^[0-9A-Fa-f.:/]{2,49}$")
_FIELDS = ("Protocols", "Action", "Direction", "LocalAddresses", "RemoteAddresses",
           "LocalPorts", "RemotePorts", "RuleType", "Priority")


class HnsJsonError(ValueError):
    """An ACL that cannot be sent to HNS, or HNS JSON that is not an ACL policy list;
    names the rule and the field."""


def _joined(rule: AclRule, what: str, values: Sequence[str], pattern: re.Pattern[str]) -> str:
    if len(values) > MAX_VALUES:
        raise HnsJsonError(f"ACL {rule.id}: {what}: more than {MAX_VALUES} values")
    for v in values:
        if v == "Any" or not pattern.match(v) or (pattern is _PORT and not _port_range(v)):
            raise HnsJsonError(f"ACL {rule.id}: {what}: {v!r} is not a value HNS takes "
                               "(an address, a/len, a port 0-65535 or first-last; never Any)")
    return ",".join(values)


def _port_range(text: str) -> bool:
    first, _, last = text.partition("-")
    return int(first) <= int(last or first) <= 65535


def policy_setting(rule: AclRule) -> dict[str, Any]:
    """One AclPolicySetting, empty fields left out as HCN's omitempty does."""
    if rule.action not in ACTIONS:
        raise HnsJsonError(f"ACL {rule.id}: action: {rule.action!r} is not Allow or Block")
    if rule.direction not in DIRECTIONS:
        raise HnsJsonError(f"ACL {rule.id}: direction: {rule.direction!r} is not In or Out")
    if rule.rule_type not in RULE_TYPES:
        raise HnsJsonError(f"ACL {rule.id}: rule type: {rule.rule_type!r} is not "
                           "Switch or Host")
    if not 1 <= rule.priority <= 65535:
        raise HnsJsonError(f"ACL {rule.id}: priority: {rule.priority} is not 1-65535")
    if rule.protocols and (not _PROTOCOL.match(rule.protocols) or int(rule.protocols) > 255):
        raise HnsJsonError(f"ACL {rule.id}: protocols: {rule.protocols!r} is not one "
                           "protocol number 0-255")
    if (rule.local_ports or rule.remote_ports) and rule.protocols not in ("6", "17"):
        raise HnsJsonError(f"ACL {rule.id}: ports: only with protocol 6 (TCP) or 17 (UDP)")
    setting: dict[str, Any] = {
        "Protocols": rule.protocols,
        "Action": rule.action,
        "Direction": rule.direction,
        "LocalAddresses": _joined(rule, "local addresses", rule.local_addresses, _ADDRESS),
        "RemoteAddresses": _joined(rule, "remote addresses", rule.remote_addresses, _ADDRESS),
        "LocalPorts": _joined(rule, "local ports", rule.local_ports, _PORT),
        "RemotePorts": _joined(rule, "remote ports", rule.remote_ports, _PORT),
        "RuleType": rule.rule_type,
        "Priority": rule.priority,
    }
    # Action and Direction are always sent (hcsshim tags them `json:","`).
    return {k: v for k, v in setting.items() if v or k in ("Action", "Direction")}


def policies(rules: Iterable[AclRule]) -> dict[str, Any]:
    """A PolicyEndpointRequest: the ACLs in priority order (ties in the given order)."""
    listed = list(rules)
    if len(listed) > MAX_RULES:
        raise HnsJsonError(f"{len(listed)} ACLs: more than {MAX_RULES} on one endpoint")
    ordered = sorted(listed, key=lambda r: r.priority)
    return {"Policies": [{"Type": "ACL", "Settings": policy_setting(r)} for r in ordered]}


def endpoint_request(rules: Iterable[AclRule], request_type: str = "Update") -> dict[str, Any]:
    """The ModifyEndpointSettingRequest that sets an endpoint's ACLs (`Update` replaces
    its policies; `Add` and `Remove` also exist)."""
    if request_type not in ("Add", "Update", "Remove"):
        raise HnsJsonError(f"request type {request_type!r}: not Add, Update or Remove")
    return {"ResourceType": "Policy", "RequestType": request_type,
            "Settings": policies(rules)}


def render(rules: Iterable[AclRule], request_type: str = "Update") -> str:
    """`endpoint_request` as JSON text, two-space indented, ending with a newline."""
    return json.dumps(endpoint_request(rules, request_type), indent=2) + "\n"


def _split(setting: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = setting.get(key, "")
    if not isinstance(value, str):
        raise HnsJsonError(f"ACL policy: {key}: expected a string, got {value!r:.80}")
    values = tuple(v.strip() for v in value.split(",") if v.strip())
    if len(values) > MAX_VALUES:
        raise HnsJsonError(f"ACL policy: {key}: more than {MAX_VALUES} values")
    return values


def parse(doc: str | Mapping[str, Any] | Sequence[Any], prefix: str = "acl") -> list[AclRule]:
    """The ACLs of an endpoint's policies as HNS gives them back: a request from
    `endpoint_request`, a PolicyEndpointRequest, or a bare list of policies (an
    endpoint's `Policies`). Policies of other types are skipped. Ids are
    `<prefix>-<n>` by place (HNS keeps none)."""
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError) as e:     # RecursionError: nested too deep
            raise HnsJsonError(f"not JSON: {e}") from None
    if isinstance(doc, Mapping):
        if "Settings" in doc and "Policies" not in doc:
            doc = doc["Settings"]
        if not isinstance(doc, Mapping) or not isinstance(doc.get("Policies", []), list):
            raise HnsJsonError("expected an object with a list Policies")
        doc = doc.get("Policies", [])
    if not isinstance(doc, Sequence) or isinstance(doc, str):
        raise HnsJsonError("expected a list of policies")
    if len(doc) > MAX_RULES:
        raise HnsJsonError(f"more than {MAX_RULES} policies on one endpoint")
    rules: list[AclRule] = []
    for item in doc:
        if not isinstance(item, Mapping) or not isinstance(item.get("Settings", {}), Mapping):
            raise HnsJsonError(f"a policy is not an object with object Settings: {item!r:.120}")
        if item.get("Type") != "ACL":
            continue
        s = item.get("Settings", {})
        unknown = set(s) - set(_FIELDS)
        if unknown:
            raise HnsJsonError(f"ACL policy {len(rules) + 1}: unknown fields {sorted(unknown)}")
        priority = s.get("Priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise HnsJsonError(f"ACL policy {len(rules) + 1}: Priority: not a number")
        protocols = s.get("Protocols", "")
        if not isinstance(protocols, str):
            raise HnsJsonError(f"ACL policy {len(rules) + 1}: Protocols: not a string")
        rules.append(AclRule(
            id=f"{prefix}-{len(rules) + 1}", action=str(s.get("Action", "")),
            direction=str(s.get("Direction", "")), priority=priority, protocols=protocols,
            local_addresses=_split(s, "LocalAddresses"),
            remote_addresses=_split(s, "RemoteAddresses"),
            local_ports=_split(s, "LocalPorts"), remote_ports=_split(s, "RemotePorts"),
            rule_type=str(s.get("RuleType", "Switch"))))
    return rules


def comparable(rule: AclRule) -> AclRule:
    """The rule without its id (which HNS does not keep), for drift comparisons."""
    return replace(rule, id="")


def drift(applied: Iterable[AclRule], found: Iterable[AclRule]) -> list[str]:
    """What differs between the ACLs applied to an endpoint and those found on it (ids
    aside; the order is the priority's): empty when they are the same."""
    want = sorted((comparable(r) for r in applied), key=lambda r: r.priority)
    have = sorted((comparable(r) for r in found), key=lambda r: r.priority)
    out = [f"missing: {r}" for r in want if r not in have]
    out += [f"not applied by the agent: {r}" for r in have if r not in want]
    if not out and want != have:
        out.append("the same ACLs in another number or order of equal priorities")
    return out
