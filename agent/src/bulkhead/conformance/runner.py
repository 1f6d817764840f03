"""Run cases against a dataplane and report truth tables, per-tag pass rates and JSON.

A dataplane takes a case and returns, for each expected probe, whether the connection got
through. `model` asks the reference evaluator; the nftables dataplane (real agents in lab
namespaces) plugs in through the same `Dataplane` protocol, and so do the Windows ones
(`hns`, `windows-firewall`: the plan compiled for Windows, decided by fakes of HNS and of
Windows Firewall, `bulkhead.conformance.windows`). A dataplane that cannot enforce a
case's policies raises `Refused`: the case is reported as refused, with the reason,
neither agreeing nor failing.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from bulkhead.conformance.cases import Case, Probe, Refused, probe_flow
from bulkhead.policy import Evaluator


class Dataplane(Protocol):
    name: str

    def run(self, case: Case) -> list[bool]:
        """Whether each probe of `case.expect` got through, in order. Raises `Refused`
        when the dataplane cannot enforce the case's policies."""


class ModelDataplane:
    """The reference evaluator: no kernel involved."""

    name = "model"

    def run(self, case: Case) -> list[bool]:
        evaluator = Evaluator(case.snapshot(), case.failsafes)
        return [evaluator.evaluate(probe_flow(case, p), trace=False).allowed
                for p in case.expect]


def _model(index: int = 0) -> Dataplane:
    return ModelDataplane()


def _nftables(index: int = 0) -> Dataplane:
    """The kernel dataplane; the `index`th of several at once has a lab of its own."""
    # Imported here: the kernel dataplane needs the lab, which the model dataplane does not.
    from bulkhead.conformance.kernel import NftablesDataplane

    return NftablesDataplane("conf" if index == 0 else f"conf{index + 1}")


def _hns(index: int = 0) -> Dataplane:
    from bulkhead.conformance.windows import WindowsDataplane

    return WindowsDataplane("hns")


def _windows_firewall(index: int = 0) -> Dataplane:
    from bulkhead.conformance.windows import WindowsDataplane

    return WindowsDataplane("windows-firewall")


# A dataplane by name: `DATAPLANES[name](index)` makes the `index`th (from 0) of the ones
# that run cases at once (`run_cases_at_once`).
DATAPLANES: dict[str, Callable[[int], Dataplane]] = {"model": _model,
                                                     "nftables": _nftables,
                                                     "hns": _hns,
                                                     "windows-firewall": _windows_firewall}
MAX_AT_ONCE = 4   # dataplanes at once: each kernel one is a lab with a server and 6 agents


@dataclass
class CaseResult:
    case: Case
    actual: list[bool]
    refused: str | None = None   # why the dataplane cannot enforce the case (no actual)

    @property
    def failed(self) -> list[tuple[Probe, bool]]:
        if self.refused is not None:
            return []
        return [(p, a) for p, a in zip(self.case.expect, self.actual, strict=True)
                if p.allowed != a]


def run_case(case: Case, dataplane: Dataplane) -> CaseResult:
    try:
        return CaseResult(case, dataplane.run(case))
    except Refused as e:
        return CaseResult(case, [], e.reason)


def _close(dataplane: Dataplane) -> None:
    close = getattr(dataplane, "close", None)
    if close is not None:
        close()


def run_cases(cases: Sequence[Case], dataplane: Dataplane) -> list[CaseResult]:
    """Run every case; a dataplane with a `close()` (the kernel's lab) is closed after."""
    try:
        return [run_case(case, dataplane) for case in cases]
    finally:
        _close(dataplane)


