"""`make demo`: from an example inventory to enforced microsegmentation on a lab of hosts.

The lab is built from the inventory itself: `ansible-inventory` (with the
`bulkhead.microseg.endpoints` plugin) gives the hosts, their addresses and the port each
one serves; a testbed (bulkhead-server and one bulkhead-agent per host, mTLS) comes up in
lab "demo"; real probes give the truth table before; a real `ansible-playbook` syncs the
host endpoints and applies the policies; real probes give the table after, which is
checked against the reference evaluator on the store's own resources. Everything the
demo makes lives in the lab's namespaces and its state dir, so `bulkhead lab down --name
demo` (`make demo-down`) removes all of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bulkhead.client import resource_path
from bulkhead.lab.kernel import LabError
from bulkhead.lab.lab import Lab
from bulkhead.lab.netns import list_labs, teardown
from bulkhead.lab.probe import ProbeSpec
from bulkhead.model import Snapshot, dump_yaml, parse_resource
from bulkhead.policy import Evaluator, Flow
from bulkhead.policy.explain import explain_text
from bulkhead.testbed import BIN, Testbed

LAB = "demo"
PROBE_TIMEOUT = 1.0
PLAYBOOK = "playbooks/demo.yml"
EXAMPLES = "inventory-examples"


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """A column of the truth table: a host and the TCP port it serves."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    hosts: list[str]
    addresses: dict[str, list[str]]      # host -> expected IPs (IPv4 first)
    endpoints: dict[str, dict[str, Any]]  # host -> the HostEndpoint the plugin computed
    targets: list[Target]


Table = dict[tuple[str, Target], bool]   # (from, to) -> allowed


