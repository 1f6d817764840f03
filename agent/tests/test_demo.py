"""`make demo`, end to end: the printed "after" table against the reference evaluator,
then `make demo-down` leaves nothing behind. Plus the demo's pure pieces.

The end-to-end test runs what the two make targets run (checked with `make -n`) with
this interpreter's `bulkhead`, so it also runs from a checkout whose environment lives
elsewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.demo.run import LAB
from bulkhead.demo.tables import Inventory, Target, read_inventory, render_table
from bulkhead.lab import STATE_ROOT, list_labs
from bulkhead.lab.kernel import netns_names
from bulkhead.model import Snapshot, load_paths
from bulkhead.policy import Evaluator, Flow
from tests.labfixture import need_root

ROOT = Path(__file__).resolve().parents[2]
BULKHEAD = Path(sys.executable).parent / "bulkhead"
DEMO = [str(BULKHEAD), "demo", "--root", str(ROOT)]
DEMO_DOWN = [str(BULKHEAD), "lab", "down", "--name", LAB]


def parse_table(text: str) -> dict[tuple[str, str], bool]:
    """The inverse of `render_table`: (from, "host:port") -> allowed."""
    rows = [line.split() for line in text.strip().splitlines()]
    header = rows[0][3:]   # after "from \ to"
    out: dict[tuple[str, str], bool] = {}
    for row in rows[1:]:
        for column, cell in zip(header, row[1:], strict=True):
            if cell != "-":
                out[(row[0], column)] = cell == "open"
    return out


def _hep(name: str, *ips: str) -> dict[str, object]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"node": name, "expectedIPs": list(ips)}}


def test_read_inventory_orders_hosts_by_address_and_finds_service_ports() -> None:
    listing = {"_meta": {"hostvars": {
        "db": {"app": "pg", "service_ports": {"pg": 5432, "web": 443},
               "bulkhead_host_endpoint": _hep("db", "2001:2::12", "198.18.0.12")},
        "web": {"app": "web", "service_ports": {"pg": 5432, "web": 443},
                "bulkhead_host_endpoint": _hep("web", "198.18.0.10")},
        "bastion": {"app": "ssh", "service_ports": {},
                    "bulkhead_host_endpoint": _hep("bastion", "198.18.0.9")},
    }}}
    inv = read_inventory(listing)
    assert inv.hosts == ["bastion", "web", "db"]
    assert inv.addresses["db"] == ["198.18.0.12", "2001:2::12"]
    assert inv.targets == [Target("web", 443), Target("db", 5432)]


def test_read_inventory_without_the_plugin_says_so() -> None:
    with pytest.raises(Exception, match="host web: no bulkhead_host_endpoint"):
        read_inventory({"_meta": {"hostvars": {"web": {"app": "web"}}}})


def test_table_renders_and_parses_back() -> None:
    inv = Inventory(["a", "b", "c"], {}, {}, [Target("b", 80), Target("c", 5432)])
    table = {("a", Target("b", 80)): True, ("a", Target("c", 5432)): False,
             ("b", Target("c", 5432)): True, ("c", Target("b", 80)): False}
    text = render_table(inv, table)
    assert text.splitlines()[0].split() == ["from", "\\", "to", "b:80", "c:5432"]
    assert parse_table(text) == {("a", "b:80"): True, ("a", "c:5432"): False,
                                 ("b", "c:5432"): True, ("c", "b:80"): False}


def _step(output: str, title: str) -> str:
    """What the demo printed under the step whose heading starts with `title`."""
    match = re.search(rf"^==> {re.escape(title)}.*?\n(.*?)(?=^==> |\Z)", output, re.M | re.S)
    assert match, f"no step {title!r} in the demo's output:\n{output[-3000:]}"
    return match.group(1)


def _section(output: str, title: str) -> str:
    """The table printed under the step whose heading starts with `title`: its header
    and the rows after it (a host's name, then a cell per column)."""
    lines = [line for line in _step(output, title).splitlines() if line.startswith("    ")]
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["from", "\\", "to"])
    width = len(lines[start].split()) - 2
    rows = [lines[start]]
    for line in lines[start + 1:]:
        if len(line.split()) != width:
            break
        rows.append(line)
    return "\n".join(rows)


