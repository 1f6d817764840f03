"""Logging setup shared by bulkhead-server, bulkhead-agent and the CLI: one JSON object
per line on stderr (`time`, `level`, `logger`, `msg`, and any `fields` a record carries)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                               "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, *filters: logging.Filter) -> None:
    """JSON lines on stderr at `level` for every logger, through `filters`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for f in filters:
        handler.addFilter(f)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
