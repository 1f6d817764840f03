# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Flow log queries (`GET /v1/flows`) from module options: times given as unix seconds,
a duration before now or ISO 8601, turned into the server's unix seconds; the filters
passed as the server names them. The server checks every value again and names the
parameter when it refuses one."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import math
import re
from datetime import datetime, timezone

# The units `bulkhead flows --since` takes.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+\Z")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")

# Options sent as they are, under the same name.
FILTERS = ("node", "reporter", "action", "policy", "tier", "selector", "endpoint")


def unix_seconds(value, name, now):
    """`value` (unix seconds, a duration before `now` such as `2h` or `1h30m`, or an ISO
    8601 time, UTC unless it has an offset) as unix seconds; ValueError naming the
    option `name` otherwise."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:   # an integer past any float: no time
            seconds = None
    elif isinstance(value, str):
        text = value.strip()
        if DURATION.match(text):
            seconds = now - sum(float(n) * UNITS[u] for n, u in DURATION_PART.findall(text))
        else:
            seconds = _number(text)
            if seconds is None:
                seconds = _iso(text)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            "%s: %r is not a time: give unix seconds (1764950400), a duration before now "
            "(30m, 2h, 1d, 1h30m) or an ISO 8601 time (2026-12-04T08:00:00Z)"
            % (name, _shown(value)))
    return seconds


def _shown(value):
    """The value for a message: text cut at 60 characters, a huge integer by its size."""
    if isinstance(value, str):
        return value[:60]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 30:
        return "an integer of %d digits" % len(str(abs(value)))
    return value


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def _iso(text):
    if not text or not text[0].isdigit():
        return None
    # fromisoformat takes `Z` only from Python 3.11 on.
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def wire_seconds(seconds):
    """Unix seconds as the query string carries them: to the microsecond, no trailing
    zeros."""
    text = "%.6f" % seconds
    return text.rstrip("0").rstrip(".")


def _window(params, now):
    """The query's `since` and `until` as the server reads them, and as unix seconds
    (None when not given)."""
    query = {}
    times = {}
    for name in ("since", "until"):
        value = params.get(name)
        times[name] = None if value is None else unix_seconds(value, name, now)
        if times[name] is not None:
            query[name] = wire_seconds(times[name])
    return query, times


def flow_query(params, now):
    """The query parameters for `GET /v1/flows` from the module's options, and the `since`
    and `until` they name (unix seconds, None when not given)."""
    query, times = _window(params, now)
    for name in FILTERS:
        if params.get(name) is not None:
            query[name] = params[name]
    if params.get("staged_differs"):
        query["staged"] = "differs"
    if params.get("top") is not None:
        query["top"] = str(params["top"])
    elif params.get("limit") is not None:
        query["limit"] = str(params["limit"])
    return query, times["since"], times["until"]


DNS_FILTERS = ("node", "client", "qname", "rcode")


def dns_query(params, now):
    """The query parameters for `GET /v1/dns` from the module's options, and the `since`
    and `until` they name (unix seconds, None when not given)."""
    query, times = _window(params, now)
    for name in DNS_FILTERS:
        if params.get(name) is not None:
            query[name] = params[name]
    if params.get("limit") is not None:
        query["limit"] = str(params["limit"])
    return query, times["since"], times["until"]


def read_dns(client, params, now):
    """The dns_logs_info module's result: `dns` and `truncated`, and the time range."""
    query, since, until = dns_query(params, now)
    answer = client.dns(query)
    return {"changed": False, "since": since, "until": until, "dns": answer["dns"],
            "truncated": bool(answer.get("truncated"))}


def read_flows(client, params, now):
    """The module's result: `flows` (or `top` with the option top) and `truncated`, and
    the time range asked for."""
    query, since, until = flow_query(params, now)
    answer = client.flows(query)
    result = {"changed": False, "since": since, "until": until,
              "truncated": bool(answer.get("truncated"))}
    if "top" in query:
        result["top"] = answer["top"]
    else:
        result["flows"] = answer["flows"]
    return result