def run_cases_at_once(cases: Sequence[Case], make: Callable[[int], Dataplane],
                      at_once: int) -> list[CaseResult]:
    """Every case, on `at_once` dataplanes made by `make(0)`, `make(1)`, ..., each in a
    thread of its own taking the next case not yet taken (the kernel's: a lab each, so
    the time spent waiting for probes that time out overlaps). The results come in the
    cases' order, as `run_cases` gives them. Each dataplane is closed after; if one
    raises, the others stop after their current case and the error is raised."""
    if not 1 <= at_once <= MAX_AT_ONCE:
        raise ValueError(f"{at_once} dataplanes at once: from 1 to {MAX_AT_ONCE}")
    at_once = min(at_once, max(1, len(cases)))
    if at_once == 1:
        return run_cases(cases, make(0))
    results: list[CaseResult | None] = [None] * len(cases)
    lock = threading.Lock()
    taken = iter(range(len(cases)))
    failed = threading.Event()

    def work(index: int) -> None:
        dataplane: Dataplane | None = None
        i: int | None = None
        try:
            dataplane = make(index)
            while not failed.is_set():
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                results[i] = run_case(cases[i], dataplane)
        except BaseException as e:
            failed.set()
            lab = getattr(dataplane, "lab_name", None)
            e.add_note(f"conformance: dataplane {index}" + (f" (lab {lab})" if lab else "")
                       + (f", case {cases[i].name}" if i is not None else
                          ", before its first case"))
            raise
        finally:
            if dataplane is not None:
                _close(dataplane)

    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="conformance") as pool:
        futures = [pool.submit(work, index) for index in range(at_once)]
        try:
            for done in futures:
                done.result()
        except BaseException as first:
            # The first error (or Ctrl-C here): the others stop after their current case
            # and close their labs; what else failed meanwhile is noted on the first.
            failed.set()
            wait(futures)
            for done in futures:
                other = done.exception()
                if other is not None and other is not first:
                    first.add_note(f"conformance: and also {other!r}"
                                   + "".join(f"; {n}" for n in getattr(other, "__notes__", ())))
            raise
    done_all = [r for r in results if r is not None]
    assert len(done_all) == len(cases)   # every case was taken, and none raised
    return done_all


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
        if result.refused is not None:
            out.append(f"== {case.name} [{', '.join(case.tags)}] REFUSED by {dataplane}: "
                       f"{result.refused}")
            continue
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
    out.append("pass rate per tag (refused cases apart):")
    refused_by_tag = refused_tags(results)
    for tag, (passed, total) in sorted(tag_rates(results).items()):
        rate = f"({100 * passed / total:.0f}%)" if total else "(none run)"
        extra = f", {refused_by_tag[tag]} refused" if refused_by_tag.get(tag) else ""
        out.append(f"  {tag:<24} {passed}/{total} cases {rate}{extra}")
    cases_failed = sum(1 for r in results if r.failed)
    n_refused = sum(1 for r in results if r.refused is not None)
    n_probes = sum(len(r.actual) for r in results)
    n_differ = sum(len(r.failed) for r in results)
    refused_words = f", {n_refused} refused" if n_refused else ""
    out.append(f"{len(results) - cases_failed - n_refused} passed, {cases_failed} failed"
               f"{refused_words} ({n_probes - n_differ}/{n_probes} probes agree, "
               f"dataplane {dataplane})")
    return "\n".join(out)


def tag_rates(results: Sequence[CaseResult]) -> dict[str, tuple[int, int]]:
    """Per tag: the cases that passed and the cases run (refused ones are not run)."""
    rates: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for result in results:
        for tag in result.case.tags or ["untagged"]:
            if result.refused is not None:
                rates.setdefault(tag, [0, 0])   # the tag is listed, with no case run
                continue
            rates[tag][1] += 1
            if not result.failed:
                rates[tag][0] += 1
    return {k: (v[0], v[1]) for k, v in rates.items()}


def refused_tags(results: Sequence[CaseResult]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for result in results:
        if result.refused is not None:
            for tag in result.case.tags or ["untagged"]:
                counts[tag] += 1
    return dict(counts)


def report_json(results: Sequence[CaseResult]) -> dict[str, Any]:
    """`cases`: all given; `probes`: the probes run (none of a refused case); `refused`:
    the cases the dataplane cannot enforce, with the reason and their probe count."""
    return {
        "cases": len(results),
        "probes": sum(len(r.actual) for r in results),
        "failed": [
            {"case": r.case.name, "from": p.src, "to": p.dst, "proto": p.proto,
             "port": p.port, "expected": p.allowed, "actual": got}
            for r in results for p, got in r.failed
        ],
        "refused": [{"case": r.case.name, "reason": r.refused, "probes": len(r.case.expect)}
                    for r in results if r.refused is not None],
    }
