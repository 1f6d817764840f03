"""Flow log records: what an agent reports about the traffic its host's table decided, as
agents send them and as the server stores and answers them.

One record aggregates the connections of one flush interval that share a key: the
reporter (`src`: the host the flow left, egress policy; `dst`: the host it reached,
ingress policy), both ends (a host endpoint, else the GlobalNetworkSet holding the
address, else the address itself), protocol, destination port and the enforced action.
It carries the enforced trace the kernel logged and the staged trace the reference
evaluator computed, each a list of `tier|policy|rule|action` steps (see `step()`).

A record from the outside is hostile until checked: `parse_record` refuses anything that
is not exactly this shape, naming the field, and every size is bounded.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bulkhead.model.reader import show

REPORTERS = ("src", "dst")
# Protocols whose packets carry ports (TCP, UDP, SCTP, UDP-Lite); a record of any other
# has dst_port 0.
PORTED = frozenset({6, 17, 132, 136})
ACTIONS = ("allow", "deny")
STEP_ACTIONS = ("allow", "deny", "pass")
END_TYPES = ("hep", "ns", "net")      # host endpoint, GlobalNetworkSet, an address
SCOPES = ("private", "public", "")    # for `net` ends; "" for the others

MAX_BATCH = 5_000          # records in one ingest request
# Bytes of one ingest request's body: 5,000 records of 3 KiB each on average. A record at
# every bound (64 labels a side, 32 long steps a trace) is far bigger: such a batch is
# sent in smaller requests (`bulkhead.client.flows.send_flows` splits by both bounds).
MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_TEXT = 253             # a name, a node
MAX_LABELS = 64            # labels per end
MAX_LABEL_KEY = 317        # prefix (253) + "/" + name (63)
MAX_LABEL_VALUE = 63
MAX_TRACE = 32             # steps per trace
MAX_STEP = 600
MAX_COUNT = 2**63 - 1
MAX_NAME = 253             # a DNS name, without the final dot
# Domain names a record gives its destination address: the first ones by name when the
# agent's name cache holds more (a list this long may be cut short).
MAX_DOMAINS = 16
HOSTNAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")
# Records may come from a host whose clock is a little ahead; not from next year.
MAX_FUTURE_SECONDS = 3600.0

# Names used in a step where no policy or rule decided.
END_OF_TIER = "end-of-tier"   # tier|end-of-tier|-|deny  (the tier's defaultAction)
PROFILE = "profile"           # profile|NAME|RULE|allow
NO_PROFILE = "no-profile"     # endpoint|no-profile|-|deny (nothing allowed the flow)
FAILSAFE = "failsafe"         # failsafe|failsafe|-|allow
# The last step of every trace an endpoint in observe mode reports: the steps before it
# are what the policies decided (a Deny too), and the packet went through.
OBSERVE_STEP = "endpoint|observe|-|allow"


class FlowRecordError(ValueError):
    """A record (or a batch) is not acceptable; the message names the field."""


class ForeignNode(FlowRecordError):
    """A record names a node other than the one the sender may report for."""


class TooManyRecords(FlowRecordError):
    """A batch holds more than MAX_BATCH records."""


def step(tier: str, policy: str, rule: int | None, action: str) -> str:
    """One trace step: `tier|policy|rule|action`, `-` for no rule, action lower case."""
    return f"{tier}|{policy}|{'-' if rule is None else rule}|{action.lower()}"


def scope_of(address: str) -> str:
    """`private` or `public`, as Calico's flow logs name an address that is no endpoint
    and in no network set."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    return "private" if ip.is_private else "public"


@dataclass(frozen=True)
class End:
    type: str                                  # hep | ns | net
    name: str                                  # endpoint or set name, or the address
    labels: Mapping[str, str] = field(default_factory=dict)
    scope: str = ""                            # net only: private | public

    def json(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_type": self.type, f"{prefix}_name": self.name,
                f"{prefix}_labels": dict(sorted(self.labels.items())),
                f"{prefix}_scope": self.scope}


