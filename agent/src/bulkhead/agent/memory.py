"""The agent's memory, kept small where the C allocator decides it (glibc only; elsewhere
these do nothing and say so).

- `limit_arenas`: glibc gives each thread that allocates its own arena (up to eight per
  core), and an arena keeps what it once held. The agent's one worker thread (applies
  run there) would keep the peak of the biggest apply in an arena of its own: with two
  arenas, about 3.5 MiB less at rest and 8 MiB less at the peak (agent/benchmarks/
  footprint.py, 10,000 host endpoints). Called before any thread starts.
- `give_back`: `malloc_trim(0)` returns the free pages of the heaps to the system.
- `settle`: after an apply from scratch, which builds and drops far more than it keeps:
  what is garbage is collected, what is left (the kept plan, the snapshot, the render
  cache: most of the process's objects) is frozen out of the cycle collector's view
  (`gc.freeze`), and free pages are given back. A change's own garbage is then collected
  without walking the hundreds of thousands of objects a large plan keeps. Objects frozen
  and later dropped are freed by their reference counts as before; only one caught in a
  reference cycle waits for the next `settle` (after an apply from scratch, at most
  once per `SETTLE_GAP` seconds, since the full collection holds the interpreter
  while it runs; and every `SETTLE_EVERY` applies).
- `collector_paused`: the cycle collector is held off while a change goes from the watch
  event to the kernel. A change leaves no reference cycles of its own (the render's one
  was taken out), but it builds new containers as big as the map it lands in (a verdict
  map's leaf of 100,000 pieces): a collection in the middle of it walks those, and at
  100,000 host endpoints that was most of what made a label change slower than at 100.
  The collections the change made due run as soon as the window closes, after the
  kernel holds the change: the same work, off the path a packet waits on.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from bulkhead.heap import limit_arenas, malloc_trim

__all__ = ["SETTLE_EVERY", "SETTLE_GAP", "collector_paused", "give_back", "limit_arenas",
           "settle"]

SETTLE_EVERY = 1000   # applies between two settles when none is from scratch
SETTLE_GAP = 10.0     # seconds at least between two settles after applies from scratch


def give_back() -> bool:
    """Return free heap pages to the system; False where there is no malloc_trim."""
    trim = malloc_trim()
    if trim is None:
        return False
    trim()
    return True


def settle() -> None:
    """Collect, freeze what is left, give free pages back (see the module's doc)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    give_back()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Hold the cycle collector off inside the block (see the module's doc); on the way
    out it is as it was (a block inside another leaves it off)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
