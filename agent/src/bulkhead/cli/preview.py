"""`bulkhead preview`: which stored flows the staged policies (or files not yet applied)
would decide differently once enforced, from the server's flow logs. Exit codes: 0 done,
and within the gates given; 1 the server refused, or a gate failed (more newly denied
connections than --max-denied, or any to or from --protected); 2 bad usage or input;
3 unreachable."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from bulkhead.cli.flows import clock, named
from bulkhead.cli.remote import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    connection,
    connection_flags,
    label_rule,
    printable,
    table,
)
from bulkhead.client.flows import preview
from bulkhead.model import LoadError, ValidationError, load_paths

TITLES = {"newlyDenied": "Newly denied", "newlyAllowed": "Newly allowed",
          "undecided": "Undecided (the stored fields cannot tell)"}


def _files_text(paths: list[str]) -> str:
    """The files' resources as one JSON list, read as `bulkhead apply` reads them (label
    values by its rule: `rack: 12` is the label "12") and checked here first (a bad file
    fails before anything is sent, and so do files with no resource: previewing them
    would be previewing the store alone)."""
    resources = load_paths(paths, label_rule)
    if not resources:
        raise LoadError(f"{', '.join(paths)}: no resources to preview")
    return json.dumps([r.dump() for r in resources])


def _end(end: dict[str, Any]) -> str:
    name = str(end["name"])
    return f"ns:{name}" if end["type"] == "ns" else name


def _policy(group: dict[str, Any]) -> str:
    if group["policy"]:
        return f"{group['tier']}|{group['policy']}"
    return ", ".join(group["steps"]) or "-"


def render(answer: dict[str, Any]) -> str:
    t = answer["totals"]
    ex = answer["examined"]
    lines = [f"Examined {ex['records']} flow records ({ex['connections']} connections) "
             f"ending {clock(answer['since'])} to {clock(answer['until'])} UTC"
             + (" (truncated: more groups than the server judges)" if answer["truncated"]
                else "") + ".",
             "Promoted for the preview: " + printable(", ".join(answer["promoted"]) or
                                                      "nothing") + "."]
    if answer.get("enforce"):
        lines.append(f"In enforce mode for the preview: {printable(answer['enforce'])}.")
    left_out = answer.get("leftOut") or []
    if left_out:
        lines.append(f"Left out, as the agents leave them out ({len(left_out)} stored "
                     "objects):")
        lines += [f"  - {printable(m)}" for m in left_out[:10]]
        if len(left_out) > 10:
            lines.append(f"  ... and {len(left_out) - 10} more")
    for change, title in TITLES.items():
        groups = answer[change]
        lines.append("")
        lines.append(f"{title}: {t[change]['connections']} connections in "
                     f"{t[change]['records']} records, {answer[change + 'Groups']} groups")
        if not groups:
            continue
        rows = [["DIRECTION", "POLICY", "SOURCE", "DESTINATION", "PORTS", "CONN", "RECORDS"]]
        for g in groups:
            rows.append([g["direction"], _policy(g), _end(g["src"]),
                         named(_end(g["dst"]), g.get("domains")),
                         ",".join(g["ports"]), str(g["connections"]), str(g["records"])])
        lines.append(table(rows))
        if len(groups) < answer[change + "Groups"]:
            lines.append(f"  ... the first {len(groups)} of {answer[change + 'Groups']} "
                         "groups (--limit)")
        if change == "undecided":
            why = sorted({w for g in groups for w in g.get("why", [])})
            lines += [f"  why: {printable(w)}" for w in why]
    if "protected" in answer:
        p = answer["protected"]
        lines += ["", f"Protected ({printable(p['selector'])}): {p['connections']} "
                  f"connections newly denied in {p['records']} records"]
    return "\n".join(lines)


def gates(answer: dict[str, Any], max_denied: int | None) -> list[str]:
    """What failed of the gates given: too many newly denied, a protected one, or a
    preview that is not whole (its totals are lower bounds) when any gate is given."""
    failed = []
    if answer["truncated"] and (max_denied is not None or "protected" in answer):
        failed.append("the preview is incomplete (" + answer.get(
            "stopped", "more records than the server judges at once") + "); its totals "
            "are lower bounds")
    denied = answer["totals"]["newlyDenied"]["connections"]
    if max_denied is not None and denied > max_denied:
        failed.append(f"{denied} connections would be newly denied (at most {max_denied})")
    protected = answer.get("protected")
    if protected and protected["records"]:
        failed.append(f"{protected['connections']} connections to or from "
                      f"{protected['selector']} would be newly denied")
    return failed


def cmd_preview(args: argparse.Namespace) -> int:
    try:
        manifests = _files_text(args.filename) if args.filename else None
    except (LoadError, ValidationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    promote: list[str] | str | None = args.promote or None
    if args.promote_all:
        promote = "all"
    elif args.promote_none:
        promote = "none"
    answer = preview(connection(args), manifests=manifests, promote=promote,
                     enforce=args.enforce, hours=args.hours, protected=args.protected,
                     limit=args.limit)
    if args.output == "json":
        print(json.dumps(answer, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(answer, sort_keys=False), end="")
    else:
        print(render(answer))
    failed = gates(answer, args.max_denied)
    for reason in failed:
        print(f"gate failed: {printable(reason)}", file=sys.stderr)
    return EXIT_REFUSED if failed else EXIT_OK


def add_command(sub: Any) -> None:
    p = sub.add_parser("preview", help="what the staged policies (or files) would deny or "
                       "allow once enforced, from the stored flow logs")
    p.add_argument("-f", "--filename", action="append", metavar="PATH",
                   help="resources not yet applied, put over the store's for the preview")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--promote", action="append", metavar="NAME",
                       help="promote only this StagedGlobalNetworkPolicy (repeatable); "
                       "default: the files' staged policies, or with no files all of them")
    which.add_argument("--promote-all", action="store_true",
                       help="promote every staged policy (the store's and the files')")
    which.add_argument("--promote-none", action="store_true",
                       help="promote nothing: the files' enforced policies alone")
    p.add_argument("--enforce", metavar="SELECTOR",
                   help="preview the host endpoints this selects in enforce mode (those "
                   "in observe mode block nothing): what moving them to enforce would deny")
    p.add_argument("--hours", type=float, default=24.0,
                   help="flows that ended in the last N hours (default 24)")
    p.add_argument("--protected", metavar="SELECTOR",
                   help="fail (exit 1) if a flow to or from endpoints this selects would "
                   "be newly denied")
    p.add_argument("--max-denied", type=int, metavar="N",
                   help="fail (exit 1) if more than N connections would be newly denied")
    p.add_argument("--limit", type=int, default=100, help="groups listed per kind (100)")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    connection_flags(p)
    p.set_defaults(func=cmd_preview, remote=True)
