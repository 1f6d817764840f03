"""What a ruleset costs the kernel in memory: readings before and after loading it.

Two readings, both taken around the load of a table into a network namespace that held
nothing before:

- `memcg_kmem_mib`: the kernel memory charged to this process's memory cgroup (cgroup v1
  `memory.kmem.usage_in_bytes`, v2 `memory.stat` "kernel"). nf_tables charges what it
  allocates for tables, chains, rules, sets and their elements to the cgroup of the
  process that sends the batch (`nft`, started from here, is in ours): other processes
  on the machine do not show up in it. Hash tables the kernel grows in a worker are not
  charged (vmalloc'd buckets).
- `meminfo_mib`: the change of Slab + VmallocUsed + Percpu in /proc/meminfo, machine-wide:
  every allocation counts, the buckets too, and so does whatever else the machine did
  meanwhile (noise of a few MiB on a busy machine).

Reading these needs no privilege beyond reading /proc and /sys; nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
MEMINFO = ("Slab", "VmallocUsed", "Percpu")


def memcg_kernel_bytes() -> int | None:
    """The kernel memory charged to this process's memory cgroup, None if unreadable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            try:
                return int(Path(f"/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes")
                           .read_text())
            except (OSError, ValueError):
                return None
    for line in lines:
        if line.startswith("0::"):
            try:
                stat = Path(f"/sys/fs/cgroup{line[3:]}/memory.stat").read_text()
            except OSError:
                return None
            for entry in stat.splitlines():
                key, _, value = entry.partition(" ")
                if key == "kernel":
                    return int(value)
    return None


def meminfo_bytes() -> dict[str, int]:
    """Slab, VmallocUsed and Percpu from /proc/meminfo, in bytes."""
    found: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO:
            found[key] = int(rest.split()[0]) * 1024
    return found


def measured(load: Callable[[], object]) -> dict[str, Any]:
    """Run `load` (which puts a table in a fresh namespace) between two readings."""
    kmem_before, info_before = memcg_kernel_bytes(), meminfo_bytes()
    load()
    kmem_after, info_after = memcg_kernel_bytes(), meminfo_bytes()
    deltas = {k: (info_after.get(k, 0) - info_before.get(k, 0)) / MIB for k in MEMINFO}
    return {
        "memcg_kmem_mib": None if kmem_before is None or kmem_after is None
        else (kmem_after - kmem_before) / MIB,
        "meminfo_mib": {**deltas, "total": sum(deltas.values())},
    }


def describe(memory: dict[str, Any], elements: int) -> str:
    """One line: both readings, and bytes per set element."""
    kmem = memory["memcg_kmem_mib"]
    info = memory["meminfo_mib"]
    per = f"; {kmem * MIB / elements:.0f} B per element" if kmem and elements else ""
    charged = "unreadable" if kmem is None else f"{kmem:.1f} MiB"
    return (f"kernel memory: {charged} charged to the memory cgroup{per}; /proc/meminfo "
            f"+{info['total']:.1f} MiB (slab {info['Slab']:+.1f}, vmalloc "
            f"{info['VmallocUsed']:+.1f}, percpu {info['Percpu']:+.1f})")
