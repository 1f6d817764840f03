"""The `bulkhead` commands that talk to bulkhead-server: apply, create, replace, delete,
get, diff, rollback, promote, nodes. Exit codes: 0 done; 1 the server refused (invalid,
conflict, forbidden, not found) or, for `diff`, there are differences; 2 bad usage or
input; 3 unreachable."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bulkhead.api import label_value
from bulkhead.client import (
    ApiError,
    BadAnswer,
    Connection,
    Unreachable,
    resource_path,
    route,
)
from bulkhead.model import ENFORCEMENT_LABEL, KIND_ALIASES, LoadError, load_paths

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# C0 and C1 controls, DEL, line/paragraph separators and bidirectional overrides: what a
# terminal would act on (clear the screen, move the cursor, reorder text) instead of show.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
NODE_ERRORS_SHOWN = 10


def printable(text: object) -> str:
    """`text` with control characters shown escaped (`\\x1b`, `\\r`), never acted on: for
    strings from the server (agents' errors, names, messages) printed to a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                        str(text))


def connection(args: argparse.Namespace) -> Connection:
    return Connection.resolve(args.server, args.ca, args.cert, args.key)


def _body(args: argparse.Namespace) -> bytes:
    # Parsed (and validated) here first, so a bad file fails before anything is sent.
    resources = load_paths(args.filename, label_rule)
    if not resources:
        raise ValueError("no resources in " + ", ".join(args.filename))
    return json.dumps([r.dump() for r in resources]).encode()


def label_rule(doc: Any, where: str) -> Any:
    """The document with its label values written by the one rule every writer follows
    (`bulkhead.api.label_value`: `pci: true` is the label "true"); a null names the label."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        return doc
    labels = meta["labels"]
    written = {}
    for key, value in labels.items():
        try:
            written[key] = label_value(value)
        except TypeError as e:
            raise LoadError(f"{where}: metadata.labels.{key}: {e}") from None
    return {**doc, "metadata": {**meta, "labels": written}}


def _send_apply(args: argparse.Namespace, mode: str, dry_run: bool) -> dict[str, Any]:
    query = {"mode": mode}
    if dry_run:
        query["dryRun"] = "true"
    result: dict[str, Any] = connection(args).request("POST", route("apply"), raw=_body(args),
                                                      query=query)
    return result


def cmd_apply(args: argparse.Namespace, mode: str = "apply") -> int:
    result = _send_apply(args, mode, args.dry_run)
    suffix = " (dry run)" if result["dryRun"] else ""
    for item in result["results"]:
        print(printable(f"{item['kind']} {item['name']} {item['action']}{suffix}"))
    if result.get("revision"):
        print(f"revision {result['revision']}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    result = _send_apply(args, "apply", True)
    return EXIT_REFUSED if _print_diff(result["results"], "server", "file") else EXIT_OK


def _print_diff(results: list[dict[str, Any]], old: str, new: str) -> bool:
    """A unified diff of every result that changes something; whether there was one.
    (YAML escapes control characters in what it dumps; labels go through printable.)"""
    differs = False
    for item in results:
        if item["action"] == "unchanged":
            continue
        differs = True
        before = [] if item["action"] == "created" else \
            yaml.safe_dump(item.get("before") or {}, sort_keys=False).splitlines(True)
        after = [] if item["action"] == "deleted" else \
            yaml.safe_dump(item.get("after") or {}, sort_keys=False).splitlines(True)
        label = printable(f"{item['kind']}/{item['name']}")
        sys.stdout.writelines(difflib.unified_diff(before, after, fromfile=f"{old}/{label}",
                                                   tofile=f"{new}/{label}"))
    return differs


def cmd_export(args: argparse.Namespace) -> int:
    query = {k: str(v) for k, v in (("revision", args.revision), ("tier", args.tier))
             if v is not None}
    body = connection(args).request("GET", route("export"), query=query or None)
    text = f"# bulkhead export at revision {body['revision']}\n" + \
        yaml.safe_dump_all(body["items"], sort_keys=False, default_flow_style=False)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{len(body['items'])} resources at revision {body['revision']} written to "
              f"{args.output}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    query = {"revision": str(args.to_revision)}
    if args.dry_run:
        query["dryRun"] = "true"
    result = connection(args).request("POST", route("rollback"), query=query)
    return _report_changes(result, args.diff or args.dry_run, f"revision-{args.to_revision}")


def cmd_promote(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"names": args.names, "dryRun": args.dry_run}
    if args.preview is not None:
        if args.names:
            raise ValueError("promote: give NAMEs or --preview FILE, not both")
        body["names"], body["resourceVersions"] = previewed(args.preview)
        if not body["names"]:
            print(printable(f"{args.preview}: the preview promoted no staged policy; "
                            "nothing to promote"))
            return EXIT_OK
    elif not args.names:
        raise ValueError("promote: give the StagedGlobalNetworkPolicy NAMEs to promote, or "
                         "--preview FILE")
    result = connection(args).request("POST", route("promote"), body)
    return _report_changes(result, args.diff or args.dry_run, "promoted")


def previewed(path: str) -> tuple[list[str], dict[str, str]]:
    """The staged policies a kept preview (`bulkhead preview -o json`) promoted, and the
    version of each it judged; ValueError naming the file and what is wrong."""
    limit = 64 * 1024 * 1024
    try:
        with open(path, "rb") as f:
            text = f.read(limit + 1)
        if len(text) > limit:
            raise ValueError("larger than 64 MiB")
        report = json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"--preview {path}: cannot read a preview's JSON: {e}") from None
    names = report.get("promoted") if isinstance(report, dict) else None
    versions = report.get("promotedVersions") if isinstance(report, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and isinstance(versions, dict)):
        raise ValueError(f"--preview {path}: not a preview of this version (`bulkhead "
                         "preview -o json`: promoted and promotedVersions)")
    unpinned = [n for n in names if not isinstance(versions.get(n), str)]
    if unpinned:
        raise ValueError(f"--preview {path}: {unpinned[0]} has no version: the preview "
                         "judged files not applied (-f); apply them, then preview again")
    return names, {n: versions[n] for n in names}


def _report_changes(result: dict[str, Any], diff: bool, after: str) -> int:
    """What a rollback or promote changed (a diff of it first when `diff`), then how many
    resources and the new revision."""
    suffix = " (dry run)" if result["dryRun"] else ""
    if diff:
        _print_diff(result["results"], "now", after)
    for item in result["results"]:
        if item["action"] != "unchanged":
            print(printable(f"{item['kind']} {item['name']} {item['action']}{suffix}"))
    changed = sum(item["action"] != "unchanged" for item in result["results"])
    print(f"{changed} resources changed{suffix}" +
          (f"; revision {result['revision']}" if result.get("revision") else ""))
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    if args.kind:
        query["kind"] = _kind(args.kind)
    if args.name:
        query["name"] = args.name
    answer = connection(args).request("GET", route("history"), query=query)
    entries = answer["entries"]
    if answer.get("truncated"):
        print(f"history: {len(entries)} entries, the most one answer holds (their changes, "
              "100,000 in all); older ones left out: --limit fewer, or --kind/--name",
              file=sys.stderr)
    if args.output == "json":
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    rows = [["REVISION", "TIME", "WHO", "ROLE", "OPERATION", "CHANGES"]]
    for e in entries:
        changes = ", ".join(f"{c['action']} {c['kind']} {c['name']}" for c in e["changes"][:3])
        if len(e["changes"]) > 3:
            changes += f", ... {len(e['changes']) - 3} more"
        rows.append([str(e["revision"]), e["time"], e["who"], e["role"],
                     str(e.get("operation") or "-"), changes])
    print(table(rows))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    conn = connection(args)
    query = {"dryRun": "true"} if args.dry_run else {}
    suffix = " (dry run)" if args.dry_run else ""
    if args.filename:
        # Every resource of the files in one request: all or nothing, dependents first
        # (the policies of a tier before the tier), as `kubectl delete -f` users expect.
        docs = [{"kind": r.kind, "metadata": {"name": r.name}}
                for r in load_paths(args.filename)]
        if not docs:
            raise ValueError("no resources in " + ", ".join(args.filename))
        if args.ignore_not_found:
            query["ignoreNotFound"] = "true"
        result = conn.request("POST", route("delete"), raw=json.dumps(docs).encode(),
                              query=query)
        for item in result["results"]:
            what = "deleted" if item["action"] == "deleted" else "not found, skipped"
            print(printable(f"{item['kind']} {item['name']} {what}{suffix}"))
        if result.get("revision"):
            print(f"revision {result['revision']}")
        return EXIT_OK
    if not (args.kind and args.name):
        raise ValueError("give -f FILE, or KIND NAME")
    if args.kind.lower() in ("node", "nodes"):
        # Not a resource: the node's last status report, which every wait counts.
        path, what, done = route("status", node=args.name), f"node {args.name}", "forgotten"
    else:
        kind = _kind(args.kind)
        path, what, done = resource_path(kind, args.name), f"{kind} {args.name}", "deleted"
    try:
        conn.request("DELETE", path, query=query or None)
    except ApiError as e:
        if e.status != 404 or not args.ignore_not_found:
            raise
        print(printable(f"{what} not found, skipped{suffix}"))
        return EXIT_OK
    print(printable(f"{what} {done}{suffix}"))
    return EXIT_OK


def _kind(raw: str) -> str:
    kind = KIND_ALIASES.get(raw) or KIND_ALIASES.get(raw.lower())
    if kind is None:
        raise ValueError(f"unknown kind {raw!r} (HostEndpoint, GlobalNetworkPolicy, "
                         "StagedGlobalNetworkPolicy, Tier, GlobalNetworkSet, Profile)")
    return kind


Column = tuple[str, Callable[[dict[str, Any]], Any]]
WIDE: dict[str, list[Column]] = {
    "GlobalNetworkPolicy": [("TIER", lambda d: d["spec"].get("tier", "default")),
                            ("ORDER", lambda d: d["spec"].get("order", "")),
                            ("SELECTOR", lambda d: d["spec"].get("selector", ""))],
    "HostEndpoint": [("NODE", lambda d: d["spec"].get("node", "")),
                     ("INTERFACE", lambda d: d["spec"].get("interfaceName", "")),
                     ("IPS", lambda d: ",".join(d["spec"].get("expectedIPs", []))),
                     # observe or enforce; "-": no label, the agent's `enforcement` decides
                     ("MODE", lambda d: (d["metadata"].get("labels") or {}).get(
                         ENFORCEMENT_LABEL, "-"))],
    "Tier": [("ORDER", lambda d: d["spec"].get("order", "")),
             ("DEFAULT", lambda d: d["spec"].get("defaultAction", "Deny"))],
    "GlobalNetworkSet": [("NETS", lambda d: ",".join(d["spec"].get("nets", [])))],
}
WIDE["StagedGlobalNetworkPolicy"] = WIDE["GlobalNetworkPolicy"]


def table(rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def cmd_get(args: argparse.Namespace) -> int:
    conn = connection(args)
    kind = _kind(args.kind)
    if args.name:
        docs = [conn.request("GET", resource_path(kind, args.name))]
    else:
        query = {"selector": args.selector} if args.selector else None
        docs = conn.request("GET", resource_path(kind), query=query)["items"]
    if args.output == "yaml":
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    elif args.output == "json":
        print(json.dumps(docs[0] if args.name else {"kind": "List", "items": docs}, indent=2))
    else:
        columns: list[Column] = [("NAME", lambda d: d["metadata"]["name"])]
        if args.output == "wide":
            columns += WIDE.get(kind, [])
            columns.append(("LABELS", lambda d: ",".join(
                f"{k}={v}" for k, v in sorted((d["metadata"].get("labels") or {}).items()))))
        rows = [[h for h, _ in columns]] + [[str(f(d)) for _, f in columns] for d in docs]
        print(table(rows))
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    query = {"revision": str(args.revision)} if args.revision is not None else None
    body = connection(args).request("GET", route("nodes"), query=query)
    if args.output == "json":
        print(json.dumps(body, indent=2))
    else:
        head = ["NODE", "APPLIED", "ERRORS", "LAST REPORT", "VERSION"]
        if args.revision is not None:
            head.append("CONVERGED")
        rows = [head]
        for n in body["nodes"]:
            row = [n["node"], str(n.get("appliedRevision", "")), str(len(n.get("errors", []))),
                   n.get("lastReport", ""), str(n.get("agentVersion") or "-")]
            if args.revision is not None:
                row.append("yes" if n.get("converged") else "no")
            rows.append(row)
        print(table(rows))
        print(_node_errors(body["nodes"]), end="")
        print(_version_skew(body), end="")
    if args.revision is not None and not body.get("converged"):
        return EXIT_REFUSED
    return EXIT_OK


def _version_skew(body: dict[str, Any]) -> str:
    """A line naming the nodes whose agent runs another version than the server (or says
    none): what is left of a rolling upgrade."""
    server = body.get("serverVersion")
    if not isinstance(server, str):
        return ""
    other = [f"{n['node']} ({n.get('agentVersion') or 'unknown'})" for n in body["nodes"]
             if n.get("agentVersion") != server]
    if not other:
        return ""
    shown = ", ".join(other[:NODE_ERRORS_SHOWN])
    more = f", ... {len(other) - NODE_ERRORS_SHOWN} more" if len(other) > NODE_ERRORS_SHOWN \
        else ""
    return "\n" + printable(f"{len(other)} agents on another version than the server's "
                            f"({server}): {shown}{more}") + "\n"


def _node_errors(nodes: list[dict[str, Any]]) -> str:
    """The agents' own error messages under the table: `NODE: message`, escaped."""
    lines = []
    for n in nodes:
        errors = n.get("errors") or []
        lines += [printable(f"{n['node']}: {e}") for e in errors[:NODE_ERRORS_SHOWN]]
        if len(errors) > NODE_ERRORS_SHOWN:
            lines.append(printable(f"{n['node']}: ... {len(errors) - NODE_ERRORS_SHOWN} more "
                                   "(-o json shows all)"))
    return "".join(f"{line}\n" for line in ["", *lines]) if lines else ""


def connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="https://HOST:PORT (env BULKHEAD_SERVER)")
    p.add_argument("--ca", help="CA certificate (env BULKHEAD_CA)")
    p.add_argument("--cert", help="client certificate (env BULKHEAD_CERT)")
    p.add_argument("--key", help="client key (env BULKHEAD_KEY)")


