"""`bulkhead`: the command line (the calicoctl of Bulkhead).

Exit codes: 0 success; 1 a check failed or the server refused (invalid resources,
conformance differences, a denied flow with --exit-code, conflicts, forbidden, not found,
differences in `diff`, nodes not converged); 2 bad usage or unreadable input; 3 the server
cannot be reached.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bulkhead.cli.dns import add_command as add_dns_command
from bulkhead.cli.flows import add_command as add_flows_command
from bulkhead.cli.preview import add_command as add_preview_command
from bulkhead.cli.remote import add_commands, label_rule, printable, run_remote
from bulkhead.conformance import (
    DATAPLANES,
    CaseError,
    load_cases,
    report_json,
    report_text,
    run_cases_at_once,
)
from bulkhead.conformance.runner import MAX_AT_ONCE
from bulkhead.lab.cli import add_commands as add_lab_commands
from bulkhead.model import LoadError, Snapshot, ValidationError, load_paths
from bulkhead.policy import Evaluator, FailsafePort, Failsafes, Flow
from bulkhead.policy.evaluate import Verdict
from bulkhead.policy.explain import explain_text
from bulkhead.policy.flow import protocol_of
from bulkhead.selector import SelectorError, parse

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Input the user must fix; printed without a traceback, exit code 2."""


