"""The seam between the agent and a dataplane: what the sync loop asks of an enforcer.

The agent owns the timing (when to apply, when to look for drift, what to report); an
enforcer owns the kernel. Its calls block (they run `nft` or talk to HNS), so the agent
calls them from a worker thread, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from bulkhead.model import Snapshot
from bulkhead.policy.trace import Decision


@dataclass
class EnforceReport:
    revision: int
    full: bool                 # whole table replaced (False: set elements only, or nothing)
    changed: bool
    seconds: float
    counts: dict[str, int]     # e.g. chains, rules, sets, elements
    warnings: list[str]
    # The apply put the first ruleset into a kernel that had none: connections opened
    # before (the agent's own watch) were not tracked, and conntrack now sees them
    # mid-stream, as new connections that policy may drop.
    created: bool = False
    # The plan was calculated from scratch (not a change folded into the kept one).
    scratch: bool = False
    # Flow logs: the NFLOG prefixes the applied table logs with, and what they name.
    decisions: dict[str, Decision] = field(default_factory=dict)
    # Domain sets: each set's name and the domain patterns it holds addresses for.
    domain_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # What of this node's plan the dataplane does not enforce (among `warnings`): a host
    # endpoint with no interface here that has its expectedIPs, or whose interface another
    # endpoint took. The agent reports them in its status `errors` until they are gone.
    unenforced: list[str] = field(default_factory=list)


class EnforceError(Exception):
    """The apply failed; the kernel still holds the previous ruleset."""


class Enforcer(Protocol):
    # `changed`: the objects (kind, name) that changed since the last call; None: any
    def enforce(self, snapshot: Snapshot, revision: int,
                changed: Iterable[tuple[str, str]] | None = None) -> EnforceReport: ...
    def drift(self) -> str | None: ...          # None: kernel holds what was applied; else why not
    def repair(self) -> EnforceReport: ...      # re-apply the last ruleset
    def dry_run(self, snapshot: Snapshot) -> tuple[str, str]: ...  # (ruleset text, diff vs kernel)