class Demo:
    def __init__(self, root: Path, out: TextIO = sys.stdout) -> None:
        self.root = root.resolve()
        self.examples = self.root / EXAMPLES
        self.out = out
        self.started = time.monotonic()
        for needed in (self.examples / "ansible.cfg", self.root / PLAYBOOK):
            if not needed.exists():
                raise DemoError(f"{needed} is missing: run the demo from Bulkhead's "
                                "repository root (make demo)")

    # -- output -----------------------------------------------------------------------
    def step(self, text: str) -> None:
        print(f"\n==> {text}  [{time.monotonic() - self.started:5.1f} s]", file=self.out,
              flush=True)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- Ansible ----------------------------------------------------------------------
    def ansible_env(self, home: Path) -> dict[str, str]:
        """Ansible's settings for the demo: everything it writes (fact cache, temp files)
        goes under `home`."""
        env = dict(os.environ)
        env.update(ansible_vars(self.examples, home))
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def inventory(self, home: Path) -> Inventory:
        seed_fact_cache(self.examples / "facts", home / "facts")
        proc = subprocess.run([str(BIN / "ansible-inventory"), "--list"], cwd=self.examples,
                              env=self.ansible_env(home), capture_output=True, text=True,
                              timeout=120, check=False)
        if proc.returncode != 0:
            raise DemoError(f"ansible-inventory failed:\n{proc.stderr.strip()}")
        return read_inventory(plain(json.loads(proc.stdout)))

    def playbook(self, bed: Testbed) -> None:
        cmd = [str(BIN / "ansible-playbook"), str(self.root / PLAYBOOK)]
        self.say("    $ cd inventory-examples && ansible-playbook ../" + PLAYBOOK)
        seed_fact_cache(self.examples / "facts", bed.dir / "ansible" / "facts")
        env = {**self.ansible_env(bed.dir / "ansible"), **client_env(bed)}
        proc = subprocess.Popen(cmd, cwd=self.examples, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                self.say("    " + line.rstrip())
        if proc.wait(timeout=300) != 0:
            raise DemoError(f"ansible-playbook failed (exit {proc.returncode}); see above")

    # -- the run ----------------------------------------------------------------------
    def run(self) -> int:
        self.step("Reading the example inventory (bulkhead.microseg.endpoints: facts -> labels)")
        with tempfile.TemporaryDirectory(prefix="bulkhead-demo-") as home:
            inv = self.inventory(Path(home))
        self.say(f"    {len(inv.hosts)} hosts: {' '.join(inv.hosts)}")
        if LAB in list_labs():
            self.step(f"Removing the previous demo lab {LAB!r}")
            teardown(LAB)
        self.step(f"Building lab {LAB!r}: {len(inv.hosts)} hosts as network namespaces, "
                  "bulkhead-server (SQLite, mTLS) and one bulkhead-agent per host")
        bed = Testbed(LAB, inv.hosts)
        bed.up()
        bed.lab.set_addresses_many(inv.addresses)
        for host in inv.hosts:
            ports = [t.port for t in inv.targets if t.host == host]
            bed.lab.listen(host, tcp=ports)
        write_client_files(bed, self.examples)

        self.step("Before: what each host reaches now (nothing enforced yet)")
        before = probe_table(bed.lab, inv)
        self.say(render_table(inv, before))

        self.step("Onboarding and enforcing with Ansible")
        self.playbook(bed)

        self.step("Host endpoints in the store (labels from inventory facts)")
        resources = store_resources(bed)
        (bed.dir / "store.yaml").write_text(dump_yaml(resources))
        for hep in sorted((r for r in resources if r.kind == "HostEndpoint"),
                          key=lambda r: r.name):
            dumped = hep.dump()
            labels = ",".join(f"{k}={v}" for k, v in
                              sorted((dumped["metadata"].get("labels") or {}).items()))
            ips = ",".join(dumped["spec"].get("expectedIPs", []))
            self.say(f"    {hep.name:<10} {ips:<26} {labels}")

        self.step("After: what each host reaches now, enforced by nftables in every host")
        after = probe_table(bed.lab, inv)
        self.say(render_table(inv, after))
        evaluator = Evaluator(Snapshot.build(resources))
        expected = reference_table(evaluator, inv)
        wrong = sorted(f"{src} -> {t}" for (src, t), ok in after.items()
                       if expected[(src, t)] != ok)
        if wrong:
            raise DemoError("the kernel and the reference evaluator disagree on "
                            f"{len(wrong)} flows: {', '.join(wrong)}")
        self.say(f"    the reference evaluator agrees on all {len(after)} flows")

        self.step("Why: bulkhead explain, for one denied and one allowed flow")
        for want in (False, True):
            src, target = next(k for k, ok in after.items() if ok is want)
            flow = Flow.make(inv.addresses[src][0], inv.addresses[target.host][0], "TCP",
                             target.port)
            self.say(f"    $ bulkhead explain -f {bed.dir}/store.yaml --from {src} "
                     f"--to {target.host} --port {target.port}")
            for line in explain_text(evaluator, evaluator.evaluate(flow)).splitlines():
                self.say("    " + line)
            self.say()

        self.step(f"Done in {time.monotonic() - self.started:.0f} s; the lab keeps running")
        denied = next(k for k, ok in after.items() if not ok)
        self.say(f"Explore: . {bed.dir}/env.sh; bulkhead get hostendpoints -o wide; "
                 f"bulkhead explain -f {bed.dir}/store.yaml --from {denied[0]} "
                 f"--to {denied[1].host} --port {denied[1].port}; "
                 f"bulkhead lab exec {inv.hosts[0]}")
        self.say("Remove:  make demo-down   (every namespace, process and file of the demo)")
        return 0


# -- pure pieces (tested without a lab) ----------------------------------------------------
def read_inventory(listing: Mapping[str, Any]) -> Inventory:
    """Hosts, addresses, host endpoints and served ports from `ansible-inventory --list`."""
    hostvars: dict[str, dict[str, Any]] = listing.get("_meta", {}).get("hostvars", {})
    hosts = sorted(hostvars, key=lambda h: _first_ip(hostvars[h]))
    addresses: dict[str, list[str]] = {}
    endpoints: dict[str, dict[str, Any]] = {}
    targets: list[Target] = []
    for host in hosts:
        hv = hostvars[host]
        hep = hv.get("bulkhead_host_endpoint")
        if not isinstance(hep, dict):
            raise DemoError(f"host {host}: no bulkhead_host_endpoint; is the "
                            "bulkhead.microseg.endpoints inventory plugin configured?")
        endpoints[host] = hep
        ips = [str(ip) for ip in hep.get("spec", {}).get("expectedIPs", [])]
        if not ips:
            raise DemoError(f"host {host}: its HostEndpoint has no expectedIPs")
        addresses[host] = sorted(ips, key=lambda ip: ":" in ip)
        port = (hv.get("service_ports") or {}).get(hv.get("app"))
        if port is not None:
            targets.append(Target(host, int(port)))
    return Inventory(hosts, addresses, endpoints, targets)


def plain(value: Any) -> Any:
    """`ansible-inventory --list` JSON without its {"__ansible_unsafe": v} wrappers."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _first_ip(hv: Mapping[str, Any]) -> tuple[int, ...]:
    ips = (hv.get("bulkhead_host_endpoint") or {}).get("spec", {}).get("expectedIPs") or []
    v4 = [ip for ip in ips if ":" not in ip]
    return tuple(int(part) for part in v4[0].split(".")) if v4 else (999,)


def probe_table(lab: Lab, inv: Inventory) -> Table:
    """Real TCP probes from every host to every other host's service port, over IPv4.
    "open" and "refused" reached the host (allowed); "blocked" did not."""
    cells = [(src, t) for src in inv.hosts for t in inv.targets if t.host != src]
    results = lab.probe_many([ProbeSpec(src, inv.addresses[t.host][0], "tcp", t.port,
                                        timeout=PROBE_TIMEOUT) for src, t in cells])
    return {cell: r.outcome != "blocked" for cell, r in zip(cells, results, strict=True)}


def reference_table(evaluator: Evaluator, inv: Inventory) -> Table:
    table: Table = {}
    for src in inv.hosts:
        for t in inv.targets:
            if t.host != src:
                flow = Flow.make(inv.addresses[src][0], inv.addresses[t.host][0], "TCP",
                                 t.port)
                table[(src, t)] = evaluator.evaluate(flow, trace=False).allowed
    return table


def render_table(inv: Inventory, table: Table,
                 word: Callable[[bool], str] = lambda ok: "open" if ok else "BLOCKED") -> str:
    """Rows: from; columns: to (host and port)."""
    width = max(10, *(len(str(t)) + 2 for t in inv.targets))
    first = max(len("from \\ to"), *(len(h) for h in inv.hosts)) + 3
    lines = ["    " + "from \\ to".ljust(first) + "".join(str(t).ljust(width)
                                                        for t in inv.targets)]
    for src in inv.hosts:
        cells = ["-" if t.host == src else word(table[(src, t)]) for t in inv.targets]
        lines.append("    " + src.ljust(first) + "".join(c.ljust(width) for c in cells))
    return "\n".join(line.rstrip() for line in lines)


def parse_table(text: str) -> dict[tuple[str, str], bool]:
    """The inverse of `render_table` (for tests): (from, "host:port") -> allowed."""
    rows = [line.split() for line in text.strip().splitlines()]
    header = rows[0][3:]   # after "from \ to"
    out: dict[tuple[str, str], bool] = {}
    for row in rows[1:]:
        for column, cell in zip(header, row[1:], strict=True):
            if cell != "-":
                out[(row[0], column)] = cell == "open"
    return out


# -- the store and the client ------------------------------------------------------------
def store_resources(bed: Testbed) -> list[Any]:
    kinds = ("Tier", "GlobalNetworkPolicy", "StagedGlobalNetworkPolicy", "GlobalNetworkSet",
             "HostEndpoint", "Profile")
    docs = [item for kind in kinds
            for item in bed.request("GET", resource_path(kind)).get("items", [])]
    return [parse_resource(doc) for doc in docs]


def client_env(bed: Testbed) -> dict[str, str]:
    return {"BULKHEAD_SERVER": bed.server_url, "BULKHEAD_CA": str(bed.pki_dir / "ca.crt"),
            "BULKHEAD_CERT": str(bed.pki_dir / "admin.crt"),
            "BULKHEAD_KEY": str(bed.pki_dir / "admin.key")}


def ansible_vars(examples: Path, home: Path) -> dict[str, str]:
    return {"ANSIBLE_CONFIG": str(examples / "ansible.cfg"),
            "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(home / "facts"),
            "ANSIBLE_COLLECTIONS_PATH": str(BIN.parent / "collections"),
            "ANSIBLE_HOME": str(home), "ANSIBLE_NOCOLOR": "1"}


def seed_fact_cache(recorded: Path, cache_dir: Path) -> None:
    """Put each host's recorded facts (facts/HOST.json, what `setup` returned) into
    Ansible's jsonfile fact cache, in the format of the installed ansible-core."""
    from ansible.plugins.loader import cache_loader  # type: ignore[import-untyped]

    cache = cache_loader.get("jsonfile", _uri=str(cache_dir), _timeout=0, _prefix="")
    for path in sorted(recorded.glob("*.json")):
        cache.set(path.stem, json.loads(path.read_text()))


def write_client_files(bed: Testbed, examples: Path) -> None:
    """env.sh: the CLI's connection and Ansible's settings, to explore the demo."""
    values = {**client_env(bed), **ansible_vars(examples, bed.dir / "ansible")}
    lines = [f"export {k}={v}" for k, v in values.items()]
    lines.append(f'export PATH="{BIN}:$PATH"')
    (bed.dir / "env.sh").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bulkhead-demo", description=__doc__)
    parser.add_argument("--root", default=".", help="Bulkhead's repository (default: .)")
    args = parser.parse_args(argv)
    try:
        return Demo(Path(args.root)).run()
    except (DemoError, LabError) as e:
        print(f"\ndemo failed: {e}\n(make demo-down removes what it made)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
