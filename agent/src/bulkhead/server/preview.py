"""Policy impact preview (`POST /v1/preview`): which stored flows a proposed change would
decide differently, grouped by policy and endpoint pair, newly denied and newly allowed
apart, and those the stored fields cannot decide listed as undecided, never guessed.

The proposed state is the store's resources as they are, with the request's manifests
(files not yet applied) put over them, then the staged policies chosen promoted (as
`POST /v1/promote` would); `bulkhead.policy.impact` judges each group of alike records
against it, and the judgement is compared with what the store as it is decides for the
same record now (what the table did, the record's `action`, where that cannot be
decided): a change is what the proposal changes from now. The body is bounded and
checked before the store is asked anything; the work is bounded by MAX_GROUPS record
groups and the store's query time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bulkhead.model import (
    Resource,
    Snapshot,
    ValidationError,
    documents,
    parse_documents,
)
from bulkhead.model.flowlog import PORTED, FlowRecord
from bulkhead.policy.flow import protocol_name
from bulkhead.policy.impact import Impact, Judgement
from bulkhead.selector import Selector, SelectorError, parse
from bulkhead.server.limits import MAX_SELECTOR, BadInput
from bulkhead.store.flowlog import FlowQuery, FlowStore

MAX_BODY = 8 * 1024 * 1024        # manifests as `bulkhead apply` would send them
MAX_HOURS = 24 * 90
DEFAULT_HOURS = 24.0
DEFAULT_LIMIT = 100               # groups listed per kind of change
MAX_LIMIT = 1_000
MAX_GROUPS = 100_000              # groups of alike records judged; more: `truncated`
MAX_PORTS = 32                    # ports listed in one group
MAX_NODES = 8                     # reporting nodes listed in one group
MAX_DOMAINS = 16                  # destination domain names listed in one group
MAX_NAMES = 1_000                 # staged policies named in `promote`
JUDGE_SECONDS = 20.0              # judging stops there: what is left is `truncated`
FIELDS = ("manifests", "promote", "enforce", "hours", "until", "protected", "limit")
CHANGES = ("newlyDenied", "newlyAllowed", "undecided")


@dataclass(frozen=True)
class PreviewRequest:
    manifests: str | None = None
    promote: tuple[str, ...] | str | None = None   # names, "all", "none"; None: default
    hours: float = DEFAULT_HOURS
    until: float | None = None
    protected: Selector | None = None
    limit: int = DEFAULT_LIMIT
    enforce: Selector | None = None     # host endpoints previewed in enforce mode


def parse_preview(body: Any) -> PreviewRequest:
    """The body, checked: BadInput naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadInput('the body: expected a JSON object such as {"hours": 24}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadInput(f"the body: unknown field {unknown[0][:64]!r} ({', '.join(FIELDS)})")
    manifests = body.get("manifests")
    if manifests is not None and not isinstance(manifests, str):
        raise BadInput("manifests: expected YAML or JSON text (the files' content)")
    promote = body.get("promote")
    if isinstance(promote, list):
        if not promote or len(promote) > MAX_NAMES or \
                not all(isinstance(n, str) and 0 < len(n) <= 253 and n.isprintable()
                        for n in promote):
            raise BadInput(f"promote: expected 1 to {MAX_NAMES} StagedGlobalNetworkPolicy "
                           'names, "all" or "none"')
        promote = tuple(dict.fromkeys(promote))
    elif promote not in (None, "all", "none"):
        raise BadInput('promote: expected a list of StagedGlobalNetworkPolicy names, "all" '
                       'or "none"')
    hours = _number(body.get("hours", DEFAULT_HOURS), "hours", 1 / 60, MAX_HOURS)
    until = body.get("until")
    if until is not None:
        until = _number(until, "until", 0, 10_000_000_000)
    limit = body.get("limit", DEFAULT_LIMIT)
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise BadInput(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
    return PreviewRequest(manifests, promote, hours, until, _selector(body, "protected"),
                          limit, _selector(body, "enforce"))


def _selector(body: dict[str, Any], name: str) -> Selector | None:
    raw = body.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > MAX_SELECTOR:
        raise BadInput(f"{name}: expected a selector of at most {MAX_SELECTOR} characters")
    try:
        return parse(raw)
    except SelectorError as e:
        raise BadInput(f"{name}: {e}") from None


def _number(value: Any, name: str, low: float, high: float) -> float:
    # Compared as given (an integer of 400 digits is no float), NaN fails both bounds.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not low <= value <= high:
        raise BadInput(f"{name}: expected a number from {low:g} to {high:g}")
    return float(value)


def load_manifests(text: str) -> list[Resource]:
    """The manifests' resources (YAML or JSON documents, Lists flattened), validated:
    LoadError or ValidationError naming the resource and field otherwise."""
    resources = parse_documents(documents(text, "manifests"), "manifests")
    seen: set[tuple[str, str]] = set()
    for r in resources:
        if r.key in seen:
            raise ValidationError(r.kind, r.name, "metadata.name", "is defined twice in the "
                                  "manifests")
        seen.add(r.key)
    return resources


# ------------------------------------------------------------------------- the answer
@dataclass
class _Group:
    change: str
    direction: str
    tier: str
    policy: str
    src: Mapping[str, Any]
    dst: Mapping[str, Any]
    steps: set[str] = field(default_factory=set)
    why: set[str] = field(default_factory=set)
    ports: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)   # the destination's names, if given
    records: int = 0
    connections: int = 0
    protected: bool = False

    def json(self) -> dict[str, Any]:
        out = {"direction": self.direction, "tier": self.tier, "policy": self.policy,
               "src": dict(self.src), "dst": dict(self.dst), "ports": _few(self.ports,
                                                                             MAX_PORTS),
               "nodes": _few(self.nodes, MAX_NODES), "records": self.records,
               "connections": self.connections, "steps": sorted(self.steps)}
        if self.why:
            out["why"] = sorted(self.why)
        if self.domains:
            out["domains"] = _few(self.domains, MAX_DOMAINS)
        return out


def _few(values: set[str], most: int) -> list[str]:
    return sorted(values)[:most]


def _end(record: FlowRecord, side: str) -> dict[str, Any]:
    end = record.src if side == "src" else record.dst
    out: dict[str, Any] = {"type": end.type, "name": end.name, "labels": dict(end.labels)}
    if end.scope:
        out["scope"] = end.scope
    return out


def _port(record: FlowRecord) -> str:
    name = protocol_name(record.proto)
    return f"{name}/{record.dst_port}" if record.proto in PORTED else name


def _decider(judgement: Judgement) -> tuple[str, str]:
    """The tier and policy the judgement's steps name, when they name one."""
    named = {tuple(s.split("|")[:2]) for s in judgement.steps}
    if len(named) == 1:
        tier, policy = next(iter(named))
        return tier, policy
    return "", ""


def preview(store: FlowStore, proposed: Snapshot, request: PreviewRequest, now: float,
            promoted_names: Sequence[str], current: Snapshot | None = None
            ) -> dict[str, Any]:
    """The answer of `POST /v1/preview`: the store's groups of the window judged against
    `proposed` (`current`: the store as it is, so ends the proposal moves are unknown),
    for at most JUDGE_SECONDS. Each is compared with what `current` decides for it now
    (the record's own action where that cannot be decided, or without `current`): a
    record made before an enforce or a promote is compared with the policies and modes
    in force now, not with what the table did then, so what is already enforced never
    shows as a change."""
    until = request.until if request.until is not None else now
    since = max(0.0, until - request.hours * 3600)
    page = store.groups(FlowQuery(since=since, until=until), MAX_GROUPS)
    judge = Impact(proposed, current)
    now_judge = Impact(current, current) if current is not None else None
    deadline = time.monotonic() + JUDGE_SECONDS
    stopped = None
    groups: dict[tuple[Any, ...], _Group] = {}
    totals = {c: {"records": 0, "connections": 0} for c in (*CHANGES, "unchanged")}
    examined = {"records": 0, "connections": 0, "groups": 0}
    protected = {"records": 0, "connections": 0}
    for n, row in enumerate(page.groups):
        if n % 100 == 0 and time.monotonic() > deadline:
            stopped = (f"judging stopped after {JUDGE_SECONDS:g} s, {n} of "
                       f"{len(page.groups)} groups judged; narrow the window (hours)")
            break
        r = row.record
        examined["groups"] += 1
        examined["records"] += row.records
        examined["connections"] += r.connections
        j = judge.judge(r)
        before = r.action
        # Every decided group is judged against the state now too: a record of an older
        # state whose decision the proposal brings back (a deny undone since, proposed
        # again) is a change from now, and the gates count it.
        if now_judge is not None and j.action is not None:
            before = now_judge.judge(r).action or r.action
        if j.action is None:
            change = "undecided"
        elif j.action == before:
            change = "unchanged"
        else:
            change = "newlyDenied" if j.action == "deny" else "newlyAllowed"
        totals[change]["records"] += row.records
        totals[change]["connections"] += r.connections
        if change == "unchanged":
            continue
        tier, policy = _decider(j)
        direction = "Ingress" if r.reporter == "dst" else "Egress"
        key = (change, direction, tier, policy, r.src.type, r.src.name, r.dst.type,
               r.dst.name)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(change, direction, tier, policy, _end(r, "src"),
                                     _end(r, "dst"))
        g.steps.update(j.steps)
        g.why.update(j.why)
        g.ports.add(_port(r))
        g.nodes.update(row.nodes)
        if len(g.domains) < 4 * MAX_DOMAINS:     # memory bounded; the first listed
            g.domains.update(r.dst_domains or ())
        g.records += row.records
        g.connections += r.connections
        if change == "newlyDenied" and request.protected is not None and (
                request.protected.matches(judge.labels_of(r.src)) or
                request.protected.matches(judge.labels_of(r.dst))):
            g.protected = True
            protected["records"] += row.records
            protected["connections"] += r.connections
    answer: dict[str, Any] = {
        "since": since, "until": until, "promoted": list(promoted_names),
        "enforce": None if request.enforce is None else str(request.enforce),
        "examined": examined, "truncated": page.truncated or stopped is not None,
        "totals": totals}
    if stopped is not None:
        answer["stopped"] = stopped
    for change in CHANGES:
        found = sorted((g for g in groups.values() if g.change == change),
                       key=lambda g: (-g.connections, -g.records, g.tier, g.policy,
                                      g.src["name"], g.dst["name"]))
        answer[change] = [g.json() for g in found[:request.limit]]
        answer[f"{change}Groups"] = len(found)
    if request.protected is not None:
        hit = [g for g in groups.values() if g.protected]
        hit.sort(key=lambda g: (-g.connections, g.src["name"], g.dst["name"]))
        answer["protected"] = {"selector": str(request.protected), **protected,
                               "groups": [g.json() for g in hit[:request.limit]]}
    return answer


__all__ = ["MAX_BODY", "PreviewRequest", "load_manifests", "parse_preview", "preview"]