@dataclass(frozen=True)
class FlowRecord:
    start: float               # unix seconds, the interval's first connection
    end: float                 # unix seconds, the interval's end
    node: str                  # the reporting node (the agent's certificate name)
    reporter: str              # src | dst
    src: End
    dst: End
    proto: int                 # IP protocol number
    dst_port: int              # 0 where the protocol has no ports
    action: str                # allow | deny (enforced)
    enforced_trace: tuple[str, ...]
    staged_action: str         # allow | deny (with the staged policies in force)
    staged_trace: tuple[str, ...]
    connections: int = 0       # connections active in the interval
    started: int = 0           # of them, started in the interval
    packets_in: int = 0        # towards the reporting host
    packets_out: int = 0       # from the reporting host
    bytes_in: int = 0
    bytes_out: int = 0
    # The names the destination address was resolved from, as the reporting agent's DNS
    # name cache had them when the connection began (egress records of agents that snoop
    # DNS); None: not known (an ingress record, an agent that does not snoop, or one from
    # before the field). Sorted; at most MAX_DOMAINS.
    dst_domains: tuple[str, ...] | None = None

    @property
    def staged_differs(self) -> bool:
        return self.action != self.staged_action

    def json(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "node": self.node,
            "reporter": self.reporter, **self.src.json("src"), **self.dst.json("dst"),
            "proto": self.proto, "dst_port": self.dst_port, "action": self.action,
            "enforced_trace": list(self.enforced_trace), "staged_action": self.staged_action,
            "staged_trace": list(self.staged_trace), "connections": self.connections,
            "started": self.started, "packets_in": self.packets_in,
            "packets_out": self.packets_out, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dst_domains": None if self.dst_domains is None else list(self.dst_domains),
        }

    def wire(self) -> dict[str, Any]:
        """The JSON form an agent sends: `dst_domains` left out when not known, so a
        server from before the field takes the record."""
        doc = self.json()
        if self.dst_domains is None:
            del doc["dst_domains"]
        return doc


FIELDS = tuple(FlowRecord(0, 0, "", "src", End("net", ""), End("net", ""), 0, 0, "allow",
                          (), "allow", ()).json())
# Fields a record may leave out (agents from before them): the default stands.
OPTIONAL = ("dst_domains",)


# ------------------------------------------------------------------------- parsing
def _text(doc: Mapping[str, Any], key: str, *, allowed: Sequence[str] | None = None,
          empty: bool = False, limit: int = MAX_TEXT) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise FlowRecordError(f"{key}: expected a string, got {_kind(value)}")
    if allowed is not None and value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise FlowRecordError(f"{key}: {value[:40]!r} is not one of {choices}")
    if not value and not empty:
        raise FlowRecordError(f"{key}: must not be empty")
    if len(value) > limit:
        raise FlowRecordError(f"{key}: longer than {limit} characters")
    if not value.isprintable():
        raise FlowRecordError(f"{key}: contains control characters")
    return value


