"""`bulkhead demo --root REPO`: the demo's steps, each printed with the seconds since
the start."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from bulkhead.client import resource_path
from bulkhead.demo import DemoError
from bulkhead.demo.ansible_cli import PLAYBOOK, Ansible
from bulkhead.demo.tables import (
    Inventory,
    Table,
    flow,
    probe_table,
    read_inventory,
    reference_table,
    render_table,
)
from bulkhead.lab import LabError, list_labs, teardown
from bulkhead.model import Resource, Snapshot, dump_yaml, parse_resource
from bulkhead.policy import Evaluator
from bulkhead.policy.explain import explain_text
from bulkhead.testbed import BIN, Testbed

LAB = "demo"
STORE_KINDS = ("Tier", "GlobalNetworkPolicy", "StagedGlobalNetworkPolicy", "GlobalNetworkSet",
               "HostEndpoint", "Profile")


class Demo:
    def __init__(self, root: Path, out: TextIO = sys.stdout) -> None:
        self.root = root.resolve()
        self.out = out
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        print(f"\n==> {text}  [{time.monotonic() - self.started:5.1f} s]", file=self.out,
              flush=True)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> int:
        # Ansible's first home, until the lab's state dir exists to hold the second.
        with tempfile.TemporaryDirectory(prefix="bulkhead-demo-") as first_home:
            return self._run(Ansible(self.root, Path(first_home)))

    def _run(self, reader: Ansible) -> int:
        self.step("Reading the example inventory (bulkhead.microseg.endpoints: facts -> labels)")
        reader.link_collection()
        reader.cache_facts()
        inv = read_inventory(reader.inventory())
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
            bed.lab.listen(host, tcp=[t.port for t in inv.targets if t.host == host])
        ansible = Ansible(self.root, bed.dir / "ansible")
        ansible.link_collection()
        ansible.take_facts(reader)
        write_env_sh(bed, ansible)

        self.step("Before: what each host reaches now (nothing enforced yet)")
        self.say(render_table(inv, probe_table(bed.lab, inv)))

        self.step("Onboarding and enforcing with Ansible")
        self.say(f"    $ cd {ansible.examples.name} && ansible-playbook ../{PLAYBOOK}")
        ansible.playbook(client_env(bed), lambda line: self.say("    " + line))

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
        self.check(inv, after, evaluator)
        self.explain(bed, inv, after, evaluator)

        self.step(f"Done in {time.monotonic() - self.started:.0f} s; the lab keeps running")
        denied = next(k for k, ok in after.items() if not ok)
        self.say(f"Explore: . {bed.dir}/env.sh; bulkhead get hostendpoints -o wide; "
                 f"bulkhead explain -f {bed.dir}/store.yaml --from {denied[0]} "
                 f"--to {denied[1].host} --port {denied[1].port}; "
                 f"bulkhead lab exec {inv.hosts[0]}")
        self.say("Remove:  make demo-down   (every namespace, process and file of the demo)")
        return 0

    def check(self, inv: Inventory, after: Table, evaluator: Evaluator) -> None:
        expected = reference_table(evaluator, inv)
        wrong = sorted(f"{src} -> {t}" for (src, t), ok in after.items()
                       if expected[(src, t)] != ok)
        if wrong:
            raise DemoError("the kernel and the reference evaluator disagree on "
                            f"{len(wrong)} flows: {', '.join(wrong)}")
        self.say(f"    the reference evaluator agrees on all {len(after)} flows")

    def explain(self, bed: Testbed, inv: Inventory, after: Table,
                evaluator: Evaluator) -> None:
        self.step("Why: bulkhead explain, for one denied and one allowed flow")
        for want in (False, True):
            src, target = next(k for k, ok in after.items() if ok is want)
            self.say(f"    $ bulkhead explain -f {bed.dir}/store.yaml --from {src} "
                     f"--to {target.host} --port {target.port}")
            verdict = evaluator.evaluate(flow(inv, src, target))
            for line in explain_text(evaluator, verdict).splitlines():
                self.say("    " + line)
            self.say()


def store_resources(bed: Testbed) -> list[Resource]:
    docs = [item for kind in STORE_KINDS
            for item in bed.request("GET", resource_path(kind)).get("items", [])]
    return [parse_resource(doc) for doc in docs]


def client_env(bed: Testbed) -> dict[str, str]:
    """The CLI's (and the collection's modules') connection to the testbed, as admin."""
    return {"BULKHEAD_SERVER": bed.server_url, "BULKHEAD_CA": str(bed.pki_dir / "ca.crt"),
            "BULKHEAD_CERT": str(bed.pki_dir / "admin.crt"),
            "BULKHEAD_KEY": str(bed.pki_dir / "admin.key")}


def write_env_sh(bed: Testbed, ansible: Ansible) -> None:
    """env.sh: the CLI's connection and Ansible's settings, to explore the demo."""
    lines = [f"export {k}={v}" for k, v in {**client_env(bed), **ansible.settings()}.items()]
    lines.append(f'export PATH="{BIN}:$PATH"')
    (bed.dir / "env.sh").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bulkhead demo", description=__doc__)
    parser.add_argument("--root", default=".", help="Bulkhead's repository (default: .)")
    args = parser.parse_args(argv)
    try:
        return Demo(Path(args.root)).run()
    except (DemoError, LabError) as e:
        print(f"\ndemo failed: {e}\n(make demo-down removes what it made)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
