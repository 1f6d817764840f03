"""`bulkhead flows`: the flow logs the server holds, filtered, as a table, JSON or YAML;
`--top N` for top talkers; `--follow` to keep printing what agents send."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import yaml

from bulkhead.cli.remote import EXIT_OK, connection, connection_flags, printable, table
from bulkhead.client import Connection, Unreachable
from bulkhead.client.flows import flows

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
MIN_INTERVAL, MAX_INTERVAL = 0.5, 60.0
# --follow asks again for what was stored this long before the newest record it saw (and
# drops what it printed already): a record a second server committed a little late.
OVERLAP = 2.0
MAX_SEEN = 100_000
# Records --follow asks for a poll: the server's most. More than one batch (at most 5,000
# records, one `received` for them all in SQLite), so a batch never outgrows a page.
FOLLOW_LIMIT = 10_000


def when(text: str, now: float) -> float:
    """`2h`, `1h30m`, `90s` (that long before `now`), unix seconds, or an ISO 8601 time
    (UTC unless it gives an offset)."""
    raw = text.strip()
    if DURATION.fullmatch(raw):
        return now - sum(float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(\w)", raw))
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give a duration (2h, 30m, 1d), unix "
                         "seconds or an ISO time (2026-12-04T10:00:00Z)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _end(f: dict[str, Any], prefix: str) -> str:
    name = str(f[f"{prefix}_name"])
    return f"ns:{name}" if f[f"{prefix}_type"] == "ns" else name


def named(end: str, names: list[str] | None, most: int = 2) -> str:
    """An end with the first of the domain names it was resolved from."""
    if not names:
        return end
    more = f" +{len(names) - most}" if len(names) > most else ""
    return f"{end} ({','.join(names[:most])}{more})"


def _dst(f: dict[str, Any]) -> str:
    return named(_end(f, "dst"), f.get("dst_domains"))


def _port(f: dict[str, Any]) -> str:
    proto = PROTOCOLS.get(f["proto"], str(f["proto"]))
    return f"{proto}/{f['dst_port']}" if f["dst_port"] else proto


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def _action(f: dict[str, Any]) -> str:
    if f["staged_action"] != f["action"]:
        return f"{f['action']} (staged {f['staged_action']})"
    return str(f["action"])


def _counts(f: dict[str, Any]) -> str:
    return (f"{f['connections']} conn, {f['packets_in'] + f['packets_out']} pkt, "
            f"{_size(f['bytes_in'] + f['bytes_out'])}")


Column = tuple[str, Callable[[dict[str, Any]], str]]
COLUMNS: list[Column] = [
    ("TIME (UTC)", lambda f: clock(f["end"])), ("NODE", lambda f: f["node"]),
    ("FLOW", lambda f: f"{_end(f, 'src')} -> {_dst(f)}"), ("PORT", _port),
    ("ACTION", _action), ("COUNTS", _counts),
    ("POLICY", lambda f: f["enforced_trace"][-1] if f["enforced_trace"] else "")]
WIDE: list[Column] = [
    ("START (UTC)", lambda f: clock(f["start"])), ("END", lambda f: clock(f["end"])[11:]),
    ("NODE", lambda f: f"{f['node']} ({f['reporter']})"),
    ("SRC", lambda f: _end(f, "src")), ("DST", _dst), ("PORT", _port),
    ("ACTION", lambda f: f["action"]), ("STAGED", lambda f: f["staged_action"]),
    ("CONN", lambda f: f"{f['connections']} ({f['started']} new)"),
    ("PACKETS IN/OUT", lambda f: f"{f['packets_in']}/{f['packets_out']}"),
    ("BYTES IN/OUT", lambda f: f"{f['bytes_in']}/{f['bytes_out']}"),
    ("ENFORCED", lambda f: " > ".join(f["enforced_trace"])),
    ("STAGED TRACE", lambda f: " > ".join(f["staged_trace"])),
    ("SRC LABELS", lambda f: _labels(f["src_labels"])),
    ("DST LABELS", lambda f: _labels(f["dst_labels"]))]
TOP: list[Column] = [
    ("SRC", lambda t: _end(t, "src")), ("DST", lambda t: _end(t, "dst")), ("PORT", _port),
    ("BYTES", lambda t: _size(t["bytes"])), ("PACKETS", lambda t: str(t["packets"])),
    ("CONNECTIONS", lambda t: str(t["connections"])), ("RECORDS", lambda t: str(t["records"]))]


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _rows(items: list[dict[str, Any]], columns: list[Column], head: bool) -> str:
    rows = [[h for h, _ in columns]] if head else []
    return table(rows + [[fn(item) for _, fn in columns] for item in items])


def window(args: argparse.Namespace, now: float) -> tuple[float | None, float | None]:
    """--since and --until as unix seconds. Without --since: the hour before now, or with
    --until none, so the server takes the hour before it (the API's default); `1h` then
    would be after an `--until 2h` and refused."""
    until = when(args.until, now) if args.until else None
    if args.since is None:
        return (None if until is not None else now - 3600), until
    return when(args.since, now), until


def _filters(args: argparse.Namespace, now: float) -> dict[str, Any]:
    since, until = window(args, now)
    return {"since": since, "until": until, "node": args.node, "reporter": args.reporter,
            "action": args.action,
            "policy": args.policy, "tier": args.tier, "staged_differs": args.staged_differs,
            "selector": args.selector, "endpoint": args.endpoint}


def cmd_flows(args: argparse.Namespace) -> int:
    if args.follow and args.top:
        raise ValueError("--follow shows records as they come; --top sums them: give one")
    if not MIN_INTERVAL <= args.interval <= MAX_INTERVAL:
        raise ValueError(f"--interval: from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds")
    conn = connection(args)
    filters = _filters(args, time.time())
    if args.top:
        answer = flows(conn, **filters, top=args.top)
        _show(answer, "top", args.output)
        return EXIT_OK
    answer = flows(conn, **filters, limit=args.limit)
    answer["flows"].reverse()     # oldest first, as a log reads (and --follow goes on)
    if not args.follow:
        _show(answer, "flows", args.output)
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):   # Ctrl-C ends a follow: not an error
        _emit(answer["flows"], args.output, head=True)
        _follow(conn, filters, answer["flows"], args)
    return EXIT_OK


def _show(answer: dict[str, Any], key: str, output: str,
          columns: tuple[list[Column], list[Column]] | None = None) -> None:
    """An answer as JSON, YAML or a table of `answer[key]`; `columns`: (normal, wide),
    flow records' by default (top talkers' for key "top")."""
    if output == "json":
        print(json.dumps(answer, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(answer, sort_keys=False), end="")
    else:
        normal, wide = columns or (COLUMNS, WIDE)
        print(_rows(answer[key], TOP if key == "top" else wide if output == "wide"
                    else normal, True))
    if answer.get("truncated") and output in ("table", "wide"):
        print(printable(f"(more {'groups' if key == 'top' else 'records'} match than "
                        "are shown: narrow the filters or raise --limit)"), file=sys.stderr)
    sys.stdout.flush()


def _key(f: dict[str, Any]) -> str:
    return json.dumps(f, sort_keys=True)


def _follow(conn: Connection, filters: dict[str, Any], shown: list[dict[str, Any]],
            args: argparse.Namespace) -> None:
    """Poll for what is stored from now on; print each record once, until Ctrl-C."""
    def fetch(after: float) -> tuple[list[dict[str, Any]], bool]:
        answer = flows(conn, **filters, after=after, limit=FOLLOW_LIMIT)
        return answer["flows"], bool(answer["truncated"])

    follow(fetch, shown, args.interval, lambda fresh: _emit(fresh, args.output, head=False))


def follow(fetch: Callable[[float], tuple[list[dict[str, Any]], bool]],
           shown: list[dict[str, Any]], interval: float,
           emit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Poll `fetch(after)` (records stored at or after `after`, oldest first, and whether
    more came than it answered) for what is stored from now on; `emit` each record once,
    until Ctrl-C (flow and DNS records alike: each has `received`)."""
    newest = max((f["received"] for f in shown), default=0.0)
    seen = {_key(f): f["received"] for f in shown}
    full = hurry = False
    while True:
        if not hurry:
            time.sleep(interval)
        try:
            # After a full page, on from its newest record: asked again with the overlap,
            # a burst of more than a page within it would come back whole, all seen, each
            # time, and nothing after it would ever be printed.
            got, more = fetch(newest if full else max(0.0, newest - OVERLAP))
        except Unreachable as e:
            print(printable(f"warning: {e}; trying again"), file=sys.stderr)
            hurry = False
            continue
        fresh = [f for f in got if _key(f) not in seen]
        # The rest of a full page's records at once; a page with nothing new waits.
        full, hurry = more, more and bool(fresh)
        for f in fresh:
            seen[_key(f)] = f["received"]
            newest = max(newest, f["received"])
        # Only records inside the overlap can come again: forget the older ones.
        seen = {k: r for k, r in seen.items() if r >= newest - OVERLAP}
        if len(seen) > MAX_SEEN:
            seen = dict(sorted(seen.items(), key=lambda kv: kv[1])[-MAX_SEEN:])
        if fresh:
            emit(fresh)


