"""The HNS enforcer: calculate the node's plan, compile each host endpoint's policy into
HNS ACLs, and set them on the HNS endpoints the host endpoint names, through the Host
Compute Network API (`bulkhead.agent.hcn`: computenetwork.dll; tests give a fake).

Which HNS endpoints a HostEndpoint covers (docs/windows.md, "HNS endpoints"):
- without `interfaceName`: every HNS endpoint of the host with one of its expectedIPs
  (the plan is calculated with the HNS endpoints' ids as interface names and their
  IpConfigurations as addresses, so the Linux rule applies unchanged);
- `interfaceName: NAME`: the HNS endpoints whose HCN `Name` is NAME (HNS endpoints have
  no interface; the name is whatever made the endpoint gave it; an id, 36 characters, is
  longer than an interfaceName may be);
- `interfaceName: "*"`: every HNS endpoint of the host that no other HostEndpoint names.
An HNS endpoint named by two HostEndpoints stays with the first by name (a warning), as
an interface does on Linux; named ones are assigned before `*` takes the rest.

Each endpoint gets its ACLs in one HcnModifyEndpoint call (a Policy `Update` request,
hns_json.endpoint_request): within an endpoint there is no mix of old and new rules.
Across endpoints the apply is not atomic: endpoints are changed one at a time in the
order of their ids; if one modify fails, the endpoints already changed get back the ACL
policies they had (as HCN gave them), so an EnforceError leaves the previous ACLs on
every endpoint, unless the restore fails too, which the error says, naming them.
Endpoints this process set and no host endpoint names any more get their ACLs removed
(an endpoint without ACLs allows everything, as an interface without a HostEndpoint does
on Linux). The ids of the endpoints set are kept in the state directory
(`hns-endpoints.json`, written atomically after every apply that changes them), so an
agent started again also releases an endpoint whose HostEndpoint went while it was
stopped; a file it cannot read is reported as a warning and taken as empty.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.agent.enforcer import EnforceError, EnforceReport
from bulkhead.agent.files import write_atomically
from bulkhead.agent.hcn import Hcn, HcnError, HnsEndpoint, acl_policies
from bulkhead.dataplane.windows import hns, hns_json
from bulkhead.dataplane.windows.flat import Unsupported
from bulkhead.dataplane.windows.flatten import flatten
from bulkhead.dataplane.windows.hns_json import HnsJsonError
from bulkhead.dataplane.windows.rules import AclRule
from bulkhead.model import EGRESS, ENFORCE, INGRESS, Snapshot
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import EndpointPlan, NodePlan, calculate

Compile = Callable[[NodePlan, EndpointPlan], list[AclRule]]
STATE_FILE = "hns-endpoints.json"
STATE_FORMAT = 1
MOST_STATE_BYTES = 4 << 20     # a million endpoint ids would not reach it
MOST_ID = 128                  # an HCN id is a GUID, 36 characters


def load_set_endpoints(state_dir: str | Path) -> tuple[set[str], str | None]:
    """The endpoint ids an earlier agent on this node set ACLs on, and a warning when
    the file is there but cannot be used (it is then taken as empty)."""
    path = Path(state_dir) / STATE_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MOST_STATE_BYTES + 1)
    except FileNotFoundError:
        return set(), None
    except OSError as e:
        return set(), f"{path}: not read ({e.strerror or e}); endpoints set before a " \
            "restart and no longer named keep their ACLs"
    try:
        if len(raw) > MOST_STATE_BYTES:
            raise ValueError(f"larger than {MOST_STATE_BYTES} bytes")
        data = json.loads(raw)
        ids = data.get("endpoints") if isinstance(data, dict) else None
        if data.get("format") != STATE_FORMAT or not isinstance(ids, list) or not all(
                isinstance(i, str) and 0 < len(i) <= MOST_ID and i.isprintable()
                for i in ids):
            raise ValueError("not a list of endpoint ids in format 1")
    except (ValueError, AttributeError) as e:
        return set(), f"{path}: not used ({e}); endpoints set before a restart and no " \
            "longer named keep their ACLs"
    return set(ids), None


def save_set_endpoints(state_dir: str | Path, ids: Iterable[str]) -> None:
    """Keep the ids of the endpoints holding this agent's ACLs; raises OSError."""
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / STATE_FILE, json.dumps(
        {"format": STATE_FORMAT, "endpoints": sorted(ids)}).encode())


