"""The nftables dataplane for the conformance runner: real agents, real packets.

One testbed (a lab with bulkhead-server and an agent per host) serves every case of its
dataplane (`--at-once N`: N dataplanes, a testbed each, share out the cases): the case's
hosts take the first lab hosts and the case's addresses, its resources replace the
store's, the runner waits until every agent enforces that revision, flushes conntrack
(so no old connection hides a deny), listens on the probed ports and probes. A probe that
reaches the host ("open", or "refused" when nothing listens) is allowed; a probe that
times out is denied. A probe expected to get through that timed out is probed once more,
with a longer timeout, before it counts as denied: on a loaded machine a slow answer is
not a verdict (one that got through is).

`Testbed.enforce` and `wire_verdicts` are those steps for tests that are not case files
(the differential and fault tests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bulkhead.conformance.cases import Case
from bulkhead.lab.probe import ProbeSpec
from bulkhead.testbed import MANAGEMENT, Testbed

LAB_HOSTS = 6
PROBE_TIMEOUT = 0.6
RETRY_TIMEOUT = 3.0   # an expected-allowed probe that timed out, probed again


def forget_connections(bed: Testbed, addresses: list[str]) -> None:
    """Delete every tracked connection to these addresses in every host, so a deny is
    never hidden by an old connection. Not `conntrack -F`: that would also forget the
    agents' own connections to the server, and under a deny-all ingress policy their
    next packets would be new connections and dropped until the agent reconnects."""
    script = "; ".join(f"conntrack -D -d {a} >/dev/null 2>&1" for a in addresses) + "; true"
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda h: bed.lab.run(h, ["sh", "-c", script], check=True),
                      bed.lab.hosts))


@dataclass(frozen=True)
class WireFlow:
    """A connection to try on the wire: from lab host `src` (at `src_ip`) to `dst_ip`,
    an address of lab host `dst`. `proto` is TCP, UDP or ICMP (echo; ICMPv6 echo when the
    addresses are IPv6); `port` is None for ICMP."""

    src: str
    src_ip: str
    dst: str
    dst_ip: str
    proto: str
    port: int | None


def wire_verdicts(bed: Testbed, flows: Sequence[WireFlow],
                  timeout: float = PROBE_TIMEOUT) -> list[bool]:
    """Whether each flow gets through, seen on the wire: forget the tracked connections
    to the flows' destinations, listen on their ports, probe them all at once. A probe
    that reaches the host ("open", or "refused" when nothing listens) is allowed; one
    that times out is denied. Call after the agents have converged on the policy."""
    forget_connections(bed, sorted({f.dst_ip for f in flows}))
    ports: dict[str, dict[str, set[int]]] = {}
    for f in flows:
        if f.port is not None:
            ports.setdefault(f.dst, {"tcp": set(), "udp": set()})[f.proto.lower()].add(f.port)
    for host, by_proto in ports.items():
        bed.lab.listen(host, tcp=sorted(by_proto["tcp"]), udp=sorted(by_proto["udp"]),
                       replace=True)
    specs = [ProbeSpec(f.src, f.dst_ip, f.proto.lower(), f.port, timeout, src_ip=f.src_ip)
             for f in flows]
    return [r.outcome in ("open", "refused") for r in bed.lab.probe_many(specs)]


def wire_verdicts_expecting(bed: Testbed, flows: Sequence[WireFlow],
                            expected: Sequence[bool]) -> tuple[list[bool], int]:
    """`wire_verdicts`, with each flow `expected` allowed that timed out probed again with
    RETRY_TIMEOUT: on a loaded machine an allowed probe can outlast PROBE_TIMEOUT, and a
    deny times out again. The verdicts, and how many flows were probed again."""
    verdicts = wire_verdicts(bed, flows)
    slow = [i for i, (allowed, got) in enumerate(zip(expected, verdicts, strict=True))
            if allowed and not got]
    if slow:
        again = wire_verdicts(bed, [flows[i] for i in slow], timeout=RETRY_TIMEOUT)
        for i, got in zip(slow, again, strict=True):
            verdicts[i] = got
    return verdicts, len(slow)


class NftablesDataplane:
    name = "nftables"

    def __init__(self, lab_name: str = "conf", hosts: int = LAB_HOSTS) -> None:
        self.lab_name = lab_name
        self.hosts = hosts
        self.testbed: Testbed | None = None
        self.convergence: list[float] = []
        self.retried = 0   # probes asked again (RETRY_TIMEOUT)

    def _bed(self) -> Testbed:
        if self.testbed is None:
            self.testbed = Testbed(self.lab_name, self.hosts, failsafe_defaults=False,
                                   management=True).up()
        return self.testbed

    def close(self) -> None:
        if self.testbed is not None:
            self.testbed.down()
            self.testbed = None

    def run(self, case: Case) -> list[bool]:
        bed = self._bed()
        lab_hosts = list(bed.lab.hosts)
        if len(case.hosts) > len(lab_hosts):
            raise ValueError(f"case {case.name} has {len(case.hosts)} hosts; the lab has "
                             f"{len(lab_hosts)}")
        where = dict(zip(case.hosts, lab_hosts, strict=False))
        hosts_of = {lab: h for h, lab in where.items()}
        wanted_fs = "failsafe-defaults" in case.requires
        if bed.failsafe_defaults != wanted_fs:
            bed.start_agents(wanted_fs)
        # The management address first (it stays), then the case's address, if any.
        bed.lab.set_addresses_many({
            lab: [MANAGEMENT.format(10 + i), *([case.addresses[h]] if h else [])]
            for i, (lab, h) in enumerate((lab, hosts_of.get(lab)) for lab in lab_hosts)})
        docs: list[dict[str, Any]] = []
        for doc in case.host_endpoints():
            doc["spec"]["node"] = where[doc["metadata"]["name"]]
            docs.append(doc)
        docs += case.policies
        marker = hashlib.sha1(case.name.encode()).hexdigest()[:12]
        revision = bed.replace_all(docs, marker)
        self.convergence.append(bed.wait_converged(revision))
        flows = [WireFlow(where[p.src], case.addresses[p.src], where[p.dst],
                          case.addresses[p.dst], p.proto, p.port) for p in case.expect]
        verdicts, retried = wire_verdicts_expecting(bed, flows,
                                                    [p.allowed for p in case.expect])
        self.retried += retried
        return verdicts
