"""The last-known-good cache: what the agent last enforced, kept on disk (fail static).

After every successful apply the agent writes the objects it enforced and their revision
to `STATE_DIR/snapshot.json` atomically (a temporary file, fsync, rename, fsync of the
directory), so a crash at any moment leaves the old cache or the new one, never half of
one. At boot the agent enforces the cache before it talks to the server: a host that
reboots while the server is down comes back with its last policy, not with none.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FILE = "snapshot.json"
FORMAT = 1


class CacheError(Exception):
    """The cache exists but cannot be used (unreadable, not JSON, wrong shape)."""


@dataclass
class Cached:
    revision: int
    items: list[dict[str, Any]]
    node: str


def cache_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / CACHE_FILE


def save_cache(state_dir: str | Path, node: str, revision: int,
               items: Sequence[Mapping[str, Any] | bytes]) -> Path:
    """Write the cache atomically; raises OSError when the disk refuses. An item is an
    object, or its JSON text (written as it is: the agent keeps its objects as text)."""
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    head = json.dumps({"format": FORMAT, "node": node, "revision": revision},
                      separators=(",", ":")).encode()
    body = b"".join([head[:-1], b',"items":[', b",".join(
        item if isinstance(item, bytes) else json.dumps(item, separators=(",", ":")).encode()
        for item in items), b"]}"])
    fd, tmp = tempfile.mkstemp(prefix=".snapshot.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, directory / CACHE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return directory / CACHE_FILE


def load_cache(state_dir: str | Path) -> Cached | None:
    """The cache, or None if there is none yet; raises CacheError if it is unusable."""
    path = cache_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"cache {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"cache {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"cache {path}: not a bulkhead-agent cache (format {FORMAT})")
    revision, items = data.get("revision"), data.get("items")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise CacheError(f"cache {path}: revision: must be a non-negative integer")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CacheError(f"cache {path}: items: must be a list of objects")
    return Cached(revision, items, str(data.get("node", "")))