def compile_endpoint(plan: NodePlan, endpoint: EndpointPlan) -> list[AclRule]:
    """One host endpoint's ACLs, both directions (no neighbour-discovery head: HNS
    matches no ICMP type). Raises Unsupported."""
    rules: list[AclRule] = []
    for direction in (INGRESS, EGRESS):
        flat = flatten(plan, endpoint, direction, neighbour_discovery=False)
        rules += hns.compile(flat, direction, endpoint.name)
    return rules


@dataclass(frozen=True)
class Wanted:
    """An HNS endpoint's ACLs, and the HostEndpoint they are for."""
    host_endpoint: str
    rules: tuple[AclRule, ...]

    def request(self) -> str:
        return hns_json.render(self.rules)


def _restore_request(policies: list[dict[str, Any]]) -> str:
    return json.dumps({"ResourceType": "Policy", "RequestType": "Update",
                       "Settings": {"Policies": policies}})


def assign(plan: NodePlan, endpoints: Iterable[HnsEndpoint]) -> tuple[dict[str, str],
                                                                      list[str]]:
    """HNS endpoint id -> the host endpoint it is assigned to, and warnings (see the
    module). The plan's interfaces are ids (found by expectedIPs), names or `*`."""
    found = list(endpoints)
    ids = {e.id for e in found}
    out: dict[str, str] = {}
    warnings: list[str] = []

    def take(ep: EndpointPlan, candidates: list[str]) -> None:
        for i in candidates:
            if i in out:
                if out[i] != ep.name:
                    warnings.append(f"HostEndpoint {ep.name}: HNS endpoint {i} already "
                                    f"belongs to HostEndpoint {out[i]}; left to it")
            else:
                out[i] = ep.name

    for ep in plan.endpoints:
        if "*" in ep.interfaces:
            continue
        candidates: list[str] = []
        for name in ep.interfaces:
            named = sorted(e.id for e in found if e.name == name)
            if not named and name not in ids:
                warnings.append(f"HostEndpoint {ep.name}: no HNS endpoint of this host "
                                f"is named {name!r}; not enforced there")
            candidates += [name] if name in ids else []
            candidates += named
        take(ep, candidates)
    for ep in plan.endpoints:
        if "*" in ep.interfaces:
            take(ep, [i for i in sorted(ids) if i not in out])
    return out, warnings