def add_commands(sub: Any) -> None:
    for name, mode, text in (("apply", "apply", "create or update resources, all or nothing"),
                             ("create", "create", "create resources; fail if any exists"),
                             ("replace", "replace", "replace resources; fail if any is missing")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH")
        p.add_argument("--dry-run", action="store_true", help="validate and show, write nothing")
        connection_flags(p)
        p.set_defaults(func=lambda a, m=mode: cmd_apply(a, m), remote=True)

    p = sub.add_parser("diff", help="what apply -f would change (exit 1 if anything)")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH")
    connection_flags(p)
    p.set_defaults(func=cmd_diff, remote=True)

    p = sub.add_parser("delete", help="delete resources named in files, or KIND NAME "
                       "(node NAME: forget a node's status report)")
    p.add_argument("kind", nargs="?")
    p.add_argument("name", nargs="?")
    p.add_argument("-f", "--filename", action="append", metavar="PATH")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--ignore-not-found", action="store_true",
                   help="skip resources already gone instead of refusing")
    connection_flags(p)
    p.set_defaults(func=cmd_delete, remote=True)

    p = sub.add_parser("get", help="list or show resources")
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-o", "--output", choices=["table", "wide", "yaml", "json"], default="table")
    p.add_argument("-l", "--selector", help="label selector, e.g. \"zone == 'dmz'\"")
    connection_flags(p)
    p.set_defaults(func=cmd_get, remote=True)

    p = sub.add_parser("export", help="every resource (or a tier) at a revision, as YAML")
    p.add_argument("--revision", type=int, help="default: now")
    p.add_argument("--tier", help="only this Tier and its policies")
    p.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    connection_flags(p)
    p.set_defaults(func=cmd_export, remote=True)

    p = sub.add_parser("rollback", help="restore every resource as it was at a revision")
    p.add_argument("--to-revision", type=int, required=True, metavar="N")
    p.add_argument("--dry-run", action="store_true", help="show what would change (a diff)")
    p.add_argument("--diff", action="store_true", help="show a diff of the changes")
    connection_flags(p)
    p.set_defaults(func=cmd_rollback, remote=True)

    p = sub.add_parser("promote", help="make staged policies enforced (stagedAction Set) or "
                       "delete what they stage the deletion of (Delete), in one transaction")
    p.add_argument("names", nargs="*", metavar="NAME", help="a StagedGlobalNetworkPolicy")
    p.add_argument("--preview", metavar="FILE",
                   help="promote what a kept preview (`bulkhead preview -o json`) promoted, "
                   "each as it judged it: refused whole when one changed since")
    p.add_argument("--dry-run", action="store_true", help="show what would change (a diff)")
    p.add_argument("--diff", action="store_true", help="show a diff of the changes")
    connection_flags(p)
    p.set_defaults(func=cmd_promote, remote=True)

    p = sub.add_parser("history", help="who changed what, at which revision (newest first)")
    p.add_argument("--kind")
    p.add_argument("--name")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    connection_flags(p)
    p.set_defaults(func=cmd_history, remote=True)

    p = sub.add_parser("nodes", help="agents and the revision they enforce")
    p.add_argument("--revision", type=int, help="show whether each node has converged to it")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    connection_flags(p)
    p.set_defaults(func=cmd_nodes, remote=True)


def run_remote(func: Any, args: argparse.Namespace) -> int:
    try:
        code: int = func(args)
        return code
    except ApiError as e:
        print(printable(f"error: {e.message} (HTTP {e.status} {e.reason})"), file=sys.stderr)
        return EXIT_REFUSED
    except Unreachable as e:
        print(printable(f"error: cannot reach bulkhead-server: {e}"), file=sys.stderr)
        return EXIT_UNREACHABLE
    except BadAnswer as e:
        print(printable(f"error: bulkhead-server's answer cannot be read: {e}"),
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        # An answer of another shape than this command reads (the server of another
        # version, or not a bulkhead-server): said so, not a traceback. BULKHEAD_DEBUG=1
        # shows the traceback.
        if os.environ.get("BULKHEAD_DEBUG"):
            raise
        print(printable(f"error: bulkhead-server's answer is not what `bulkhead "
                        f"{args.command}` reads ({type(e).__name__}: {str(e)[:200]}); is "
                        "the server a bulkhead-server of this version? (BULKHEAD_DEBUG=1 "
                        "shows where)"), file=sys.stderr)
        return EXIT_UNREACHABLE
