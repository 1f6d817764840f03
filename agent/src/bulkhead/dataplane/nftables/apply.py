"""Apply rendered tables to the kernel with `nft`, atomically, and watch them for drift.

A new structure replaces the whole table: its sets first, then one transaction that
switches every rule to the new table, with `nft -f`, or, for a table with a big set, as
netlink batches whose big sets' elements are encoded here (`load.py`: `nft` parsing a
million elements costs seconds); the old table's sets and maps stay through it, and go
in a last transaction once no packet can be in the old rules (`replace.py`: the new
ones are named with a generation suffix). A change of set elements only is sent as element
deletions and additions in one netlink batch (`netlink.py`), which skips the full read of
the kernel's state that `nft` does first; in up to three, an RCU grace period apart, when
a packet could meet a change that narrows what is accepted and one that widens it
(`order.py`: narrowing first, widening last). The kernel applies a
transaction whole or not at all, so a ruleset it rejects leaves the previous one in force.
Only `inet <table>` is ever touched, and, while a table is loaded over netlink, its staging
table `inet <table>_load` (no rules on its hooks; deleted in the same transaction).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from bulkhead.dataplane.nftables.load import BIG_SET, STAGING, StagingError, encodes, load
from bulkhead.dataplane.nftables.netlink import DUMP_TRIES, NftNetlink, Unsupported, set_changes
from bulkhead.dataplane.nftables.order import Uses, joined, new_targets, order, uses
from bulkhead.dataplane.nftables.replace import (
    KernelTable,
    Leftovers,
    cleanup_messages,
    cleanup_script,
    current_tag,
    early_chains,
    early_sets,
    grace_period,
    leftovers,
    next_tag,
    read_json,
    read_netlink,
    switch_body,
    switch_messages,
    switch_script,
    tagged,
)
from bulkhead.dataplane.nftables.ruleset import Chain, Ruleset
from bulkhead.netlink import NetlinkError


class NftError(Exception):
    """`nft` refused a ruleset (or could not run); the kernel holds the previous one."""


@dataclass(frozen=True)
class ApplyResult:
    full: bool        # the whole table was replaced
    changed: bool     # anything was sent to the kernel
    seconds: float
    via: str = ""     # "nft" (a script), "netlink" (a netlink batch), "" (nothing sent)
    # A full apply that went through `nft -f` although the netlink load was tried: why
    # that failed (the kernel or `nft` refused it, or it met what it does not cover).
    fallback: str = ""


class NftApplier:
    """Applies rulesets to one table of one network namespace: `netns` names it (an `ip
    netns` name, /run/netns/NAME), "" is this process's own (the agent's). `nft` runs
    there (`ip netns exec NAME nft`), and so does the netlink socket. Element changes go
    over netlink when `netlink` is true; otherwise, and for element types the netlink
    encoder does not know, through `nft -f`. With `netlink`, a table with a set of
    `load_min` elements or more of a kind `load.element_attrs` encodes is loaded whole
    over netlink (`load.load`), and through `nft -f` if that fails
    (`ApplyResult.fallback` says why)."""

    def __init__(self, table: str = "bulkhead", nft: str = "nft", netns: str = "",
                 netlink: bool = True) -> None:
        self.table = table
        self.netns = netns
        self.argv = [*(["ip", "netns", "exec", netns] if netns else []), nft]
        self._netlink_ns = netns if netlink else None   # None: no netlink
        self.last: Ruleset | None = None
        self._terse: str | None = None   # the table's shape right after our full apply
        self._generation: int | None = None   # the ruleset generation our last commit made
        self._nl: NftNetlink | None = None
        self.load_min = BIG_SET
        self._fallback = ""   # why the last full apply did not go over netlink
        self._tag: int | None = None   # the generation suffix of the kernel's map names
        self._uses: Uses | None = None   # how the applied table's rules use its sets
        self.cleanup_error = ""   # why the last full apply left old objects behind
        # Elements of the sets with timeouts (domain sets) to put back when the table is
        # replaced whole, in the same transaction: set name -> `ADDRESS timeout Nms`.
        self.timed: Callable[[Ruleset], Mapping[str, Sequence[str]]] | None = None

    @contextlib.contextmanager
    def _socket(self) -> Iterator[NftNetlink]:
        """The applier's netlink socket, opened once and kept (closing a netfilter netlink
        socket costs the kernel milliseconds); dropped after any error, so a reply left
        unread never meets the next request."""
        assert self._netlink_ns is not None
        if self._nl is None:
            self._nl = NftNetlink(self._netlink_ns)
        try:
            yield self._nl
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the kept netlink socket (opened again when needed)."""
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def _nft(self, args: Sequence[str], script: str | None = None,
             argv: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([*(argv or self.argv), *args], input=script, text=True,
                                  capture_output=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftError(f"nft could not run: {e}") from None

    def _run_script(self, script: str) -> None:
        done = self._nft(["-f", "-"], script)
        if done.returncode != 0:
            raise NftError(_first_errors(done.stderr))

    # -- applying ---------------------------------------------------------------------
    def apply(self, ruleset: Ruleset) -> ApplyResult:
        """Bring the kernel's table to `ruleset`. Raises NftError, leaving the old one."""
        start = time.perf_counter()
        last = self.last
        drift = self.drifted()
        if last is not None and drift is None and ruleset.same(last):
            return ApplyResult(False, False, time.perf_counter() - start)
        full = last is None or drift is not None or not ruleset.same_structure(last)
        via = "nft"
        if not full:
            assert last is not None
            sent = self._send_elements(last, ruleset)
            if sent is None:
                full = True   # the kernel's elements were not ours: replace the table
            else:
                via = sent
        if full:
            via = self._replace(ruleset)
        self.last = ruleset
        return ApplyResult(full, True, time.perf_counter() - start, via,
                           self._fallback if full else "")

    def _replace(self, ruleset: Ruleset) -> str:
        """Replace the whole table: over netlink (`load.load`) when it has a big set,
        else, or if that fails, with `nft -f`. Returns the way it went."""
        timed = self.timed(ruleset) if self.timed is not None and ruleset.domain_sets \
            else None
        via = "nft"
        self._fallback = ""
        kernel = self.kernel_table()
        tag = next_tag(kernel)
        new = tagged(ruleset, tag)
        if self._netlink_ns is not None and not any(timed.values() if timed else ()) \
                and any(len(s.elements) >= self.load_min and encodes(s)
                        for s in ruleset.sets.values()):
            try:
                with self._socket() as nl:
                    load(nl, new, self.argv, self.load_min,
                         switch_messages(self.table, kernel, new), frozenset(kernel.counters),
                         early_sets(kernel, new), early_chains(kernel, new))
                via = "netlink"
            except Exception as e:   # Unsupported, NetlinkError, StagingError,
                # and what an odd kernel answer makes the reader raise (struct.error,
                # UnicodeDecodeError): none may stop the table from being loaded. Nothing
                # of the batch was applied (one transaction), or all of it (the answers
                # were lost): either way the whole script goes through nft, as without
                # netlink.
                self._fallback = f"netlink load: {type(e).__name__}: {e}" \
                    if not isinstance(e, (Unsupported, NetlinkError, StagingError)) \
                    else f"netlink load: {e}"
        if via == "nft":
            # A staging table left by an agent killed mid-load goes in the same
            # transaction (it enforces nothing, but should not stay).
            early, chains = early_sets(kernel, new), early_chains(kernel, new)
            if early:
                # The new sets first, whole, in a transaction of their own, with the
                # chains their elements jump to, empty (`replace.py`).
                self._run_script(Ruleset(new.table, sets={n: new.sets[n] for n in early},
                                         chains={n: Chain(n, ()) for n in chains})
                                 .script(replace=False))
            try:
                self._run_script(self._no_staging() + switch_script(kernel, new)
                                 + switch_body(kernel, new, early).script(timed,
                                                                          replace=False))
            except NftError:
                # The old table stays in force: the new sets go again (at worst, the next
                # full apply removes them).
                with contextlib.suppress(NftError):
                    self._run_script(cleanup_script(new.family_table, Leftovers(
                        tuple((n, new.sets[n].map_to is not None) for n in early),
                        tuple(chains), ())))
                raise
        self._tag = tag
        self._uses = None
        self._cleanup(kernel, new)
        # The generation first: a change between the two reads shows up as drift later.
        self._generation = self.generation()
        self._terse = self._shape()
        return via

    def _cleanup(self, kernel: KernelTable, new: Ruleset) -> None:
        """The second transaction of a full apply: once every packet that began in the
        old rules has left them, the old sets and what only the old table had go. If it
        fails, the new table is in force all the same; the next full apply removes what
        is left (`cleanup_error` says why)."""
        self.cleanup_error = ""
        gone = leftovers(kernel, new)
        if not gone:
            return
        grace_period()
        if self._netlink_ns is not None:
            try:
                with self._socket() as nl:
                    nl.transaction(cleanup_messages(self.table, gone))
                return
            except NetlinkError as e:
                self.cleanup_error = f"netlink: {e}"
        try:
            self._run_script(cleanup_script(new.family_table, gone))
            self.cleanup_error = ""
        except NftError as e:
            self.cleanup_error += f"; nft: {e}"

    def kernel_table(self) -> KernelTable:
        """The named objects of the kernel's table (empty when it is absent): over
        netlink when used, else from `nft -j -t list table`."""
        if self._netlink_ns is not None:
            for attempt in range(DUMP_TRIES):
                try:
                    with self._socket() as nl:
                        return read_netlink(nl, self.table)
                except NetlinkError as e:
                    if e.code != errno.EINTR or attempt == DUMP_TRIES - 1:
                        break
        done = self._nft(["-j", "-t", "list", "table", "inet", self.table])
        if done.returncode != 0:
            return KernelTable()
        try:
            return read_json(done.stdout)
        except ValueError as e:
            raise NftError(f"nft -j list table inet {self.table}: {e}") from None

    def _in_kernel(self, ruleset: Ruleset) -> Ruleset:
        """`ruleset` with the kernel's map names (the suffix of the last full apply)."""
        return tagged(ruleset, self._tag)

    def _send_elements(self, last: Ruleset, ruleset: Ruleset) -> str | None:
        """Send the element changes from `last` to `ruleset`, in the order `order.py`
        gives (narrowing changes first, widening ones an RCU grace period later): "netlink"
        or "nft" (the way they went), or None if they cannot be ordered or the kernel
        refused a step (the table is then replaced whole)."""
        if self._uses is None:
            self._uses = uses(last)
        how = self._uses
        if new_targets(how, last, ruleset):
            # A map now jumps where it did not: what a packet reaches changes with it.
            how = joined(how, uses(ruleset))
            self._uses = None
        try:
            steps = order(last, ruleset, how)
        except (ValueError, Unsupported):
            steps = None   # an element text the order cannot read: replace the table
        if steps is None:
            return None
        via: str | None = None
        before = last
        for i, step in enumerate(steps):
            if i:
                grace_period()
            try:
                via = self._send_step(before, step)
            except NftError:
                if len(steps) == 1:
                    raise
                return None   # a step the kernel refused (an overlap): replace the table
            if via is None:
                return None
            before = step
        return via

    def _send_step(self, last: Ruleset, ruleset: Ruleset) -> str | None:
        """Send the element changes from `last` to `ruleset` in one transaction: "netlink"
        or "nft" (the way they went), or None if the netlink batch was refused (nothing
        applied)."""
        if self._netlink_ns is not None:
            try:
                changes = set_changes(self._in_kernel(last).sets.values(),
                                      self._in_kernel(ruleset).sets.values())
            except Unsupported:
                changes = None
            if changes is not None:
                try:
                    with self._socket() as nl:
                        try:
                            nl.apply(self.table, changes, self._generation)
                            restart = False
                        except NetlinkError as e:
                            if e.code != errno.ERESTART:
                                raise
                            restart = True
                    # Another transaction came between (the agent's own DNS elements
                    # commit every second): if the table's shape is still ours, send the
                    # batch again against the new generation (the drift check uses the
                    # socket too, so it is taken again after it).
                    if restart:
                        if self.drifted() is not None:
                            return None
                        with self._socket() as nl:
                            nl.apply(self.table, changes, self._generation)
                except NetlinkError:
                    return None
                if self._generation is not None:
                    self._generation += 1   # the batch was checked against it
                return "netlink"
        script = self._in_kernel(ruleset).element_script(self._in_kernel(last))
        if script:
            self._run_script(script)
            self._generation = self.generation()
        return "nft"

    def _no_staging(self) -> str:
        """Script lines that delete `load.py`'s staging table, present or not."""
        staging = self.table + STAGING
        return f"table inet {staging}\ndelete table inet {staging}\n"

    def generation(self) -> int | None:
        """The kernel's ruleset generation (None without netlink): every committed
        transaction in the namespace raises it, so an unchanged generation means nobody
        changed anything since."""
        if self._netlink_ns is None:
            return None
        try:
            with self._socket() as nl:
                return nl.generation()
        except NetlinkError:
            return None

    def repair(self) -> ApplyResult:
        """Put the last applied ruleset back, whole."""
        if self.last is None:
            return ApplyResult(False, False, 0.0)
        start = time.perf_counter()
        via = self._replace(self.last)
        return ApplyResult(True, True, time.perf_counter() - start, via, self._fallback)

    def remove(self) -> None:
        """Delete the table (nothing of Bulkhead's stays in the kernel)."""
        self._run_script(self._no_staging()
                         + f"table inet {self.table}\ndelete table inet {self.table}\n")
        self.close()
        self.last = None
        self._terse = None
        self._generation = None
        self._tag = None

    # -- reading back -----------------------------------------------------------------
    def terse(self) -> str | None:
        """The table without set elements (cheap with big sets), None if it is absent."""
        done = self._nft(["-t", "-s", "list", "table", "inet", self.table])
        return done.stdout if done.returncode == 0 else None

    def _shape(self) -> str | None:
        """What drift is judged by: the table without set elements, None if it is absent.
        A digest of netlink dumps where netlink is used (the terse listing still reads
        every element), else `nft -t list table`."""
        if self._netlink_ns is not None:
            try:
                with self._socket() as nl:
                    fingerprint = nl.fingerprint(self.table)
                return None if fingerprint is None else "netlink " + fingerprint
            except NetlinkError:
                pass
        return self.terse()

    def counters(self) -> dict[str, int]:
        """The table's named counters and their packet counts ({} if none or absent)."""
        done = self._nft(["-j", "list", "counters", "table", "inet", self.table])
        if done.returncode != 0:
            return {}
        try:
            items = json.loads(done.stdout).get("nftables", [])
        except ValueError:
            return {}
        return {c["name"]: int(c.get("packets", 0)) for item in items
                if isinstance(item, dict) and isinstance(c := item.get("counter"), dict)
                and isinstance(c.get("name"), str)}

    def kernel_text(self) -> str | None:
        """The table as the kernel lists it, without counter values (`-s`), so a
        table with flow-log counters compares with what was rendered."""
        done = self._nft(["-s", "list", "table", "inet", self.table])
        return done.stdout if done.returncode == 0 else None

    def drifted(self) -> str | None:
        """None while the kernel holds what we applied; else what is wrong. If the
        ruleset generation is still the one our last commit made, nothing was changed;
        otherwise compares the table's chains, rules and set declarations (not elements)
        with what the kernel held right after the last full apply."""
        if self.last is None:
            return None
        generation = self.generation()
        if generation is not None and generation == self._generation:
            return None   # no transaction since ours: nothing to read
        now = self._shape()
        if now is None:
            return f"table inet {self.table} is missing"
        if now != self._terse:
            return f"table inet {self.table} was changed outside the agent"
        self._generation = generation   # another table changed; ours is as we left it
        return None

    def normalized(self, ruleset: Ruleset) -> str:
        """The ruleset as the kernel would list it: loaded into a throwaway network
        namespace (`unshare --net`), so nothing here changes. Raises NftError if the
        kernel would refuse it."""
        nft = self.argv[-1]
        # Listed by a second nft, after the first has committed its transaction. With
        # the map names the kernel's table has (or would have, loaded now).
        tag = self._tag
        if tag is None:
            kernel = self.kernel_table()
            tag = current_tag(kernel)
            tag = next_tag(kernel) if tag is None else tag
        shell = f'{nft} -f - && {nft} -s list table inet "$0"'
        done = self._nft([self.table], tagged(ruleset, tag).script(),
                         argv=["unshare", "--net", "sh", "-c", shell])
        if done.returncode != 0:
            raise NftError(_first_errors(done.stderr))
        return done.stdout

    def diff(self, ruleset: Ruleset) -> str:
        """A unified diff from the kernel's table to `ruleset`, in the kernel's wording."""
        before = _in_order(self.kernel_text() or "")
        after = _in_order(self.normalized(ruleset))
        return "".join(difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True),
            f"kernel: inet {self.table}", f"rendered: inet {self.table}"))


def _first_errors(stderr: str, limit: int = 20) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    text = "\n".join(lines[:limit])
    return text + (f"\n... ({len(lines) - limit} more lines)" if len(lines) > limit else "")


def _in_order(listing: str) -> str:
    """A table's listing with its declarations (sets, maps, counters, chains) sorted by
    their first line: the kernel lists chains in the order they were made, and a full
    apply keeps the chains it flushes where they were."""
    head: list[str] = []
    blocks: list[list[str]] = []
    tail: list[str] = []
    for line in listing.splitlines(keepends=True):
        if blocks and blocks[-1][-1] != "\t}\n" and blocks[-1][-1] != "\t}":
            blocks[-1].append(line)
        elif line.startswith("\t") and not line.startswith("\t\t") and \
                line.rstrip().endswith("{"):
            blocks.append([line])
        elif blocks:
            tail.append(line)
        else:
            head.append(line)
    return "".join(head + [line for block in sorted(blocks, key=lambda b: b[0])
                           for line in block] + tail)
