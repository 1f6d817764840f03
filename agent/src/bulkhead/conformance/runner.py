"""Run cases against a dataplane and report truth tables, per-tag pass rates and JSON.

A dataplane takes a case and returns, for each expected probe, whether the connection got
through. `model` asks the reference evaluator; the nftables dataplane (real agents in lab
namespaces) plugs in through the same `Dataplane` protocol.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bulkhead.conformance.cases import Case, Probe
from bulkhead.policy import Evaluator, Flow


class Dataplane(Protocol):
    name: str

    def run(self, case: Case) -> list[bool]:
        """Whether each probe of `case.expect` got through, in order."""


class ModelDataplane:
    """The reference evaluator: no kernel involved."""

    name = "model"

    def run(self, case: Case) -> list[bool]:
        evaluator = Evaluator(case.snapshot(), case.failsafes)
        return [evaluator.evaluate(probe_flow(case, p), trace=False).allowed
                for p in case.expect]


def probe_flow(case: Case, probe: Probe) -> Flow:
    return wire_flow(case.addresses[probe.src], case.addresses[probe.dst], probe.proto,
                     probe.port)


def wire_flow(src: str, dst: str, proto: str, port: int | None) -> Flow:
    """The first packet of a lab probe, as the evaluator sees it: TCP or UDP to `port`,
    or an ICMP echo request, code 0 (ICMPv6's between IPv6 addresses). The source port
    is the kernel's ephemeral choice, unknown here."""
    if proto.upper() == "ICMP":
        v6 = ":" in src
        return Flow.make(src, dst, "ICMPv6" if v6 else "ICMP", icmp_type=128 if v6 else 8,
                         icmp_code=0)
    return Flow.make(src, dst, proto, port)


def _nftables() -> Dataplane:
    # Imported here: the kernel dataplane needs the lab, which the model dataplane does not.
    from bulkhead.conformance.kernel import NftablesDataplane

    return NftablesDataplane()


DATAPLANES: dict[str, Callable[[], Dataplane]] = {"model": ModelDataplane,
                                                  "nftables": _nftables}


@dataclass
class CaseResult:
    case: Case
    actual: list[bool]

    @property
    def failed(self) -> list[tuple[Probe, bool]]:
        return [(p, a) for p, a in zip(self.case.expect, self.actual, strict=True)
                if p.allowed != a]


def run_cases(cases: Sequence[Case], dataplane: Dataplane) -> list[CaseResult]:
    """Run every case; a dataplane with a `close()` (the kernel's lab) is closed after."""
    try:
        return [CaseResult(case, dataplane.run(case)) for case in cases]
    finally:
        close = getattr(dataplane, "close", None)
        if close is not None:
            close()


def _table(case: Case, probes: list[tuple[Probe, bool]], actual: bool) -> list[str]:
    hosts = list(case.hosts)
    cells: dict[tuple[str, str], str] = {}
    for probe, got in probes:
        value = got if actual else probe.allowed
        mark = "." if value else "X"
        if actual and got != probe.allowed:
            mark = "!"
        cells[(probe.src, probe.dst)] = mark
    width = max(len(h) for h in hosts)
    lines = [" " * width + "  " + " ".join(h[:width].ljust(width) for h in hosts)]
    for src in hosts:
        row = [cells.get((src, dst), "-" if src == dst else " ").ljust(width) for dst in hosts]
        lines.append(src.ljust(width) + "  " + " ".join(row))
    return lines


def report_text(results: Sequence[CaseResult], dataplane: str) -> str:
    out: list[str] = []
    for result in results:
        case = result.case
        status = "FAIL" if result.failed else "ok"
        out.append(f"== {case.name} [{', '.join(case.tags)}] {status}")
        by_column: dict[str, list[tuple[Probe, bool]]] = defaultdict(list)
        for probe, got in zip(case.expect, result.actual, strict=True):
            by_column[probe.column].append((probe, got))
        for column, probes in by_column.items():
            expected = _table(case, probes, actual=False)
            actual = _table(case, probes, actual=True)
            width = max(len(line) for line in expected)
            out.append(f"   {column}")
            out.append("   " + "expected".ljust(width) + f"   actual ({dataplane})")
            out += [f"   {e.ljust(width)}   {a}" for e, a in zip(expected, actual, strict=True)]
        for probe, got in result.failed:
            out.append(f"   ! {probe.src} -> {probe.dst} {probe.column}: expected "
                       f"{'allowed' if probe.allowed else 'denied'}, got "
                       f"{'allowed' if got else 'denied'}")
    out.append("")
    out.append("pass rate per tag:")
    for tag, (passed, total) in sorted(tag_rates(results).items()):
        out.append(f"  {tag:<24} {passed}/{total} cases ({100 * passed / total:.0f}%)")
    cases_failed = sum(1 for r in results if r.failed)
    n_probes = sum(len(r.actual) for r in results)
    n_differ = sum(len(r.failed) for r in results)
    out.append(f"{len(results) - cases_failed} passed, {cases_failed} failed "
               f"({n_probes - n_differ}/{n_probes} probes agree, dataplane {dataplane})")
    return "\n".join(out)


def tag_rates(results: Sequence[CaseResult]) -> dict[str, tuple[int, int]]:
    rates: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for result in results:
        for tag in result.case.tags or ["untagged"]:
            rates[tag][1] += 1
            if not result.failed:
                rates[tag][0] += 1
    return {k: (v[0], v[1]) for k, v in rates.items()}


def report_json(results: Sequence[CaseResult]) -> dict[str, Any]:
    return {
        "cases": len(results),
        "probes": sum(len(r.actual) for r in results),
        "failed": [
            {"case": r.case.name, "from": p.src, "to": p.dst, "proto": p.proto,
             "port": p.port, "expected": p.allowed, "actual": got}
            for r in results for p, got in r.failed
        ],
    }