def _emit(records: list[dict[str, Any]], output: str, head: bool,
          columns: tuple[list[Column], list[Column]] | None = None) -> None:
    """Records as --follow prints them: JSON one a line, YAML one document each, or table
    rows (the header once); `columns`: (normal, wide), flow records' by default."""
    if output == "json":
        for f in records:
            print(json.dumps(f))
    elif output == "yaml":
        if records:
            print(yaml.safe_dump_all(records, sort_keys=False, explicit_start=True), end="")
    elif records or head:
        normal, wide = columns or (COLUMNS, WIDE)
        print(_rows(records, wide if output == "wide" else normal, head))
    sys.stdout.flush()


def add_command(sub: Any) -> None:
    p = sub.add_parser("flows", help="flow logs: what each host's table decided, and what "
                       "staged policies would have")
    window_flags(p)
    p.add_argument("--reporter", choices=["src", "dst"],
                   help="src: the flow left the node (egress); dst: it reached it (ingress)")
    p.add_argument("--action", choices=["allow", "deny"], help="the enforced action")
    p.add_argument("--policy", help="a policy named in the enforced or staged trace")
    p.add_argument("--tier", help="a tier named in the enforced or staged trace")
    p.add_argument("--staged-differs", action="store_true",
                   help="only records whose staged action differs from the enforced one")
    p.add_argument("-l", "--selector", help="a label selector matching either end, e.g. "
                   "\"app == 'db'\"")
    p.add_argument("--endpoint", help="a host endpoint, network set or address at either end")
    p.add_argument("--top", type=int, metavar="N", help="the N top talkers (most bytes)")
    output_flags(p)
    p.set_defaults(func=cmd_flows, remote=True)


def window_flags(p: argparse.ArgumentParser) -> None:
    """--since, --until and --node (flows and dns)."""
    p.add_argument("--since", help="a duration before now (2h, 30m, 1d), unix seconds or "
                   "an ISO time; records that ended since then (default: the hour before "
                   "--until, else before now)")
    p.add_argument("--until", help="likewise; records that ended by then (default: no end)")
    p.add_argument("--node", help="the reporting node")


def output_flags(p: argparse.ArgumentParser) -> None:
    """--limit, -o, --follow, --interval and the connection's flags (flows and dns)."""
    p.add_argument("--limit", type=int, help="at most this many records (server default "
                   "1000, at most 10000)")
    p.add_argument("-o", "--output", choices=["table", "wide", "json", "yaml"],
                   default="table")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new records until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0,
                   help=f"--follow polls every this many seconds ({MIN_INTERVAL:g} to "
                   f"{MAX_INTERVAL:g}; default 2)")
    connection_flags(p)
