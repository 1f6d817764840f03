"""The Windows dataplanes for the conformance runner, run here without Windows: each
case's plan is calculated per node (`bulkhead.policy.plan.calculate`), each host
endpoint's ingress and egress flattened (`bulkhead.dataplane.windows.flatten`) and
compiled by the backend, and each probe decided by the backend's fake (the fakes are
test doubles of HNS and of Windows Firewall, documented in their modules: this checks the
compilation, not Windows itself).

- `hns`: `hns.compile` and `fake_hns.FakeHns`;
- `windows-firewall`: `firewall.compile` and `fake_firewall.FakeFirewall`.

A probe is decided as the evaluator decides a flow: the sender's egress, then the
receiver's ingress, each on the host endpoint at that address (the first by name, as
`Evaluator.endpoints_at`); an address that is no planned host endpoint has no policy
there, and that side lets the probe through. A TCP or UDP probe's source port is
`SOURCE_PORT`, one of Windows' dynamic ports (the lab's kernel picks one; the evaluator
calls it unknown); an ICMP probe without a code has code 0.

A case any of whose endpoints the backend refuses (`Unsupported`) raises `Refused`
with the endpoint, direction, policy, rule and field: the runner reports it as refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from bulkhead.conformance.cases import Case, Refused, probe_flow
from bulkhead.dataplane.windows import fake_firewall, fake_hns, firewall, hns
from bulkhead.dataplane.windows.flat import Flat, Unsupported
from bulkhead.dataplane.windows.flatten import flatten
from bulkhead.model import EGRESS, INGRESS
from bulkhead.model.flowlog import PORTED
from bulkhead.policy import Flow
from bulkhead.policy.plan import calculate

SOURCE_PORT = 50000   # in Windows' dynamic port range, 49152-65535
BACKENDS = ("hns", "windows-firewall")


class Fake(Protocol):
    def allows(self, direction: str, family: int, protocol: int, local: int, remote: int,
               local_port: int | None, remote_port: int | None, icmp: int | None,
               interface: str | None = None) -> bool: ...


Compile = Callable[[Mapping[int, Flat], str, str], Sequence[Any]]


def backend(name: str) -> tuple[Compile, Callable[[list[Any]], Fake]]:
    """The compiler and the fake of a Windows backend."""
    if name == "hns":
        return hns.compile, fake_hns.FakeHns
    if name == "windows-firewall":
        return firewall.compile, fake_firewall.FakeFirewall
    raise ValueError(f"Windows backend {name!r}: expected one of {', '.join(BACKENDS)}")


class WindowsDataplane:
    """A Windows backend with its fake, for `bulkhead conformance run --dataplane`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.compile, self.fake = backend(name)

    def endpoints(self, case: Case) -> dict[str, Fake]:
        """Each planned host endpoint's fake, fed with both directions' rules."""
        snapshot = case.snapshot()
        fakes: dict[str, Fake] = {}
        for node in sorted({h.node for h in snapshot.host_endpoints.values()}):
            # The lab host's one interface holds its address (for endpoints found by it).
            interfaces = {"eth0": [ip for h in snapshot.host_endpoints.values()
                                   if h.node == node for ip in h.expected_ips]}
            plan = calculate(snapshot, node, interfaces, case.failsafes)
            for ep in plan.endpoints:
                rules: list[Any] = []
                for direction in (INGRESS, EGRESS):
                    try:
                        # HNS cannot match ICMP types: no neighbour discovery head there.
                        flat = flatten(plan, ep, direction,
                                       neighbour_discovery=self.name != "hns")
                        rules += self.compile(flat, direction, ep.name)
                    except Unsupported as e:
                        raise Refused(f"host endpoint {ep.name} {direction.lower()}: {e}") \
                            from None
                fakes[ep.name] = self.fake(rules)
        return fakes

    def run(self, case: Case) -> list[bool]:
        fakes = self.endpoints(case)
        at: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        for hep in sorted(case.snapshot().host_endpoints.values(), key=lambda h: h.name):
            for ip in hep.expected_ips:
                at.setdefault(ipaddress.ip_address(ip), hep.name)
        return [decide(fakes, at, probe_flow(case, probe)) for probe in case.expect]


def decide(fakes: Mapping[str, Fake], at: Mapping[Any, str], flow: Flow) -> bool:
    """Whether the sender's egress and the receiver's ingress both let `flow` through."""
    src, dst = int(flow.src), int(flow.dst)
    ported = flow.protocol in PORTED
    src_port = (flow.src_port if flow.src_port is not None else SOURCE_PORT) if ported \
        else None
    dst_port = flow.dst_port if ported else None
    icmp = None
    if flow.protocol in (1, 58):
        icmp = (flow.icmp_type or 0) * 256 + (flow.icmp_code or 0)
    sender, receiver = fakes.get(at.get(flow.src, "")), fakes.get(at.get(flow.dst, ""))
    if sender is not None and not sender.allows(EGRESS, flow.version, flow.protocol, src, dst,
                                                src_port, dst_port, icmp):
        return False
    return receiver is None or receiver.allows(INGRESS, flow.version, flow.protocol, dst, src,
                                               dst_port, src_port, icmp)