def _leftovers() -> list[str]:
    found = [ns for ns in netns_names() if ns.startswith(f"bhl-{LAB}-")]
    if (STATE_ROOT / LAB).exists():
        found.append(str(STATE_ROOT / LAB))
    links = subprocess.run(["ip", "-o", "link", "show", f"bhl-{LAB}"], capture_output=True,
                           text=True, check=False)
    if links.returncode == 0 and links.stdout.strip():
        found.append(f"link bhl-{LAB}")
    procs = subprocess.run(["pgrep", "-f", f"bulkhead-lab/{LAB}/"], capture_output=True,
                           text=True, check=False)
    found += [f"process {pid}" for pid in procs.stdout.split()]
    return found


def test_make_targets_run_the_demo_and_remove_it() -> None:
    for target, command in (("demo", "bulkhead demo --root"),
                            ("demo-down", "bulkhead lab down --name demo")):
        dry = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=ROOT,
                             env={**os.environ, "MAKEFLAGS": ""}, capture_output=True,
                             text=True, timeout=60, check=False)
        assert command in dry.stdout, dry.stdout + dry.stderr


def test_make_demo_end_to_end_then_demo_down_leaves_nothing() -> None:
    need_root()
    try:
        demo = subprocess.run(DEMO, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              check=False)
        assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
        out = demo.stdout
        assert LAB in list_labs()

        # Before: nothing enforced, every host reaches every service.
        before = parse_table(_section(out, "Before"))
        assert before and all(before.values()), before

        # Onboarded in observe mode, the policies staged: still nothing is blocked, and
        # the flow logs say what the staged policies would deny.
        onboarded = _step(out, "Host endpoints in the store")
        assert len(re.findall(r"^    \S+ +observe ", onboarded, re.M)) == 6, onboarded
        assert "staged: application.active-directory," in onboarded
        staged = parse_table(_section(out, "Staged"))
        assert staged == before
        records = re.search(r"(\d+) flow records in the server, (\d+) where the staged "
                            r"policies would deny", _step(out, "Staged"))
        assert records and int(records.group(2)) > 0, _step(out, "Staged")

        # The preview lists what enforcing would deny, checked by the demo against the
        # evaluator; and the after table denies exactly those flows.
        shown = _step(out, "Preview")
        assert re.search(r"Newly denied: \d+ connections", shown), shown
        assert "application|end-of-tier" in shown and "Undecided" in shown
        predicted = re.search(r"the reference evaluator agrees: (\d+) of 30 flows would be "
                              r"denied", shown)
        assert predicted, shown
        assert "GlobalNetworkPolicy security.dmz-egress created" in _step(out, "Enforcing")

        # After: the printed table is what the reference evaluator says of the policies
        # in inventory-examples/ and the host endpoints the inventory plugin made.
        after = parse_table(_section(out, "After"))
        resources = load_paths([ROOT / "inventory-examples" / "policies"])
        store = load_paths([STATE_ROOT / LAB / "store.yaml"])
        heps = {r.name: r for r in store if r.kind == "HostEndpoint"}
        assert len(heps) == 6, sorted(heps)
        evaluator = Evaluator(Snapshot.build([*resources, *heps.values()]))
        ip = {name: next(a for a in h.expected_ips if ":" not in a)  # type: ignore[attr-defined]
              for name, h in heps.items()}
        expected = {(src, col): evaluator.evaluate(
            Flow.make(ip[src], ip[col.split(":")[0]], "TCP", int(col.split(":")[1])),
            trace=False).allowed for (src, col) in after}
        assert after == expected
        assert len(after) == 30
        blocked = sum(not ok for ok in after.values())
        assert int(predicted.group(1)) == blocked
        assert f"the preview predicted all {blocked} denied flows, and only those" in out
        assert not after[("web-01", "db-01:5432")]       # dmz never reaches restricted
        assert after[("kafka-01", "zk-01:2181")]          # kafka and zookeeper talk
        assert after[("app-01", "ad-01:636")]             # trusted reaches LDAPS
        assert "security.dmz-egress" in out               # explain names the deny
        assert out.rstrip().splitlines()[-1].startswith("Remove:  make demo-down")
        # The "Explore" line's commands work as printed.
        explore = subprocess.run(
            ["bash", "-c", f". {STATE_ROOT / LAB}/env.sh && bulkhead get hostendpoints -o wide"
             " && cd inventory-examples && ansible-inventory --graph label_zone_dmz"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert explore.returncode == 0, explore.stderr
        assert re.search(r"^db-01\s+db-01\s+eth0\s+198\.18\.0\.12", explore.stdout, re.M)
        assert "web-01" in explore.stdout.split("@label_zone_dmz:")[1]
    finally:
        down = subprocess.run(DEMO_DOWN, cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _leftovers() == []
