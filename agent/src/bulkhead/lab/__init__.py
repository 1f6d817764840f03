"""bulkhead.lab: lab hosts as network namespaces on a bridge, with listeners and probes
that tell "refused" from "blocked". Used by the tests, the conformance harness
(`--dataplane nftables`), the benchmarks and the demo; see docs/lab.md.

    from bulkhead.lab import Lab
    with Lab("t1", ["web", "db"]) as lab:
        lab.listen("db", tcp=[5432])
        assert lab.probe("web", "db", "tcp", 5432).outcome == "open"
"""

from bulkhead.lab.core import (
    DEFAULT_NET4,
    DEFAULT_NET6,
    STATE_ROOT,
    SWITCH,
    Lab,
    LabHost,
    list_labs,
    remove_all,
    teardown,
)
from bulkhead.lab.kernel import LabError
from bulkhead.lab.probe import Outcome, ProbeResult, ProbeSpec

__all__ = ["DEFAULT_NET4", "DEFAULT_NET6", "STATE_ROOT", "SWITCH", "Lab", "LabError",
           "LabHost", "Outcome", "ProbeResult", "ProbeSpec", "list_labs", "remove_all",
           "teardown"]
