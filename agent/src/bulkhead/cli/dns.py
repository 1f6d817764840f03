"""`bulkhead dns`: the DNS logs the server holds (which host asked which resolver what, the
answers, the response code and the latency), filtered, as a table, JSON or YAML;
`--follow` to keep printing what agents send."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from bulkhead.cli.flows import (
    FOLLOW_LIMIT,
    MAX_INTERVAL,
    MIN_INTERVAL,
    Column,
    _emit,
    _end,
    _labels,
    _show,
    clock,
    follow,
    output_flags,
    window,
    window_flags,
)
from bulkhead.cli.remote import EXIT_OK, connection
from bulkhead.client.flows import dns_logs


def _latency(r: dict[str, Any]) -> str:
    if not r["latency_count"]:
        return "-"
    return f"{r['latency_mean_ms']:.1f} ms (max {r['latency_max_ms']:.1f})"


def _answers(r: dict[str, Any]) -> str:
    values = [a.split(" ")[2] for a in r["answers"] if a.split(" ")[1] in ("A", "AAAA")]
    return ", ".join(values) or "-"


COLUMNS: list[Column] = [
    ("TIME (UTC)", lambda r: clock(r["end"])), ("NODE", lambda r: r["node"]),
    ("CLIENT", lambda r: _end(r, "client")), ("SERVER", lambda r: _end(r, "server")),
    ("QUESTION", lambda r: f"{r['qname']} {r['qtype']}"), ("RCODE", lambda r: r["rcode"]),
    ("ADDRESSES", _answers), ("COUNT", lambda r: str(r["count"])), ("LATENCY", _latency)]
WIDE: list[Column] = [
    ("START (UTC)", lambda r: clock(r["start"])), ("END", lambda r: clock(r["end"])[11:]),
    ("NODE", lambda r: r["node"]), ("CLIENT", lambda r: _end(r, "client")),
    ("SERVER", lambda r: _end(r, "server")),
    ("QUESTION", lambda r: f"{r['qname']} {r['qtype']}"), ("RCODE", lambda r: r["rcode"]),
    ("ANSWERS", lambda r: "; ".join(r["answers"])), ("COUNT", lambda r: str(r["count"])),
    ("LATENCY", _latency), ("CLIENT LABELS", lambda r: _labels(r["client_labels"]))]


def cmd_dns(args: argparse.Namespace) -> int:
    if not MIN_INTERVAL <= args.interval <= MAX_INTERVAL:
        raise ValueError(f"--interval: from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds")
    conn = connection(args)
    now = time.time()
    since, until = window(args, now)
    filters: dict[str, Any] = {
        "since": since, "until": until, "node": args.node, "client": args.client,
        "qname": args.qname, "rcode": args.rcode}
    answer = dns_logs(conn, **filters, limit=args.limit)
    records = answer["dns"]
    records.reverse()     # oldest first, as a log reads (and --follow goes on)
    columns = (COLUMNS, WIDE)
    if not args.follow:
        _show(answer, "dns", args.output, columns)
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):   # Ctrl-C ends a follow: not an error
        _emit(records, args.output, True, columns)
        def fetch(after: float) -> tuple[list[dict[str, Any]], bool]:
            got = dns_logs(conn, **filters, after=after, limit=FOLLOW_LIMIT)
            return got["dns"], bool(got["truncated"])

        follow(fetch, records, args.interval,
               lambda fresh: _emit(fresh, args.output, False, columns))
    return EXIT_OK


def add_command(sub: Any) -> None:
    p = sub.add_parser("dns", help="DNS logs: what each host asked its resolvers, and the "
                       "answers (docs/dns.md)")
    window_flags(p)
    p.add_argument("--client", help="the client: a host endpoint's name, or an address")
    p.add_argument("--qname", help="the name asked, or *.SUFFIX for the names under SUFFIX")
    p.add_argument("--rcode", help="the response code (NOERROR, NXDOMAIN, SERVFAIL, ...)")
    output_flags(p)
    p.set_defaults(func=cmd_dns, remote=True)
