"""bulkhead.agent.memory on this machine's glibc: the arena limit is taken, and freed
heap pages go back to the system (RSS falls) when `give_back` is called."""

from __future__ import annotations

import subprocess
import sys

from bulkhead.agent.memory import give_back, limit_arenas

PROBE = """
import re, threading
from bulkhead.agent.memory import give_back, limit_arenas
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
assert limit_arenas(2)
held = []
def build():   # blocks past pymalloc's (malloc's own), in a thread
    held.extend(bytearray(1000) for _ in range(50_000))
t = threading.Thread(target=build); t.start(); t.join()
pinned = held[::64]     # a few kept all along the heap: free() alone cannot shrink it
peak = rss()
held.clear()
before = rss()
assert give_back()
print(peak, before, rss())
"""


def test_the_arena_limit_is_taken_and_trim_gives_pages_back() -> None:
    assert limit_arenas(2) and give_back()
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    peak, before, after = map(int, out)
    # KiB: freeing alone left most of the 50 MB in the process; the trim gave it back.
    assert before - after > 20_000, (peak, before, after)


def test_settle_freezes_what_is_kept_and_the_next_settle_frees_its_cycles() -> None:
    import gc
    import weakref

    from bulkhead.agent.memory import settle

    class Node:
        def __init__(self) -> None:
            self.me = self          # a reference cycle: only the collector frees it

    try:
        garbage = Node()
        gone = weakref.ref(garbage)
        kept = Node()
        held = weakref.ref(kept)
        del garbage
        settle()
        assert gone() is None                 # garbage before the settle: collected
        assert gc.get_freeze_count() > 0      # what is left is frozen
        del kept
        gc.collect()
        assert held() is not None             # frozen: the collector does not see it
        settle()
        assert held() is None                 # the next settle unfreezes and collects
    finally:
        gc.unfreeze()


def test_the_collector_is_held_off_in_the_block_and_as_it_was_after() -> None:
    import gc

    from bulkhead.agent.memory import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():                 # inside another: still off after it
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with collector_paused():
            raise ValueError("in the block")
    except ValueError:
        pass
    assert gc.isenabled()                         # on again after an error too
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()                 # it was off: left off
    finally:
        gc.enable()
