"""The Linux enforcer: calculate the node's plan, render it as nftables, apply it.

The stages stay apart (`bulkhead.policy.plan` calculates, `dataplane.nftables.render`
renders, `dataplane.nftables.apply` talks to the kernel); this class only chains them and
reads the host's interfaces, which endpoints without `interfaceName` are matched by.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from bulkhead.agent.enforcer import EnforceError, EnforceReport
from bulkhead.dataplane.nftables import Ruleset, render
from bulkhead.dataplane.nftables.apply import ApplyResult, NftApplier, NftError
from bulkhead.dataplane.nftables.render import DnsSnooping, FlowLogging, RenderCache
from bulkhead.model import ENFORCE, Snapshot
from bulkhead.policy import Failsafes
from bulkhead.policy.incremental import Calculator, Key
from bulkhead.policy.plan import calculate, uncovered

Interfaces = Mapping[str, Sequence[str]]


def local_interfaces(prefix: Sequence[str] = ()) -> dict[str, list[str]]:
    """The host's interfaces and their addresses, from `ip -j addr`."""
    try:
        done = subprocess.run([*prefix, "ip", "-j", "addr", "show"], capture_output=True,
                              text=True, timeout=30, check=True)
        links = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise EnforceError(f"cannot read the host's interfaces: {e}") from None
    return {link["ifname"]: [a["local"] for a in link.get("addr_info", []) if "local" in a]
            for link in links}


