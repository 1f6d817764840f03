"""The C heap, where glibc decides it (the server's listener and the agent share these;
elsewhere they do nothing and say so).

- `malloc_trim`: glibc's `malloc_trim(0)`, free pages of the C heap back to the system.
- `limit_arenas`: at most that many malloc arenas (glibc gives each thread that
  allocates one of its own, which keeps the peak it once held).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

M_ARENA_MAX = -8      # mallopt's parameter number (glibc's malloc.h)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None          # not glibc (musl has neither mallopt's arenas nor trim)
    return libc


def malloc_trim() -> Callable[[], object] | None:
    """A call of `malloc_trim(0)`, or None where the C library has none (musl, macOS)."""
    libc = _glibc()
    if libc is None:
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def limit_arenas(count: int = 2) -> bool:
    """At most `count` malloc arenas; False where that cannot be set."""
    libc = _glibc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, count) == 1
