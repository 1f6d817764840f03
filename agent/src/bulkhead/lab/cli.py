"""`bulkhead lab ...`: build, inspect, probe and remove labs from the shell.

Exit codes: 0 done (for `probe`: the connection was open); 1 `probe` saw refused or
blocked; 2 bad usage or a lab operation failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from bulkhead.lab import forward
from bulkhead.lab.kernel import LabError
from bulkhead.lab.lab import Lab
from bulkhead.lab.layout import DEFAULT_NET4, DEFAULT_NET6
from bulkhead.lab.names import SWITCH
from bulkhead.lab.netns import list_labs, remove_all, teardown

EXIT_OK, EXIT_NOT_OPEN, EXIT_USAGE = 0, 1, 2
DEFAULT_NAME = "demo"
ALL = "all"


def _status_text(lab: Lab) -> str:
    st = lab.status()
    lines = [f"lab {st['name']}: switch {st['switch_ns']}"
             + ("" if st["switch_present"] else " (missing)"),
             f"  service address  {st['service_address']}  {st['service_address6']}"
             "  (on br0, from lab hosts)",
             f"  uplink           {st['uplink']} {st['uplink_root_address']} -> "
             f"{st['uplink_address']}  (from this namespace)"]
    for f in st["forwards"]:
        lines.append(f"  forward          tcp {st['uplink_address']}:{f['port']} -> "
                     f"{f['host']}:{f['host_port']}")
    width = max(len(h) for h in st["hosts"])
    for name, h in st["hosts"].items():
        flags = []
        if not h["ns_present"]:
            flags.append("namespace missing")
        if not h["hostd"]:
            flags.append("hostd not running")
        if h["machine"]:
            flags.append(f"machine: systemd pid {h['machine']['pid']}, {h['machine']['state']}")
        note = f"  ({', '.join(flags)})" if flags else ""
        lines.append(f"  {name.ljust(width)}  {h['ns']}  {' '.join(h['addresses'])}{note}")
    for proc in st["spawned"]:
        lines.append(f"  process {proc['pid']} in {proc['where']}: {' '.join(proc['argv'])}")
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    hosts: list[str] | int = args.host or args.hosts
    machines: bool | list[str] = False
    if args.machines == ALL:
        machines = True
    elif args.machines:
        machines = [h for h in args.machines.split(",") if h]
    forwards = [forward.parse(spec) for spec in args.forward or ()]
    lab = Lab(args.name, hosts, net4=args.net4, net6=args.net6, machines=machines,
              forwards=forwards).up()
    print(_status_text(lab))
    return EXIT_OK


def cmd_forward(args: argparse.Namespace) -> int:
    lab = Lab.load(args.name)
    lab.forward([forward.parse(spec) for spec in args.spec])
    print(_status_text(lab))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        removed = remove_all()
        print(f"removed: {', '.join(removed)}" if removed else "no labs")
        return EXIT_OK
    if args.name not in list_labs():
        print(f"no lab {args.name}")
        return EXIT_OK
    try:
        Lab.load(args.name).down()
    except LabError:
        teardown(args.name)  # no (readable) state file: remove by name
    print(f"removed: {args.name}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_labs()
    labs: list[Lab] = []
    broken: list[str] = []
    for name in names:
        try:
            labs.append(Lab.load(name))
        except LabError:
            broken.append(name)
    if args.json:
        out: dict[str, Any] = {lab.name: lab.status() for lab in labs}
        out.update({name: None for name in broken})
        print(json.dumps(out, indent=2))
    else:
        for lab in labs:
            print(_status_text(lab))
        for name in broken:
            print(f"lab {name}: leftovers without a state file "
                  f"(`bulkhead lab down --name {name}` removes them)")
        if not names:
            print("no labs")
    return EXIT_USAGE if args.name and not labs else EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    lab = Lab.load(args.name)
    lab.listen(args.host, tcp=args.tcp or (), udp=args.udp or (), replace=args.replace)
    ports = lab.listening(args.host)
    print(f"{args.host} listens on tcp {ports['tcp'] or '-'}, udp {ports['udp'] or '-'}")
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    lab = Lab.load(args.name)
    result = lab.probe(args.src, args.dst, args.proto, args.port, timeout=args.timeout,
                       src_ip=args.src_ip, family=6 if args.ipv6 else 4)
    print(str(result) if args.verbose else result.outcome)
    return EXIT_OK if result.open else EXIT_NOT_OPEN


def cmd_exec(args: argparse.Namespace) -> int:
    lab = Lab.load(args.name)
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        command = [os.environ.get("SHELL") or "/bin/bash"]
    argv = lab.enter(args.host, command)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except LabError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return run


def add_commands(sub: Any) -> None:
    """Add `lab` and its subcommands to the `bulkhead` parser's subparsers."""
    p = sub.add_parser("lab", help="lab hosts as network namespaces: up, down, probe, exec")
    lsub = p.add_subparsers(dest="lab_command", required=True)

    def named(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name", default=DEFAULT_NAME,
                       help=f"lab name, 1-8 of [a-z0-9] (default {DEFAULT_NAME})")

    q = lsub.add_parser("up", help="build a lab (an existing one of that name goes first)")
    named(q)
    q.add_argument("--hosts", type=int, default=2, help="number of hosts h1..hN (default 2)")
    q.add_argument("--host", action="append", metavar="NAME",
                   help="a host by name (repeatable; instead of --hosts)")
    q.add_argument("--net4", default=DEFAULT_NET4, help=f"IPv4 net (default {DEFAULT_NET4})")
    q.add_argument("--net6", default=DEFAULT_NET6, help=f"IPv6 net (default {DEFAULT_NET6})")
    q.add_argument("--machines", nargs="?", const=ALL, metavar="HOST,HOST",
                   help="boot systemd in every host (or in the hosts named): lab machines")
    q.add_argument("--forward", action="append", metavar="PORT=HOST[:PORT]",
                   help="lead TCP PORT of the uplink address (reached from this namespace) "
                        "to a lab host (repeatable)")
    q.set_defaults(func=_guarded(cmd_up))

    q = lsub.add_parser("forward", help="set the TCP ports led from the uplink address to "
                                        "lab hosts (none: remove every forward)")
    named(q)
    q.add_argument("spec", nargs="*", metavar="PORT=HOST[:PORT]")
    q.set_defaults(func=_guarded(cmd_forward))

    q = lsub.add_parser("down", help="remove a lab, or every lab with --all")
    named(q)
    q.add_argument("--all", action="store_true", help="remove every lab (bhl-*)")
    q.set_defaults(func=_guarded(cmd_down))

    q = lsub.add_parser("status", help="show labs, their hosts and addresses")
    q.add_argument("--name", help="only this lab")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_guarded(cmd_status))

    q = lsub.add_parser("listen", help="open TCP (accept) and UDP (echo) ports on a host")
    named(q)
    q.add_argument("host")
    q.add_argument("--tcp", type=int, action="append", metavar="PORT")
    q.add_argument("--udp", type=int, action="append", metavar="PORT")
    q.add_argument("--replace", action="store_true", help="close the ports not named")
    q.set_defaults(func=_guarded(cmd_listen))

    q = lsub.add_parser("probe", help="open, refused or blocked? (exit 0 only if open)")
    named(q)
    q.add_argument("src", metavar="FROM", help="lab host the probe starts from")
    q.add_argument("dst", metavar="TO", help="lab host name or IP address")
    q.add_argument("--proto", type=str.lower, choices=["tcp", "udp", "icmp"], default="tcp")
    q.add_argument("--port", type=int)
    q.add_argument("--timeout", type=float, default=1.0, help="seconds (default 1)")
    q.add_argument("--src-ip", help="source address (a host can have several)")
    q.add_argument("-6", dest="ipv6", action="store_true",
                   help="TO names a host: use its IPv6 address")
    q.add_argument("-v", "--verbose", action="store_true", help="addresses, detail, time")
    q.set_defaults(func=_guarded(cmd_probe))

    q = lsub.add_parser("exec", help="run a command (default: a shell) in a lab host "
                                     "(in all namespaces of a lab machine)")
    named(q)
    q.add_argument("host", help=f"lab host name, or {SWITCH} for the switch namespace")
    q.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    q.set_defaults(func=_guarded(cmd_exec))