class NftablesEnforcer:
    def __init__(self, node: str, failsafes: Failsafes, table: str = "bulkhead",
                 interfaces: Callable[[], Interfaces] | None = None,
                 applier: NftApplier | None = None,
                 flow_logs: FlowLogging | None = None, default_mode: str = ENFORCE,
                 dns: DnsSnooping | None = None) -> None:
        self.node = node
        self.dns = dns
        self.default_mode = default_mode   # endpoints without the enforcement label
        self.flow_logs = flow_logs
        self.failsafes = failsafes
        self.applier = applier or NftApplier(table)
        self.table = table
        self.interfaces = interfaces or local_interfaces
        self.revision = 0
        self._snapshot: Snapshot | None = None
        self.scratch = True     # the last plan was calculated from scratch
        self._by_address = False
        # Addresses an endpoint's interfaces hold outside its expectedIPs (warned).
        self.uncovered: list[str] = []
        # The interfaces (the very object) and endpoints they were found for.
        self._uncovered_for: tuple[object, ...] = ()
        # The plan kept between changes, and what the last render kept for the next.
        self.calculator = Calculator(node, failsafes, default_mode)
        self.render_cache = RenderCache()

    @property
    def _seen(self) -> dict[str, list[str]]:
        """The interfaces the last ruleset was made for."""
        return self.calculator.interfaces

    def ruleset(self, snapshot: Snapshot, changed: Iterable[Key] | None = None) -> Ruleset:
        """The table for `snapshot`: the kept plan with `changed` folded in where it can
        be (`bulkhead.policy.incremental`), rendered with what the last render kept."""
        # Told what changed (a watch event), the interfaces are read only if the plan is
        # made from scratch; otherwise read now (they may be what changed).
        try:
            plan, moved = self.calculator.calculate(
                snapshot, self.interfaces if changed is not None else self.interfaces(),
                changed)
            self.scratch = moved is None
            # Found again only when the endpoints or the interfaces moved: not on every
            # watch event's apply (a host of many interfaces takes milliseconds).
            heps = snapshot.host_endpoints
            ends = tuple((e.name, e.interfaces,
                          tuple(heps[e.name].expected_ips) if e.name in heps else None)
                         for e in plan.endpoints)
            before = self._uncovered_for
            if not (before and before[0] is self._seen and before[1] == ends):
                self.uncovered = uncovered(snapshot, plan, self._seen)
                self._uncovered_for = (self._seen, ends)
            if moved is None:
                # Only endpoints without interfaceName depend on the host's addresses.
                self._by_address = any(h.node == self.node and not h.interface_name
                                       for h in snapshot.host_endpoints.values())
            return render(plan, self.table, flow_logs=self.flow_logs, dns=self.dns,
                          cache=self.render_cache)
        except BaseException:
            # Nothing kept may be trusted after a failure half way: start again.
            self.calculator.reset()
            self.render_cache = RenderCache()
            raise

    def use_dns(self, dns: DnsSnooping) -> None:
        """Log DNS with other trusted resolvers from the next apply on (resolv.conf
        changed): the DNS rules of the input and output chains are rendered again."""
        self.dns = dns
        self.render_cache = RenderCache()

    def preview(self, snapshot: Snapshot) -> Ruleset:
        """The table for `snapshot` from scratch, leaving the kept plan alone (dry runs)."""
        plan = calculate(snapshot, self.node, self.interfaces(), self.failsafes,
                         default_mode=self.default_mode)
        return render(plan, self.table, flow_logs=self.flow_logs, dns=self.dns)

    def _report(self, result: ApplyResult, revision: int, ruleset: Ruleset) -> EnforceReport:
        # A netlink load that failed (the table went in by `nft -f` instead) is reported.
        fallback = [f"the table was loaded by nft -f: {result.fallback}"] \
            if result.fallback else []
        return EnforceReport(revision, result.full, result.changed, result.seconds,
                             ruleset.counts(), [*ruleset.warnings, *ruleset.notes,
                                                *self.uncovered, *fallback],
                             decisions=dict(ruleset.decisions),
                             domain_sets=dict(ruleset.domain_sets),
                             unenforced=list(ruleset.warnings))

    def enforce(self, snapshot: Snapshot, revision: int,
                changed: Iterable[Key] | None = None) -> EnforceReport:
        """Bring the kernel to `snapshot`. `changed`: the objects that changed since the
        last call (None: anything may have)."""
        start = time.perf_counter()
        ruleset = self.ruleset(snapshot, changed)
        # Only the first apply of this process can meet a kernel without the table.
        created = self.applier.last is None and self.applier.terse() is None
        try:
            result = self.applier.apply(ruleset)
        except NftError as e:
            raise EnforceError(f"nft refused the ruleset for revision {revision}: {e}") from None
        self.revision = revision
        self._snapshot = snapshot
        report = self._report(result, revision, ruleset)
        report.seconds = time.perf_counter() - start
        report.created = created
        report.scratch = self.scratch
        return report

    def drift(self) -> str | None:
        """The kernel's table changed, or the host's interfaces did (endpoints found by
        their expectedIPs may have moved)."""
        if self._by_address and self._snapshot is not None and self.interfaces() != self._seen:
            return "the host's interfaces or addresses changed"
        return self.applier.drifted()

    def repair(self) -> EnforceReport:
        if self._by_address and self._snapshot is not None and self.interfaces() != self._seen:
            return self.enforce(self._snapshot, self.revision)
        last = self.applier.last
        if last is None:
            return EnforceReport(self.revision, False, False, 0.0, {}, [])
        try:
            result = self.applier.repair()
        except NftError as e:
            raise EnforceError(f"repair failed: {e}") from None
        return self._report(result, self.revision, last)

    def rule_hits(self) -> dict[str, int]:
        """Flow logs: how many connections each decision took (its named counter's
        packets: only first packets reach it), by NFLOG prefix."""
        last = self.applier.last
        if last is None or not last.counters:
            return {}
        return {last.counters[name]: packets
                for name, packets in self.applier.counters().items() if name in last.counters}

    def dry_run(self, snapshot: Snapshot) -> tuple[str, str]:
        ruleset = self.preview(snapshot)
        try:
            return ruleset.script(), self.applier.diff(ruleset)
        except NftError as e:
            raise EnforceError(f"nft would refuse the ruleset: {e}") from None

    def release(self) -> tuple[list[str], list[str]]:
        """Delete the agent's table (and a staging table left by a load), what an
        uninstall does: a stopped agent keeps its table (fail static). The objects
        removed (none if the table is not there) and no warnings; the rest of the host's
        ruleset is not touched. Raises EnforceError if nft refuses."""
        try:
            present = self.applier.terse() is not None
            self.applier.remove()
        except NftError as e:
            raise EnforceError(f"deleting table inet {self.table}: {e}") from None
        self._snapshot = None
        return ([f"table inet {self.table}"] if present else []), []
