"""Flow records waiting for the server, on disk, bounded.

Each flush writes its records as numbered JSON-lines files (at most one ingest batch
each: MAX_BATCH records, and MAX_BATCH_BYTES once framed as a request body) in
STATE_DIR/flows/, atomically (a temporary file, fsync, rename), so a crash or a server
that is away loses nothing already written. The files are sent oldest first and
removed once the server has stored them. Past `max_bytes` the oldest files go first
(drop-oldest): their records are counted in `dropped`, never silently lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.agent.files import sync_directory
from bulkhead.model.dnslog import DnsRecord
from bulkhead.model.flowlog import MAX_BATCH, MAX_BATCH_BYTES, FlowRecord

SUFFIX = ".jsonl"
log = logging.getLogger("bulkhead.agent")


class SpoolWriteError(OSError):
    """A spool write failed (disk full, read-only): `written` records of the batch, the
    first ones, are on disk in whole files; the others are not, and no partial file is
    left."""

    def __init__(self, error: OSError, written: int) -> None:
        super().__init__(error.errno, f"{error.strerror or error}; {written} of the records "
                         "were spooled before it")
        self.written = written


@dataclass(frozen=True)
class Spooled:
    path: Path
    records: list[dict[str, Any]]


def _count(path: Path) -> int:
    """The number of records a spool file holds, from its name: SEQ-COUNT.jsonl."""
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


class Spool:
    def __init__(self, directory: Path, max_bytes: int, batch: int = MAX_BATCH,
                 batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.batch = batch
        self.batch_bytes = batch_bytes - 64    # room for {"records":[...]} and commas
        self.dropped = 0            # records removed to stay within max_bytes, or unreadable
        self.unremoved = 0          # files done with that could not be removed
        self._lock = threading.Lock()   # flushes and the shipper call from worker threads
        self._sending: Path | None = None   # the file being sent: never trimmed under it
        self._files: list[Path] = []
        self._sizes: dict[Path, int] = {}
        self._seq = 0
        self._opened = False

    def _open(self) -> None:
        """Create the directory and take up the files a previous run left, on first use:
        never at construction, so `bulkhead-agent --dry-run` (run as root before the
        first start) leaves no directory the service's user could not write."""
        if self._opened:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)   # a write a crash interrupted: never renamed
        self._files = sorted(self.directory.glob("*" + SUFFIX))
        self._sizes = {p: p.stat().st_size for p in self._files}
        self._seq = max((int(p.stem.split("-")[0]) for p in self._files
                         if p.stem.split("-")[0].isdigit()), default=0)
        self._opened = True

    # Read by status reports and /metrics on the event loop: no lock (a flush may hold it
    # through an fsync) and no disk; 0 until the spool is first used.
    @property
    def total_bytes(self) -> int:
        return sum(list(self._sizes.values()))

    @property
    def records(self) -> int:
        return sum(_count(p) for p in list(self._files))

    def put(self, records: Sequence[FlowRecord | DnsRecord]) -> None:
        """Write `records` as files; SpoolWriteError (how many were written) if a write
        fails, so the caller keeps only the others."""
        with self._lock:
            try:
                self._open()
            except OSError as e:
                raise SpoolWriteError(e, 0) from e
            self._put(records)

    def _put(self, records: Sequence[FlowRecord | DnsRecord]) -> None:
        chunk: list[bytes] = []
        size = 0
        before = len(self._files)
        try:
            for record in records:
                line = json.dumps(record.wire(), separators=(",", ":")).encode() + b"\n"
                if chunk and (len(chunk) >= self.batch or
                              size + len(line) > self.batch_bytes):
                    self._write(chunk)
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write(chunk)
        except OSError as e:
            # Written: the files renamed into place (even if the directory's fsync after
            # the last one failed: it is there, and will be sent).
            raise SpoolWriteError(e, sum(_count(p) for p in self._files[before:])) from e
        finally:
            self._trim()

    def _write(self, lines: list[bytes]) -> None:
        self._seq += 1
        path = self.directory / f"{self._seq:012d}-{len(lines)}{SUFFIX}"
        tmp = path.with_suffix(".tmp")
        data = b"".join(lines)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(path)
        except OSError:
            with contextlib.suppress(OSError):   # no partial file left behind
                tmp.unlink(missing_ok=True)
            raise
        self._files.append(path)
        self._sizes[path] = len(data)
        sync_directory(self.directory)

    def _trim(self) -> None:
        for path in list(self._files):
            if sum(self._sizes.values()) <= self.max_bytes:
                break
            if path != self._sending:
                self._drop(path)

    def _drop(self, path: Path) -> None:
        self.dropped += _count(path)
        self._done(path)

    def oldest(self) -> Spooled | None:
        """The oldest file's records; an unreadable file is dropped (and counted)."""
        with self._lock:
            self._open()
            while self._files:
                path = self._files[0]
                try:
                    lines = path.read_text(encoding="utf-8").splitlines()
                    self._sending = path
                    return Spooled(path, [json.loads(line) for line in lines if line])
                except (OSError, ValueError):
                    self._drop(path)
            return None

    def done(self, path: Path) -> OSError | None:
        """The server has the file's records (or they were dropped): remove it. The
        error if the file could not be removed (a read-only file system): it is
        forgotten all the same, never sent again by this process (a restart sends it
        again)."""
        with self._lock:
            error = self._done(path)
            if self._sending == path:
                self._sending = None
            return error

    def _done(self, path: Path) -> OSError | None:
        if path in self._sizes:
            del self._sizes[path]
            self._files.remove(path)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self.unremoved += 1
            log.error("a spool file could not be removed; forgotten until the agent restarts "
                      "(which sends it)", extra={"fields": {"path": str(path),
                                                           "error": e.strerror or str(e)}})
            return e
        return None
