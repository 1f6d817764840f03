"""The last-known-good cache: what the agent last enforced, kept on disk (fail static).

After every successful apply the agent writes the objects it enforced and their revision
to `STATE_DIR/snapshot.json` atomically (a temporary file, fsync, rename, fsync of the
directory), so a crash at any moment leaves the old cache or the new one, never half of
one. At boot the agent enforces the cache before it talks to the server: a host that
reboots while the server is down comes back with its last policy, not with none.

The file is gzip (format 2): a JSON header line (format, node, revision), then one object
a line, compact JSON. `Texts` keeps the objects' texts between writes as gzip members,
one per shard of the objects, so that a write is the members joined (the shards a change
touched compressed again) and the texts take a tenth of their size in memory. A cache
of format 1 (one JSON document, the agent before) is read too.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.agent.files import write_atomically

CACHE_FILE = "snapshot.json"
FORMAT = 2            # gzip of JSON lines; FORMAT_1 (one JSON document) is read too
FORMAT_1 = 1
SHARDS = 64           # gzip members `Texts` keeps
LEVEL = 1             # gzip's level: a tenth of the size already, in a quarter ms a shard
# What the cache may hold once decompressed: the watch's largest body (a fleet's snapshot
# is one; bulkhead.agent.http.MAX_BODY) and room for the header. A file that inflates past
# it is refused, not read into memory.
MAX_INFLATED = (256 << 20) + (64 << 10)
Key = tuple[str, str]


class CacheError(Exception):
    """The cache exists but cannot be used (unreadable, not JSON, wrong shape)."""


@dataclass
class Cached:
    revision: int
    items: list[dict[str, Any]]
    node: str


def cache_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / CACHE_FILE


class Texts:
    """The objects' JSON texts (compact, on one line each), kept as the cache is written
    from them: in `SHARDS` gzip members, each the texts of its shard of the keys, one a
    line in key order. A change is held as it is until `parts()` compresses its shard
    again. Not thread-safe: `parts()` gives bytes, which the writer may use anywhere."""

    def __init__(self, shards: int = SHARDS) -> None:
        self._count = shards
        self._members: list[bytes] = [b""] * shards
        self._keys: list[list[Key]] = [[] for _ in range(shards)]  # each member's lines
        self._pending: dict[int, dict[Key, bytes | None]] = {}

    def _shard(self, key: Key) -> int:
        return zlib.crc32(f"{key[0]}/{key[1]}".encode()) % self._count

    def put(self, key: Key, text: bytes) -> None:
        """`key`'s text is `text` (one line: compact JSON has no newline)."""
        if b"\n" in text:
            raise ValueError(f"{key[0]} {key[1]}: the text is not one line")
        self._pending.setdefault(self._shard(key), {})[key] = text

    def drop(self, key: Key) -> None:
        self._pending.setdefault(self._shard(key), {})[key] = None

    def reset(self, texts: Mapping[Key, bytes]) -> None:
        """These texts and no others."""
        shards: list[dict[Key, bytes]] = [{} for _ in range(self._count)]
        for key, text in texts.items():
            if b"\n" in text:
                raise ValueError(f"{key[0]} {key[1]}: the text is not one line")
            shards[self._shard(key)][key] = text
        self._pending = {}
        for i, shard in enumerate(shards):
            self._pack(i, shard)

    def parts(self) -> list[bytes]:
        """The gzip members of the texts (the changed shards compressed again)."""
        for i, changes in self._pending.items():
            shard = self._shard_texts(i)
            for key, text in changes.items():
                if text is None:
                    shard.pop(key, None)
                else:
                    shard[key] = text
            self._pack(i, shard)
        self._pending = {}
        return [member for member in self._members if member]

    def texts(self) -> list[bytes]:
        """Every text, in key order."""
        self.parts()
        found: dict[Key, bytes] = {}
        for i in range(self._count):
            found.update(self._shard_texts(i))
        return [found[key] for key in sorted(found)]

    def _shard_texts(self, i: int) -> dict[Key, bytes]:
        if not self._members[i]:
            return {}
        lines = gzip.decompress(self._members[i]).split(b"\n")
        return dict(zip(self._keys[i], lines, strict=True))

    def _pack(self, i: int, shard: Mapping[Key, bytes]) -> None:
        keys = sorted(shard)
        self._keys[i] = keys
        self._members[i] = gzip.compress(b"\n".join(shard[k] for k in keys), LEVEL,
                                         mtime=0) if keys else b""


_NEWLINE = gzip.compress(b"\n", LEVEL, mtime=0)


def _line(item: Mapping[str, Any] | bytes) -> bytes:
    """An object as one line of compact JSON."""
    if isinstance(item, bytes):
        if b"\n" not in item:
            return item
        item = json.loads(item)
    return json.dumps(item, separators=(",", ":")).encode()


def save_cache(state_dir: str | Path, node: str, revision: int,
               items: Iterable[Mapping[str, Any] | bytes] = (),
               parts: Sequence[bytes] = ()) -> Path:
    """Write the cache atomically; raises OSError when the disk refuses. An item is an
    object, or its JSON text; `parts` are gzip members of texts, one a line
    (`Texts.parts()`), written as they are."""
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    head = json.dumps({"format": FORMAT, "node": node, "revision": revision},
                      separators=(",", ":")).encode()
    lines = [_line(item) for item in items]
    # A member's last line has no newline: each member after the header starts with one.
    body = b"".join([gzip.compress(head, LEVEL, mtime=0),
                     *(_NEWLINE + part for part in parts),
                     gzip.compress(b"".join(b"\n" + line for line in lines), LEVEL,
                                   mtime=0)])
    write_atomically(directory / CACHE_FILE, body)
    return directory / CACHE_FILE


def _inflated(raw: bytes, limit: int) -> bytes:
    """The gzip members of `raw` decompressed, one after another; CacheError past
    `limit` bytes (nothing more is decompressed) and EOFError for a member cut short."""
    out: list[bytes] = []
    size = 0
    while raw:
        member = zlib.decompressobj(wbits=31)       # 31: one gzip member
        data = member.decompress(raw, limit - size + 1)
        size += len(data)
        if size > limit:
            raise CacheError(f"more than {limit} bytes once decompressed")
        out.append(data)
        if not member.eof:
            raise EOFError("a gzip member is cut short")
        raw = member.unused_data
    return b"".join(out)


def load_cache(state_dir: str | Path) -> Cached | None:
    """The cache, or None if there is none yet; raises CacheError if it is unusable."""
    path = cache_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"cache {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            try:
                inflated = _inflated(raw, MAX_INFLATED)
            except CacheError as e:
                raise CacheError(f"cache {path}: {e}") from None
            head, *lines = inflated.split(b"\n")
            data = json.loads(head)
            if isinstance(data, dict) and data.get("format") == FORMAT:
                data["items"] = [json.loads(line) for line in lines if line]
        except (OSError, EOFError, zlib.error) as e:
            raise CacheError(f"cache {path}: not gzip ({e})") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CacheError(f"cache {path}: not JSON lines ({e})") from None
    else:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CacheError(f"cache {path}: not JSON ({e})") from None
        if isinstance(data, dict) and data.get("format") == FORMAT:
            data = None   # format 2 is gzip
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_1):
        raise CacheError(f"cache {path}: not a bulkhead-agent cache (format {FORMAT} or "
                         f"{FORMAT_1})")
    revision, items = data.get("revision"), data.get("items")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise CacheError(f"cache {path}: revision: must be a non-negative integer")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CacheError(f"cache {path}: items: must be a list of objects")
    return Cached(revision, items, str(data.get("node", "")))