def _int(doc: Mapping[str, Any], key: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlowRecordError(f"{key}: expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise FlowRecordError(f"{key}: {show(value)} is outside {lo}..{hi}")
    return value


def _time(doc: Mapping[str, Any], key: str, now: float) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FlowRecordError(f"{key}: expected unix seconds, got {_kind(value)}")
    try:
        seconds = float(value)
    except OverflowError:   # an integer beyond a float's range
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise FlowRecordError(f"{key}: {show(value)} is not a time")
    if seconds > now + MAX_FUTURE_SECONDS:
        raise FlowRecordError(f"{key}: {show(value)} is more than an hour in the future")
    # Kept to the microsecond, as every store keeps it (ClickHouse's DateTime64(6)).
    return round(seconds, 6)


def _labels(doc: Mapping[str, Any], key: str) -> dict[str, str]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise FlowRecordError(f"{key}: expected a mapping of label names to values, "
                              f"got {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise FlowRecordError(f"{key}: more than {MAX_LABELS} labels")
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > MAX_LABEL_KEY or not k.isprintable():
            raise FlowRecordError(f"{key}: {str(k)[:40]!r} is not a label name")
        if not isinstance(v, str) or len(v) > MAX_LABEL_VALUE or not v.isprintable():
            raise FlowRecordError(f"{key}.{k[:40]}: expected a label value (a string of at "
                                  f"most {MAX_LABEL_VALUE} characters)")
    return dict(value)


def dns_name(doc: Mapping[str, Any], key: str, empty: bool = True) -> str:
    """A DNS name as records carry it: lowercase, without the final dot, no spaces."""
    name = _text(doc, key, empty=empty, limit=MAX_NAME)
    if name != name.lower() or name.endswith(".") or " " in name:
        raise FlowRecordError(f"{key}: {name[:60]!r} is not a lowercase name without the "
                              "final dot")
    return name


def is_hostname(name: str) -> bool:
    """A name a flow record may give its destination: lowercase labels of letters,
    digits, `-` and `_`, dot-separated, without the final dot, at most MAX_NAME long."""
    return len(name) <= MAX_NAME and HOSTNAME.fullmatch(name) is not None


def _domains(doc: Mapping[str, Any], key: str, reporter: str) -> tuple[str, ...] | None:
    value = doc.get(key)
    if value is None:
        return None
    if reporter != "src":
        raise FlowRecordError(f"{key}: only an egress record (reporter src) gives its "
                              "destination's names; null here")
    if not isinstance(value, list):
        raise FlowRecordError(f"{key}: expected a list of domain names or null, got "
                              f"{_kind(value)}")
    if len(value) > MAX_DOMAINS:
        raise FlowRecordError(f"{key}: more than {MAX_DOMAINS} names")
    names = set()
    for i, item in enumerate(value):
        at = f"{key}[{i}]"
        name = dns_name({at: item}, at, empty=False)
        if not is_hostname(name):
            raise FlowRecordError(f"{at}: {name[:60]!r} is not a domain name (lowercase "
                                  "letters, digits, - and _ in dot-separated labels)")
        names.add(name)
    return tuple(sorted(names))


def _trace(doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise FlowRecordError(f"{key}: expected a list of tier|policy|rule|action steps, "
                              f"got {_kind(value)}")
    if len(value) > MAX_TRACE:
        raise FlowRecordError(f"{key}: more than {MAX_TRACE} steps")
    for i, item in enumerate(value):
        if not isinstance(item, str) or len(item) > MAX_STEP or not item.isprintable():
            raise FlowRecordError(f"{key}[{i}]: expected a tier|policy|rule|action string")
        parts = item.split("|")
        if len(parts) != 4 or not all(parts) or parts[3] not in STEP_ACTIONS \
                or not (parts[2] == "-" or parts[2].isdigit()):
            raise FlowRecordError(f"{key}[{i}]: {item[:80]!r} is not tier|policy|rule|action "
                                  f"(rule a number or -, action allow, deny or pass)")
    return tuple(value)


def _end(doc: Mapping[str, Any], prefix: str) -> End:
    kind = _text(doc, f"{prefix}_type", allowed=END_TYPES)
    name = _text(doc, f"{prefix}_name")
    scope = _text(doc, f"{prefix}_scope", allowed=SCOPES, empty=True)
    if kind == "net":
        try:
            # Kept in canonical form, which queries by address look for. An IPv4 text
            # ipaddress takes is its canonical form already (four decimal octets, no
            # leading zeros): only IPv6 is written again (2001:DB8:0::1 is 2001:db8::1).
            ip = ipaddress.ip_address(name)
            if ip.version == 6:
                name = ip.compressed
        except ValueError:
            raise FlowRecordError(f"{prefix}_name: {name[:60]!r} is not an IP address "
                                  f"(a `net` end is an address)") from None
        if not scope:
            raise FlowRecordError(f"{prefix}_scope: a `net` end needs private or public")
    elif scope:
        raise FlowRecordError(f"{prefix}_scope: only a `net` end has a scope")
    return End(kind, name, _labels(doc, f"{prefix}_labels"), scope)


def check_shape(doc: Any, fields: Sequence[str], node: str | None, what: str,
                error: type[FlowRecordError] = FlowRecordError,
                optional: Sequence[str] = ()) -> str:
    """A record's fields exactly `fields` (those in `optional` may be missing), and its
    node the sender's (`node`, if given: ForeignNode otherwise); the record's node."""
    if not isinstance(doc, dict):
        raise error(f"expected {what} (a mapping), got {_kind(doc)}")
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise error(f"{str(unknown[0])[:40]}: unknown field")
    missing = [k for k in fields if k not in doc and k not in optional]
    if missing:
        raise error(f"{missing[0]}: missing")
    record_node = _text(doc, "node")
    if node is not None and record_node != node:
        raise ForeignNode(_foreign(record_node, node))
    return record_node


def parse_record(doc: Any, now: float, node: str | None = None) -> FlowRecord:
    """A FlowRecord from its JSON form; FlowRecordError naming the field if the document
    is not exactly a record. `node`: the node the sender may report for."""
    record_node = check_shape(doc, FIELDS, node, "a flow record", optional=OPTIONAL)
    start, end = _time(doc, "start", now), _time(doc, "end", now)
    if start > end:
        raise FlowRecordError(f"start: {start} is after end {end}")
    proto = _int(doc, "proto", 0, 255)
    return FlowRecord(
        start=start, end=end, node=record_node,
        reporter=_text(doc, "reporter", allowed=REPORTERS),
        src=_end(doc, "src"), dst=_end(doc, "dst"), proto=proto,
        dst_port=_int(doc, "dst_port", 0, 65535),
        action=_text(doc, "action", allowed=ACTIONS),
        enforced_trace=_trace(doc, "enforced_trace"),
        staged_action=_text(doc, "staged_action", allowed=ACTIONS),
        staged_trace=_trace(doc, "staged_trace"),
        connections=_int(doc, "connections"), started=_int(doc, "started"),
        packets_in=_int(doc, "packets_in"), packets_out=_int(doc, "packets_out"),
        bytes_in=_int(doc, "bytes_in"), bytes_out=_int(doc, "bytes_out"),
        dst_domains=_domains(doc, "dst_domains", doc["reporter"]),
    )


def parse_batch(doc: Any, now: float, node: str | None = None,
                parse: Callable[[Any, float, str | None], Any] | None = None,
                error: type[FlowRecordError] = FlowRecordError) -> list[Any]:
    """Every record of an ingest body `{"records": [...]}`, or FlowRecordError (`error`)
    for the first bad one (`records[i].field: ...`): a batch is taken whole or not at
    all. `parse` reads one record (default: a flow record).

    With `node`, every record's `node` is compared with it before anything else is
    checked: a batch holding another node's record is refused as ForeignNode whatever
    else is wrong with it (the caller answers "forbidden", not "malformed")."""
    one = parse or parse_record
    if not isinstance(doc, dict) or set(doc) != {"records"}:
        raise error('expected {"records": [...]}')
    records = doc["records"]
    if not isinstance(records, list):
        raise error(f"records: expected a list, got {_kind(records)}")
    if len(records) > MAX_BATCH:
        raise TooManyRecords(f"records: {len(records)} records; at most {MAX_BATCH} in one "
                             "batch")
    if node is not None:
        for i, item in enumerate(records):
            claimed = item.get("node") if isinstance(item, dict) else None
            if isinstance(claimed, str) and claimed != node:
                raise ForeignNode(f"records[{i}].{_foreign(claimed, node)}")
    out = []
    for i, item in enumerate(records):
        try:
            out.append(one(item, now, node))
        except FlowRecordError as e:
            raise type(e)(f"records[{i}].{e}") from None
    return out


def _foreign(claimed: str, node: str) -> str:
    return (f"node: {claimed[:60]!r} is not this agent's node ({node!r}); an agent reports "
            "only its own flows")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
