"""What the server accepts from a client, as plain checks: query parameters, agent status.

Every check raises `BadInput` with a message naming the parameter or field; the API turns
it into a 4xx. Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_REVISION = 2**63 - 1            # etcd's revisions are int64, SQLite's INTEGER too
MAX_WAIT = 300.0                    # seconds a long-poll or heartbeat interval may last
MIN_HEARTBEAT = 0.1                 # a stream sends at most ten heartbeats a second
MAX_SELECTOR = 4096                 # characters in ?selector=
MAX_NAME = 253                      # a resource or node name (a DNS subdomain's length)

STATUS_MAX_BYTES = 64 * 1024        # an agent's status body
STATUS_MAX_ERRORS = 20             # errors kept of a report (the last says how many more)
STATUS_MAX_ERROR_CHARS = 1024
STATUS_MAX_COUNTERS = 256
STATUS_MAX_COUNTER_NAME = 128


class BadInput(ValueError):
    """A parameter or field the server refuses; the message says which and why."""


def revision_param(raw: str | None, name: str = "revision") -> int | None:
    """An optional non-negative revision: digits only, at most int64."""
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_REVISION:
        raise BadInput(f"{name}: {raw[:40]!r} is not a revision (an integer from 0 to "
                       f"{MAX_REVISION})")
    return int(raw)


def seconds_param(raw: str | None, name: str, default: float, low: float,
                  high: float = MAX_WAIT) -> float:
    """An optional finite number of seconds in [low, high]."""
    if raw is None or raw == "":
        return default
    try:
        value = float(raw) if len(raw) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not low <= value <= high:
        raise BadInput(f"{name}: {raw[:40]!r} is not a number of seconds from {low:g} to "
                       f"{high:g}")
    return value


def flag_param(raw: str | None, name: str) -> bool:
    if raw is None or raw.lower() in ("", "0", "false"):
        return False
    if raw.lower() in ("1", "true"):
        return True
    raise BadInput(f"{name}: {raw[:40]!r} is not true or false")


def shorten(text: str, limit: int = STATUS_MAX_ERROR_CHARS) -> str:
    """`text` cut in the middle to at most `limit` characters, saying so."""
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]} ... ({len(text) - 2 * half:,} characters cut) ... {text[-half:]}"


def printable(text: str) -> str:
    """`text` with control characters (but tab and newline) written as escapes."""
    if all(ch.isprintable() or ch in "\t\n" for ch in text):
        return text
    return "".join(ch if ch.isprintable() or ch in "\t\n" else
                   ch.encode("unicode_escape").decode("ascii") for ch in text)


AGENT_VERSION = re.compile(r"bulkhead-agent/([0-9A-Za-z][0-9A-Za-z.+_-]{0,63})")


def agent_version(user_agent: str | None) -> str | None:
    """The version a status report's `User-Agent: bulkhead-agent/VERSION` names (letters,
    digits, `.+_-`, at most 64), or None: an agent of an earlier build said no version, and
    a header of another form is not taken (never refused: the report counts either way)."""
    if user_agent is None:
        return None
    found = AGENT_VERSION.fullmatch(user_agent)
    return found.group(1) if found else None


def agent_status(node: str, body: Any) -> dict[str, Any]:
    """The fields of an AgentStatus report, checked: appliedRevision an integer in
    [0, 2**63), errors a list of strings (the first STATUS_MAX_ERRORS kept, each cut to
    STATUS_MAX_ERROR_CHARS),
    counters a small mapping of names to
    finite numbers. Control characters other than tab and newline in error strings are
    stored as escapes, so nothing an agent reports can drive a terminal that prints it."""
    where = f"AgentStatus {node}"
    if not isinstance(body, dict):
        raise BadInput(f"{where}: the body must be a JSON object")
    unknown = sorted(set(body) - {"appliedRevision", "errors", "counters"})
    if unknown:
        raise BadInput(f"{where}: {unknown[0]}: unknown field")
    revision = body.get("appliedRevision")
    if isinstance(revision, bool) or not isinstance(revision, int) or \
            not 0 <= revision <= MAX_REVISION:
        raise BadInput(f"{where}: appliedRevision: must be an integer from 0 to "
                       f"{MAX_REVISION}")
    errors = body.get("errors") or []
    if not isinstance(errors, list):
        raise BadInput(f"{where}: errors: must be a list of strings")
    for i, error in enumerate(errors):
        if not isinstance(error, str):
            raise BadInput(f"{where}: errors[{i}]: must be a string")
    counters = body.get("counters") or {}
    if not isinstance(counters, dict) or len(counters) > STATUS_MAX_COUNTERS:
        raise BadInput(f"{where}: counters: must be a mapping of at most "
                       f"{STATUS_MAX_COUNTERS} names to numbers")
    for key, value in counters.items():
        if len(key) > STATUS_MAX_COUNTER_NAME or not key.isprintable() or not key:
            raise BadInput(f"{where}: counters: {key[:40]!r}: a counter name is 1 to "
                           f"{STATUS_MAX_COUNTER_NAME} printable characters")
        # The range first: isfinite() of an integer beyond a float's range raises.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                abs(value) > 2**63 or not math.isfinite(value):
            raise BadInput(f"{where}: counters.{key}: must be a finite number")
    if len(errors) > STATUS_MAX_ERRORS:
        more = len(errors) - STATUS_MAX_ERRORS + 1
        errors = [*errors[:STATUS_MAX_ERRORS - 1], f"... and {more} more errors"]
    return {"appliedRevision": revision, "errors": [shorten(printable(e)) for e in errors],
            "counters": dict(counters)}
