"""Flow records as JSON lines on disk, for log shippers (fluentd's `in_tail`, Vector's
`file` source, Filebeat) to tail: a sink beside the queried store, never queried itself.

Every batch the store took is appended to `PATH` as one JSON object a line (the record's
fields and `received`), in one write, so a reader never sees half a batch unless the disk
fills. Before a batch would take the file past `max_bytes`, the file is rotated as
logrotate does by default (rename, then create): `PATH.(keep-1)` is removed,
`PATH.N` becomes `PATH.N+1`, `PATH` becomes `PATH.1`, and a new, empty `PATH` is created.
Shippers that follow the file by name and inode (all of the above do) finish the renamed
file, then open the new one. A batch is never split across files; one bigger than
`max_bytes` makes a file of its own. At most `keep` files exist (at least 2: the file
being written and the one a shipper may still be reading): `PATH` and `PATH.1` to
`PATH.(keep-1)`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bulkhead.model.dnslog import DnsRecord
from bulkhead.model.flowlog import FlowRecord

FILE_MODE = 0o640


class JsonLinesSink:
    def __init__(self, path: str | Path, max_bytes: int, keep: int) -> None:
        if max_bytes < 1 or keep < 2:
            raise ValueError("max_bytes must be at least 1 and keep at least 2")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rotations = 0

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def rotate(self) -> None:
        """Rename PATH to PATH.1 (and each older one a number up), then create PATH."""
        self._rotated(self.keep - 1).unlink(missing_ok=True)
        for n in range(self.keep - 2, 0, -1):
            if self._rotated(n).exists():
                os.replace(self._rotated(n), self._rotated(n + 1))
        if self.path.exists():
            os.replace(self.path, self._rotated(1))
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE))
        self.rotations += 1

    def write(self, records: Sequence[FlowRecord | DnsRecord],
              received: float | None = None) -> int:
        """Append one line per record; the bytes written. OSError if the disk refuses."""
        if not records:
            return 0
        stamp = time.time() if received is None else received
        data = "".join(json.dumps({**r.json(), "received": stamp}, separators=(",", ":"))
                       + "\n" for r in records).encode()
        with self._lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.max_bytes:
                self.rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        return len(data)