class HnsEnforcer:
    def __init__(self, node: str, failsafes: Failsafes, hcn: Hcn | None = None,
                 compile: Compile | None = None, default_mode: str = ENFORCE,
                 state_dir: str | Path | None = None) -> None:
        self.node = node
        self.failsafes = failsafes
        self._hcn = hcn
        self.compile: Compile = compile or compile_endpoint
        self.default_mode = default_mode
        self.revision = 0
        self.snapshot: Snapshot | None = None             # the last one applied
        self.applied: dict[str, Wanted] = {}              # id -> what was set on it
        self.warnings: list[str] = []
        self.notes: list[str] = []                # the last plan's, logged only
        # Where the ids of the endpoints set are kept (None: nowhere); those an earlier
        # agent set, until an apply has released or taken them.
        self.state_dir = state_dir
        self.earlier: set[str] = set()
        self._read_warning: str | None = None    # reported once, by the next apply
        self._write_warning: str | None = None   # until a write succeeds
        if state_dir is not None:
            self.earlier, self._read_warning = load_set_endpoints(state_dir)
        self._saved: set[str] | None = set(self.earlier) if state_dir is not None else None

    @property
    def hcn(self) -> Hcn:
        if self._hcn is None:
            from bulkhead.agent.hcn import ComputeNetwork
            try:
                self._hcn = ComputeNetwork()
            except HcnError as e:
                raise EnforceError(f"dataplane hns: {e}") from None
        return self._hcn

    # ---------------------------------------------------------------- the stages
    def wanted(self, snapshot: Snapshot) -> dict[str, Wanted]:
        """HNS endpoint id -> its ACLs for `snapshot`. Raises EnforceError naming the
        policy, rule and field HNS cannot express; then nothing is applied."""
        return self._wanted(snapshot)[0]

    def _wanted(self, snapshot: Snapshot) -> tuple[dict[str, Wanted], set[str]]:
        """`wanted`, and the ids of every HNS endpoint of the host."""
        try:
            endpoints = self.hcn.endpoints()
        except HcnError as e:
            raise EnforceError(f"listing the HNS endpoints: {e}") from None
        plan = calculate(snapshot, self.node, {e.id: list(e.addresses) for e in endpoints},
                         self.failsafes, default_mode=self.default_mode)
        owners, warnings = assign(plan, endpoints)
        self.warnings = list(plan.warnings) + warnings
        self.notes = list(plan.notes)
        by_name: dict[str, tuple[AclRule, ...]] = {}
        out: dict[str, Wanted] = {}
        for ep in plan.endpoints:
            if ep.name not in owners.values():
                continue
            try:
                rules = tuple(self.compile(plan, ep))
                hns_json.render(rules)
            except Unsupported as e:
                raise EnforceError(f"HostEndpoint {ep.name}: not enforceable by HNS "
                                   f"ACLs: {e}") from None
            except HnsJsonError as e:
                raise EnforceError(f"HostEndpoint {ep.name}: cannot write the ACLs as "
                                   f"HNS JSON: {e}") from None
            by_name[ep.name] = rules
        for i, name in sorted(owners.items()):
            out[i] = Wanted(name, by_name[name])
        return out, {e.id for e in endpoints}

    def _found(self, endpoint: str) -> tuple[list[dict[str, Any]], list[AclRule]]:
        """The endpoint's ACL policies as HCN holds them, raw and parsed."""
        raw = acl_policies(self.hcn.query(endpoint))
        try:
            return raw, hns_json.parse(raw)
        except HnsJsonError as e:
            raise HcnError(f"endpoint {endpoint}: its ACLs: {e}") from None

    def _apply(self, snapshot: Snapshot, revision: int) -> EnforceReport:
        start = time.perf_counter()
        wanted, existing = self._wanted(snapshot)
        # id -> the request to send; released: endpoints no host endpoint names now
        requests: dict[str, str] = {}
        previous: dict[str, list[dict[str, Any]]] = {}
        try:
            for i, want in wanted.items():
                raw, rules = self._found(i)
                if hns_json.drift(want.rules, rules):
                    requests[i], previous[i] = want.request(), raw
            for i in sorted((set(self.applied) | self.earlier) - set(wanted)):
                if i in existing:
                    raw, _ = self._found(i)
                    requests[i] = _restore_request([])
                    previous[i] = raw
        except HcnError as e:
            raise EnforceError(f"reading the HNS endpoints' ACLs: {e}") from None
        done: list[str] = []
        for i in sorted(requests):
            try:
                self.hcn.modify(i, requests[i])
            except HcnError as e:
                raise EnforceError(self._roll_back(done, previous, revision, i, e)) from None
            done.append(i)
        self.snapshot, self.revision, self.applied = snapshot, revision, wanted
        self.earlier = set()
        self._keep_set_endpoints()
        return self._report(revision, bool(done), start)

    def _keep_set_endpoints(self) -> None:
        """Write the ids of the endpoints set when they changed; a warning if the disk
        refuses (the next apply tries again)."""
        if self.state_dir is None or set(self.applied) == self._saved:
            return
        try:
            save_set_endpoints(self.state_dir, self.applied)
        except OSError as e:
            self._write_warning = f"{Path(self.state_dir) / STATE_FILE}: not written " \
                f"({e.strerror or e}); after a restart, endpoints no longer named may keep " \
                "their ACLs"
            return
        self._saved = set(self.applied)
        self._write_warning = None

    def _roll_back(self, done: list[str], previous: Mapping[str, list[dict[str, Any]]],
                   revision: int, failed: str, error: HcnError) -> str:
        """Put back the ACLs of the endpoints changed before `failed`; the message."""
        message = f"setting the HNS ACLs of endpoint {failed} for revision {revision} " \
                  f"failed: {error}"
        left: list[str] = []
        for i in reversed(done):
            try:
                self.hcn.modify(i, _restore_request(previous[i]))
            except HcnError as e:
                left.append(f"{i} ({e})")
        if left:
            return message + "; restoring the endpoints already changed failed for " + \
                ", ".join(left) + ": they hold the new ACLs, the others the previous ones"
        return message + (f"; the {len(done)} endpoint(s) already changed got their "
                          "previous ACLs back" if done else "; nothing was changed")

    def _report(self, revision: int, changed: bool, start: float) -> EnforceReport:
        rules = [r for w in self.applied.values() for r in w.rules]
        state = [w for w in (self._read_warning, self._write_warning) if w]
        self._read_warning = None
        blocks = sum(r.action == "Block" for r in rules)
        return EnforceReport(revision, changed, changed, time.perf_counter() - start,
                             {"endpoints": len(self.applied), "rules": len(rules),
                              "allow": len(rules) - blocks, "block": blocks},
                             list(self.warnings) + self.notes + state, scratch=True,
                             unenforced=list(self.warnings))

    # ---------------------------------------------------------------- the protocol
    def enforce(self, snapshot: Snapshot, revision: int,
                changed: Iterable[tuple[str, str]] | None = None) -> EnforceReport:
        """Set the HNS endpoints' ACLs for `snapshot`; `changed` is not used (each
        endpoint's ACLs are compiled whole)."""
        return self._apply(snapshot, revision)

    def drift(self) -> str | None:
        """None while every HNS endpoint holds what the last snapshot gives it now
        (endpoints come and go: they are found again); else what differs (the first
        few)."""
        if self.snapshot is None:
            return None
        wanted = self.wanted(self.snapshot)
        problems = [f"HNS endpoint {i} (HostEndpoint {self.applied[i].host_endpoint}) "
                    "is gone" for i in sorted(set(self.applied) - set(wanted))]
        problems += [f"HNS endpoint {i} (HostEndpoint {w.host_endpoint}) is new"
                     for i, w in sorted(wanted.items()) if i not in self.applied]
        for i, want in sorted(wanted.items()):
            try:
                _, found = self._found(i)
            except HcnError as e:
                problems.append(f"HNS endpoint {i}: {e}")
                continue
            problems += [f"HNS endpoint {i}: {p}" for p in hns_json.drift(want.rules, found)[:5]]
        return "; ".join(problems[:10]) or None

    def repair(self) -> EnforceReport:
        """Apply the last snapshot again (to the endpoints there are now)."""
        if self.snapshot is None:
            return EnforceReport(self.revision, False, False, 0.0, {}, [])
        return self._apply(self.snapshot, self.revision)

    def release(self) -> tuple[list[str], list[str]]:
        """Remove the agent's ACL policies from every HNS endpoint it set (the state
        file's, and this process's) that still has ACLs, and forget them: what an
        uninstall does, since a stopped agent keeps its ACLs (fail static). Endpoints
        gone are forgotten; ACLs on endpoints the agent never set are not touched. The
        ACLs released (`ACLs of HNS endpoint ID`) and warnings (none so far). Raises
        EnforceError when the state file cannot be used (nothing removed, the file
        kept: it alone says which endpoints are the agent's), and naming the endpoint a
        removal failed on; the state file then still lists it and those after it, so a
        second run finishes."""
        if self._read_warning is not None:
            raise EnforceError(f"cannot tell which HNS endpoints hold the agent's ACLs: "
                               f"{self._read_warning}; nothing was removed (repair or "
                               "remove the file, then run it again)")
        warnings: list[str] = []
        ours = sorted(set(self.applied) | self.earlier)
        try:
            existing = {e.id for e in self.hcn.endpoints()}
        except HcnError as e:
            raise EnforceError(f"listing the HNS endpoints: {e}") from None
        released: list[str] = []
        todo = [i for i in ours if i in existing]
        for n, i in enumerate(todo):
            try:
                if acl_policies(self.hcn.query(i)):
                    self.hcn.modify(i, _restore_request([]))
                    released.append(f"ACLs of HNS endpoint {i}")
            except HcnError as e:
                left = todo[n:]
                self.applied, self.earlier = {}, set(left)
                self._forget(left)
                raise EnforceError(f"removing the ACLs of HNS endpoint {i}: {e}; "
                                   f"released {len(released)} endpoint(s) before it, "
                                   f"{len(left)} left") from None
        self.applied, self.earlier, self.snapshot = {}, set(), None
        self._forget([])
        return released, warnings

    def _forget(self, left: list[str]) -> None:
        """The state file lists `left` only (removed when empty); no-op without one."""
        if self.state_dir is None:
            return
        path = Path(self.state_dir) / STATE_FILE
        try:
            if left:
                save_set_endpoints(self.state_dir, left)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            raise EnforceError(f"{path}: not written ({e.strerror or e})") from None
        self._saved = set(left)

    def dry_run(self, snapshot: Snapshot) -> tuple[str, str]:
        """Each endpoint's request (JSON), and a diff of the ACLs from what HCN holds to
        what the apply would set."""
        wanted = self.wanted(snapshot)
        text: list[str] = []
        diff: list[str] = []
        for i, want in sorted(wanted.items()):
            text.append(f"# HNS endpoint {i} (HostEndpoint {want.host_endpoint})\n"
                        + want.request())
            try:
                _, found = self._found(i)
            except HcnError as e:
                raise EnforceError(f"reading the HNS endpoints' ACLs: {e}") from None
            old = [repr(hns_json.comparable(r)) + "\n" for r in found]
            new = [repr(hns_json.comparable(r)) + "\n"     # in the order sent
                   for r in sorted(want.rules, key=lambda r: r.priority)]
            diff += difflib.unified_diff(old, new, f"endpoint {i} (now)",
                                         f"endpoint {i} (HostEndpoint {want.host_endpoint})")
        return "".join(text), "".join(diff)
