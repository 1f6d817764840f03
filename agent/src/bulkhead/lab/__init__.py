"""bulkhead.lab: lab hosts as network namespaces on a bridge, with listeners and probes
that tell "refused" from "blocked". Used by the tests, the testbed (`bulkhead.testbed`),
the benchmarks and the demo; see docs/lab.md.

    from bulkhead.lab import Lab
    with Lab("t1", ["web", "db"]) as lab:
        lab.listen("db", tcp=[5432])
        assert lab.probe("web", "db", "tcp", 5432).outcome == "open"

One job a module: names.py (what everything is called), layout.py (nets and addresses),
state.py (the state file), netns.py (build, find and remove labs in the kernel),
daemons.py (the host daemons, from this side; hostd.py is the daemon), processes.py
(commands in namespaces, stopping processes), conntrack.py, lab.py (`Lab`, over all of
them), kernel.py (`ip`), probe.py (probe specs and results), machine.py (lab machines:
a lab host booting systemd as PID 1), cli.py (`bulkhead lab`).
"""

from bulkhead.lab.kernel import LabError
from bulkhead.lab.lab import Lab
from bulkhead.lab.layout import DEFAULT_NET4, DEFAULT_NET6, LabHost
from bulkhead.lab.names import STATE_ROOT, SWITCH
from bulkhead.lab.netns import list_labs, remove_all, teardown
from bulkhead.lab.probe import Outcome, ProbeResult, ProbeSpec

__all__ = ["DEFAULT_NET4", "DEFAULT_NET6", "STATE_ROOT", "SWITCH", "Lab", "LabError",
           "LabHost", "Outcome", "ProbeResult", "ProbeSpec", "list_labs", "remove_all",
           "teardown"]
