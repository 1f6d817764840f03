"""`bulkhead demo --root REPO`: the demo's steps, each printed with the seconds since
the start."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from bulkhead.client import resource_path
from bulkhead.client.flows import flows, preview
from bulkhead.demo import DemoError
from bulkhead.demo.ansible_cli import PLAYBOOK, Ansible
from bulkhead.demo.tables import (
    Inventory,
    Table,
    Target,
    flow,
    probe_table,
    read_inventory,
    reference_table,
    render_table,
    table_cells,
)
from bulkhead.lab import LabError, list_labs, teardown
from bulkhead.model import ENFORCEMENT_LABEL, Resource, Snapshot, dump_yaml, parse_resource
from bulkhead.policy import Evaluator
from bulkhead.policy.explain import explain_text
from bulkhead.policy.impact import proposed_state
from bulkhead.selector import parse
from bulkhead.testbed import BIN, Testbed

LAB = "demo"
FLUSH = 2            # seconds: the agents' flow-log interval in the demo
FLOWS_TIMEOUT = 30.0
SHOWN = 12           # preview groups printed per kind of change (the check reads them all)
AGENT_SETTINGS = {"flowLogs": {"enabled": True, "flushInterval": FLUSH}}
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
                  "bulkhead-server (SQLite, mTLS, flow logs) and one bulkhead-agent per host "
                  "(flow logs on)")
        bed = Testbed(LAB, inv.hosts, agent_settings=AGENT_SETTINGS)
        bed.up()
        bed.lab.set_addresses_many(inv.addresses)
        for host in inv.hosts:
            bed.lab.listen(host, tcp=[t.port for t in inv.targets if t.host == host])
        ansible = Ansible(self.root, bed.dir / "ansible")
        ansible.link_collection()
        ansible.take_facts(reader)
        write_env_sh(bed, ansible)

        self.step("Before: what each host reaches now (nothing enforced yet)")
        before = probe_table(bed.lab, inv)
        self.say(render_table(inv, before))

        self.step("Onboarding in observe mode and staging the policies, with Ansible")
        self.say(f"    $ cd {ansible.examples.name} && ansible-playbook ../{PLAYBOOK}")
        ansible.playbook(client_env(bed), lambda line: self.say("    " + line))

        self.step("Host endpoints in the store (labels from inventory facts)")
        resources = store_resources(bed)
        for hep in sorted((r for r in resources if r.kind == "HostEndpoint"),
                          key=lambda r: r.name):
            dumped = hep.dump()
            labels = ",".join(f"{k}={v}" for k, v in
                              sorted((dumped["metadata"].get("labels") or {}).items())
                              if k != ENFORCEMENT_LABEL)
            ips = ",".join(dumped["spec"].get("expectedIPs", []))
            mode = (dumped["metadata"].get("labels") or {}).get(ENFORCEMENT_LABEL, "")
            self.say(f"    {hep.name:<10} {mode:<8} {ips:<26} {labels}")
        staged = sorted(r.name for r in resources if r.kind == "StagedGlobalNetworkPolicy")
        self.say(f"    staged: {', '.join(staged)}")

        self.step("Staged: the same traffic again; observe mode blocks nothing, logs everything")
        started = time.time()
        during = probe_table(bed.lab, inv)
        self.say(render_table(inv, during))
        if during != before:
            changed = sorted(f"{src} -> {t}" for (src, t), ok in during.items()
                             if ok != before[(src, t)])
            raise DemoError(f"observe mode blocked traffic: {', '.join(changed)}")
        seen = self.wait_for_flows(bed, inv, started)
        self.say(f"    {seen['records']} flow records in the server, "
                 f"{seen['differs']} where the staged policies would deny, "
                 f"{seen['flows']} flows (both ends log a connection, each judging its own "
                 "side; bulkhead flows --staged-differs)")

        self.step("Preview: what promoting the staged policies and enforcing every host "
                  "would deny, from those flows")
        self.say(f"    $ bulkhead preview --enforce 'all()' --hours 1 --limit {SHOWN}")
        for line in self.cli(bed, "preview", "--enforce", "all()", "--hours", "1", "--limit",
                             str(SHOWN)).splitlines():
            self.say("    " + line)
        answer = preview(bed.connection(), enforce="all()", hours=1, limit=1000)
        predicted = self.check_preview(inv, answer, resources)
        if sorted(answer["promoted"]) != staged:
            raise DemoError(f"the preview promoted {answer['promoted']}, not {staged}")
        report = bed.dir / "preview.json"
        report.write_text(json.dumps(answer))
        self.say(f"    kept as {report.name}: the staged policies it judged, each at its "
                 "version (promotedVersions)")

        self.step("Enforcing: the staged policies promoted as previewed, then every host "
                  "to enforce mode")
        self.say(f"    $ bulkhead promote --preview {report.name}")
        for line in self.cli(bed, "promote", "--preview", str(report)).splitlines():
            self.say("    " + line)
        self.say(f"    $ ansible-playbook ../{PLAYBOOK} -e bulkhead_enforcement=enforce "
                 "-e bulkhead_stage=false")
        ansible.playbook(client_env(bed), lambda line: self.say("    " + line),
                         {"bulkhead_enforcement": "enforce", "bulkhead_stage": "false"})
        resources = store_resources(bed)
        (bed.dir / "store.yaml").write_text(dump_yaml(resources))

        self.step("After: what each host reaches now, enforced by nftables in every host")
        after = probe_table(bed.lab, inv)
        self.say(render_table(inv, after))
        evaluator = Evaluator(Snapshot.build(resources))
        self.check(inv, after, evaluator)
        wrong = sorted(f"{src} -> {t}" for (src, t), ok in after.items()
                       if ok == ((src, t) in predicted))
        if wrong:
            raise DemoError(f"the preview mispredicted {len(wrong)} flows: {', '.join(wrong)}")
        self.say(f"    the preview predicted all {len(predicted)} denied flows, and only those")
        self.explain(bed, inv, after, evaluator)

        self.step(f"Done in {time.monotonic() - self.started:.0f} s; the lab keeps running")
        denied = next(k for k, ok in after.items() if not ok)
        self.say(f"Explore: . {bed.dir}/env.sh; bulkhead get hostendpoints -o wide; "
                 f"bulkhead flows --action deny; "
                 f"bulkhead explain -f {bed.dir}/store.yaml --from {denied[0]} "
                 f"--to {denied[1].host} --port {denied[1].port}; "
                 f"bulkhead lab exec {inv.hosts[0]}")
        self.say("Remove:  make demo-down   (every namespace, process and file of the demo)")
        return 0

    def cli(self, bed: Testbed, *argv: str) -> str:
        """A `bulkhead` command as the admin of the lab's server; its standard output."""
        done = subprocess.run([str(BIN / "bulkhead"), *argv], env={**os.environ,
                                                                   **client_env(bed)},
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise DemoError(f"bulkhead {' '.join(argv)} failed (exit {done.returncode}):\n"
                            f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def wait_for_flows(self, bed: Testbed, inv: Inventory, since: float) -> dict[str, int]:
        """Until the server holds both ends' records of every probe (the agents flush
        every FLUSH seconds), at most FLOWS_TIMEOUT seconds."""
        wanted = {(reporter, src, t.host, t.port) for src, t in table_cells(inv)
                  for reporter in ("src", "dst")}
        deadline = time.monotonic() + FLOWS_TIMEOUT
        while True:
            found = flows(bed.connection(), since=since - 1, limit=10_000)["flows"]
            have = {(f["reporter"], f["src_name"], f["dst_name"], f["dst_port"])
                    for f in found if f["proto"] == 6}
            if wanted <= have:
                differs = [f for f in found if f["action"] != f["staged_action"]]
                return {"records": len(found), "differs": len(differs),
                        "flows": len({(f["src_name"], f["dst_name"], f["dst_port"])
                                      for f in differs})}
            if time.monotonic() > deadline:
                missing = sorted(wanted - have)[:5]
                raise DemoError(f"flow records of {len(wanted - have)} probes did not reach "
                                f"the server in {FLOWS_TIMEOUT:g} s, e.g. {missing}")
            time.sleep(0.5)

    def check_preview(self, inv: Inventory, answer: dict[str, Any],
                      resources: list[Resource]) -> set[tuple[str, Target]]:
        """The cells the preview says would be denied, checked against the reference
        evaluator on the same proposed state (staged promoted, every host enforcing)."""
        predicted = set()
        cells = set(table_cells(inv))
        for change in ("newlyDenied", "undecided"):
            for group in answer[change]:
                for src, t in cells:
                    if (group["src"]["name"], group["dst"]["name"]) == (src, t.host) and \
                            f"TCP/{t.port}" in group["ports"]:
                        if change == "undecided":
                            raise DemoError(f"the preview could not decide {src} -> {t}: "
                                            f"{group.get('why')}")
                        predicted.add((src, t))
        proposed, _ = proposed_state(resources, [], "all", parse("all()"))
        expected = {cell for cell, ok in reference_table(Evaluator(proposed), inv).items()
                    if not ok}
        if predicted != expected:
            raise DemoError("the preview and the reference evaluator disagree on "
                            f"{sorted(map(str, predicted ^ expected))}")
        self.say(f"    the reference evaluator agrees: {len(predicted)} of {len(cells)} "
                 "flows would be denied (a group above is one end's side of a flow)")
        return predicted

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