def _literal(who: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(who)
    except ValueError:
        return None


def _resolve(snapshot: Snapshot, who: str, version: int | None = None) -> str:
    """An IP, a HostEndpoint name or a node name -> an address; of IP `version` (4 or
    6) when given: a dual-stack endpoint's first expectedIP of that version."""
    ip = _literal(who)
    if ip is not None:
        return str(ip)
    hep = snapshot.host_endpoints.get(who) or next(
        (h for h in snapshot.host_endpoints.values() if h.node == who), None)
    if hep is None:
        raise UsageError(f"{who!r} is neither an IP address nor a HostEndpoint or node name")
    if not hep.expected_ips:
        raise UsageError(f"HostEndpoint {hep.name} has no expectedIPs; give an address")
    fitting = [a for a in hep.expected_ips
               if version is None or ipaddress.ip_address(a).version == version]
    if not fitting:
        raise UsageError(f"HostEndpoint {hep.name} has no IPv{version} address in its "
                         f"expectedIPs {list(hep.expected_ips)}; give an address")
    return fitting[0]


def _flow_version(args: argparse.Namespace) -> int | None:
    """The IP version the flow must have: -4/-6, else an address given as such, else the
    protocol's (ICMP is IPv4's, ICMPv6 IPv6's); None when nothing says."""
    try:
        number = protocol_of(args.proto)
    except ValueError as e:
        raise UsageError(str(e)) from None
    implied = {1: 4, 58: 6}.get(number)
    said = f"--proto {args.proto}" if implied is not None else None
    for given, what in ((args.version, f"-{args.version}"),
                        *((ip.version, str(ip)) for ip in (_literal(args.src),
                                                           _literal(args.dst)) if ip)):
        if given is None:
            continue
        if implied is not None and given != implied:
            # -4 beside an IPv6 address is refused as ICMPv6 beside an IPv4 one is: the
            # flow would be explained at the address's version, not the one asked for.
            raise UsageError(f"{said} is IPv{implied}'s; {what} is IPv{given}")
        implied, said = int(given), said or what
    return implied


def _failsafes(spec: str) -> Failsafes:
    if spec == "default":
        return Failsafes()
    if spec == "off":
        return Failsafes.off()
    try:
        ports = tuple(FailsafePort.parse(p) for p in spec.split(",") if p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Failsafes(ports, ports)


def cmd_validate(args: argparse.Namespace) -> int:
    resources = load_paths(args.filename, label_rule)
    Snapshot.build(resources)
    counts: dict[str, int] = {}
    for r in resources:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    print(f"valid: {len(resources)} resources ({detail})")
    return EXIT_OK


def _resolutions(path: str, address: str) -> tuple[list[str], list[str]]:
    """The names an agent's DNS name cache (its dns-cache.json) holds for `address` now,
    and a phrase for each: `resolved from NAME [via A, B] (TTL N s left)`."""
    import time

    from bulkhead.policy.names import NameCache

    cache = NameCache()
    now = time.time()
    try:
        cache.load(Path(path), now)
    except (OSError, ValueError) as e:
        raise UsageError(f"--dns-cache {path}: {e}") from None
    names, phrases = [], []
    for how in cache.reasons(address, now):
        via = f" via {', '.join(how.via)}" if how.via else ""
        names.append(how.name)
        phrases.append(f"resolved from {how.name}{via} (TTL {max(0, int(how.expiry - now))} "
                       "s left)")
    return names, phrases


def cmd_explain(args: argparse.Namespace) -> int:
    snapshot = Snapshot.build(load_paths(args.filename, label_rule))
    evaluator = Evaluator(snapshot, _failsafes(args.failsafe))
    version = _flow_version(args)
    # Without a version given or implied: the source's first address, and the
    # destination's of the same version.
    src = _resolve(snapshot, args.src, version)
    dst = _resolve(snapshot, args.dst, ipaddress.ip_address(src).version)
    names, phrases = _resolutions(args.dns_cache, dst) if args.dns_cache else ([], [])
    try:
        flow = Flow.make(src, dst,
                         args.proto, args.port, src_port=args.src_port,
                         icmp_type=args.icmp_type, icmp_code=args.icmp_code,
                         domains=frozenset([*(args.domain or ()), *names]))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if flow.carries_ports and flow.dst_port is None:
        raise UsageError(f"--port is needed for {args.proto}")
    verdict = evaluator.evaluate(flow)
    if args.json:
        print(json.dumps(_verdict_json(verdict), indent=2))
    else:
        print(explain_text(evaluator, verdict, phrases))
    return EXIT_FAILED if args.exit_code and not verdict.allowed else EXIT_OK


def _verdict_json(v: Verdict) -> dict[str, object]:
    """`allowed`: what happens on the wire; `policy_allowed`: what the policies decide
    (they differ where an endpoint observes); the four direction verdicts whole."""
    from dataclasses import asdict

    out: dict[str, object] = {"flow": str(v.flow), "allowed": v.allowed,
                              "policy_allowed": v.policy_allowed, "observed": v.observed,
                              "staged_allowed": v.staged_allowed}
    for key in ("egress", "ingress", "staged_egress", "staged_ingress"):
        out[key] = asdict(getattr(v, key))
    return out


def cmd_conformance(args: argparse.Namespace) -> int:
    if not 1 <= args.at_once <= MAX_AT_ONCE:
        raise UsageError(f"--at-once {args.at_once}: from 1 to {MAX_AT_ONCE}")
    cases = [c for path in args.cases for c in load_cases(path)]
    if args.only:
        cases = [c for c in cases if c.name in args.only or set(args.only) & set(c.tags)]
    results = run_cases_at_once(cases, DATAPLANES[args.dataplane], args.at_once)
    if args.json:
        print(json.dumps(report_json(results), indent=2))
    else:
        print(report_text(results, args.dataplane))
    return EXIT_FAILED if any(r.failed for r in results) else EXIT_OK


def cmd_selector(args: argparse.Namespace) -> int:
    selector = parse(args.selector)
    print(selector)
    if args.labels is None:
        return EXIT_OK
    labels: dict[str, str] = {}
    for item in args.labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--labels {item!r}: expected key=value")
        labels[key] = value
    matched = selector.matches(labels)
    print("matches" if matched else "does not match")
    return EXIT_OK if matched else EXIT_FAILED


def cmd_pki(args: argparse.Namespace) -> int:
    from bulkhead import pki

    directory = Path(args.dir)
    try:
        if args.pki_command == "init":
            print(f"CA written: {pki.init_ca(directory, force=args.force)}")
        elif args.pki_command in ("revoke", "crl") and args.days is not None \
                and args.days < 1:
            raise UsageError("--days must be at least 1")
        elif args.pki_command == "revoke":
            serial = None if args.serial is None else pki.parse_serial(args.serial)
            done = pki.revoke(directory, name=args.name, serial=serial, reason=args.reason,
                              days=args.days or pki.CRL_DAYS)
            for number in done.added:
                print(f"revoked: serial {pki.serial_hex(number)}")
            for number in done.already:
                print(f"already revoked: serial {pki.serial_hex(number)}")
            print(f"CRL: {done.path}")
        elif args.pki_command == "crl":
            days = args.days or pki.CRL_DAYS
            path, count = pki.write_crl(directory, days=days)
            print(f"CRL written: {path} ({count} revoked; next update in {days} days)")
        else:
            crt, key = pki.issue(directory, args.name, role=None if args.server else args.role,
                                 server=args.server, hosts=tuple(args.host or ()),
                                 tiers=tuple(args.tier or ()),
                                 out=Path(args.out) if args.out else None,
                                 replace=args.force)
            print(f"certificate: {crt}\nkey:         {key}")
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from bulkhead.demo.run import main as demo_main

    return demo_main(["--root", args.root])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bulkhead", description="Label-based microsegmentation for Ansible-managed hosts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate resource files (YAML/JSON, folders, -)")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("explain", help="the verdict for one flow, and why")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH")
    p.add_argument("--from", dest="src", required=True, metavar="HOST|IP")
    p.add_argument("--to", dest="dst", required=True, metavar="HOST|IP")
    p.add_argument("--proto", default="TCP", help="TCP, UDP, ICMP, ICMPv6, SCTP or a number")
    family = p.add_mutually_exclusive_group()
    family.add_argument("-4", dest="version", action="store_const", const=4,
                        help="an IPv4 flow: hosts named by --from/--to at their IPv4 address")
    family.add_argument("-6", dest="version", action="store_const", const=6,
                        help="an IPv6 flow: hosts named by --from/--to at their IPv6 address "
                        "(ICMPv6 implies it, ICMP implies -4; otherwise the source's first "
                        "expectedIP decides)")
    p.add_argument("--port", type=int, help="destination port")
    p.add_argument("--src-port", type=int, help="source port (unknown if not given)")
    p.add_argument("--icmp-type", type=int)
    p.add_argument("--icmp-code", type=int)
    p.add_argument("--domain", action="append", help="a name the destination resolved from")
    p.add_argument("--dns-cache", metavar="FILE",
                   help="an agent's DNS name cache (STATE_DIR/dns-cache.json): the names "
                   "the destination resolved from, as that agent knows them now")
    p.add_argument("--failsafe", default="default",
                   help="'default' (Calico's and the server's), 'off', or a list: tcp:22,...")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--exit-code", action="store_true", help="exit 1 if the flow is denied")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("conformance", help="run conformance case files")
    csub = p.add_subparsers(dest="conformance_command", required=True)
    run = csub.add_parser("run", help="run cases and compare with their expectations")
    run.add_argument("cases", nargs="+", metavar="CASES.yaml|DIR")
    run.add_argument("--dataplane", choices=sorted(DATAPLANES), default="model")
    run.add_argument("--json", action="store_true")
    run.add_argument("--only", action="append", metavar="NAME|TAG",
                     help="run only the cases with this name or tag")
    run.add_argument("--at-once", type=int, default=1, metavar="N",
                     help=f"run the cases on N dataplanes at once, 1 to {MAX_AT_ONCE} "
                     "(nftables: a lab each, conf, conf2, ...); the report is the same")
    run.set_defaults(func=cmd_conformance)

    p = sub.add_parser("pki", help="create a CA and certificates for mutual TLS")
    psub = p.add_subparsers(dest="pki_command", required=True)
    init = psub.add_parser("init", help="create ca.crt and ca.key")
    init.add_argument("--dir", default="/etc/bulkhead/pki")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=cmd_pki)
    iss = psub.add_parser("issue", help="issue a client or server certificate")
    iss.add_argument("name", help="CN: the node name for an agent, a user or host name")
    iss.add_argument("--dir", default="/etc/bulkhead/pki", help="where the CA is")
    iss.add_argument("--out", help="where to write NAME.crt and NAME.key (default --dir)")
    kind = iss.add_mutually_exclusive_group(required=True)
    kind.add_argument("--role", choices=["admin", "viewer", "agent"])
    kind.add_argument("--server", action="store_true", help="a server certificate")
    iss.add_argument("--host", action="append", help="server name or IP (repeatable)")
    iss.add_argument("--tier", action="append", help="limit an admin to this tier")
    iss.add_argument("--force", action="store_true",
                     help="issue again over an existing NAME.crt and NAME.key")
    iss.set_defaults(func=cmd_pki)
    rev = psub.add_parser("revoke", help="add certificates to the CA's CRL (crl.pem)")
    rev.add_argument("name", nargs="?",
                     help="revoke every certificate issued to this name (CN)")
    rev.add_argument("--serial", help="revoke this serial instead (hex, as openssl prints it)")
    rev.add_argument("--dir", default="/etc/bulkhead/pki", help="where the CA is")
    rev.add_argument("--reason", help="key-compromise, superseded, affiliation-changed, "
                     "cessation-of-operation, privilege-withdrawn or unspecified")
    rev.add_argument("--days", type=int, help="the CRL's nextUpdate, in days (default 30)")
    rev.set_defaults(func=cmd_pki)
    crl = psub.add_parser("crl", help="write crl.pem again, signed now (empty if none yet)")
    crl.add_argument("--dir", default="/etc/bulkhead/pki", help="where the CA is")
    crl.add_argument("--days", type=int, help="the CRL's nextUpdate, in days (default 30)")
    crl.set_defaults(func=cmd_pki)

    add_commands(sub)
    add_flows_command(sub)
    add_dns_command(sub)
    add_preview_command(sub)
    add_lab_commands(sub)

    p = sub.add_parser("demo", help="make demo: an example inventory enforced on a lab of hosts")
    p.add_argument("--root", default=".", help="Bulkhead's repository (default: .)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("selector", help="print a selector's canonical form; test labels")
    p.add_argument("selector")
    p.add_argument("--labels", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_selector)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "remote", False):
            return run_remote(args.func, args)
        code: int = args.func(args)
        return code
    except ValidationError as e:
        print(printable(f"error: {e}"), file=sys.stderr)
        return EXIT_FAILED
    except (SelectorError, CaseError) as e:
        print(printable(f"error: {e}"), file=sys.stderr)
        return EXIT_USAGE
    except (LoadError, UsageError, ValueError) as e:
        print(printable(f"error: {e}"), file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
