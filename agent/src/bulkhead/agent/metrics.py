"""`/metrics` in Prometheus' text format on a local port (127.0.0.1:9473 by default).

The server is a few lines on `asyncio.start_server`, not aiohttp.web: `GET /metrics` is
answered 200 (text/plain; version=0.0.4), anything else 404, a request that is not HTTP
400; each connection carries one request (HTTP/1.0 style: closed after the answer). A
request's head is bounded (`MAX_REQUEST` bytes, `MAX_REQUEST_LINES` lines) and must come
within `READ_TIMEOUT` seconds; at most `MAX_CLIENTS` connections are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from bulkhead.agent.status import Counters

log = logging.getLogger("bulkhead.agent.metrics")

MAX_REQUEST = 8 << 10        # a request line and its headers
MAX_REQUEST_LINES = 64
READ_TIMEOUT = 5.0           # seconds for the request to come, and for the answer to go
MAX_CLIENTS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class MetricsView:
    node: str
    applied_revision: int
    revision: int
    connected: bool
    errors: int
    counters: Counters
    flows: dict[str, int] = field(default_factory=dict)   # flow-log counters (camelCase)
    # Flow logs: each decision's hits, as (direction, tier, policy, rule, action, hits).
    hits: list[tuple[str, str, str, str, str, int]] = field(default_factory=list)
    dns: dict[str, float] = field(default_factory=dict)   # DNS snooping counters


def _metric(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        shown = repr(value) if isinstance(value, float) and not value.is_integer() \
            else str(int(value))
        lines.append(f"{name}{labels} {shown}")


def render_metrics(view: MetricsView) -> str:
    c = view.counters
    # (name, type, help, value): one sample each, without labels.
    single: list[tuple[str, str, str, float]] = [
        ("applied_revision", "gauge", "The revision of the policy the kernel holds.",
         view.applied_revision),
        ("revision", "gauge", "The latest revision seen from the server.", view.revision),
        ("connected", "gauge", "1 while the watch stream to the server is open.",
         int(view.connected)),
        ("errors", "gauge", "Errors in the last status (invalid objects, a failed apply).",
         view.errors),
        ("applies_total", "counter", "Successful applies.", c.applies),
        ("full_applies_total", "counter",
         "Applies and repairs that replaced the whole table.", c.full_applies),
        ("apply_failures_total", "counter",
         "Applies and repairs that failed (the kernel kept the previous ruleset).",
         c.failures),
        ("drift_repairs_total", "counter",
         "Times the kernel's ruleset differed from what was applied and was put back.",
         c.drift_repairs),
        ("reconnects_total", "counter",
         "Watch streams to the server opened again after one ended.", c.reconnects),
        ("status_failures_total", "counter", "Status reports the server did not take.",
         c.status_failures),
        ("last_apply_seconds", "gauge", "How long the last apply took.",
         c.last_apply_seconds),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in single:
        _metric(lines, f"bulkhead_agent_{name}", kind, help_text, [("", value)])
    _metric(lines, "bulkhead_agent_ruleset_objects", "gauge",
            "What the last apply left in the kernel, by kind (chains, rules, sets, elements).",
            [(f'{{kind="{kind}"}}', n) for kind, n in sorted(c.counts.items())])
    if view.flows:
        _metric(lines, "bulkhead_agent_flow_logs", "gauge",
                "Flow logs: records sent, refused, spooled and dropped, kernel overruns, "
                "open connections followed (by counter).",
                [(f'{{counter="{_label(k)}"}}', v) for k, v in sorted(view.flows.items())])
    if view.dns:
        _metric(lines, "bulkhead_agent_dns", "gauge",
                "DNS snooping: answers and queries read, untrusted and malformed packets, "
                "domain-set elements written, the name cache, and the time from an "
                "answer to its elements in the kernel (p50, p99 in ms), by counter.",
                [(f'{{counter="{_label(k)}"}}', v) for k, v in sorted(view.dns.items())])
    if view.hits:
        _metric(lines, "bulkhead_agent_rule_hits_total", "counter",
                "Connections each decision of the table took (its first packets), from "
                "the table's named counters.",
                [("{" + ",".join(f'{k}="{_label(v)}"' for k, v in zip(
                    ("direction", "tier", "policy", "rule", "action"), hit[:5], strict=True))
                  + "}", hit[5]) for hit in view.hits])
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    def __init__(self, view: Callable[[], MetricsView]) -> None:
        self._view = view
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=MAX_REQUEST)
        log.info("metrics listening", extra={"fields": {"listen": f"{host}:{port}"}})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._clients):
                writer.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self._clients.add(writer)
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await _read_request(reader)
            except TimeoutError:
                writer.transport.abort()     # said nothing (complete) in time: closed
                return
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                request = None
            status, body = self._answer(request)
            head = (f"HTTP/1.0 {status}\r\nContent-Type: "
                    f"{CONTENT_TYPE if status.startswith('200') else 'text/plain'}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            # drain() then waits for the whole answer to leave, not just most of it.
            writer.transport.set_write_buffer_limits(high=0)
            writer.write(head.encode() + body)
            async with asyncio.timeout(READ_TIMEOUT):
                await writer.drain()
            writer.close()
            return
        except (OSError, TimeoutError):
            pass
        except Exception:      # never let a bug here stop the listener: logged, closed
            log.exception("serving /metrics failed")
        finally:
            self._clients.discard(writer)
        # Not answered in time (a client that does not read): aborted, so its connection
        # and the answer still buffered for it do not stay (a close would wait to flush).
        writer.transport.abort()

    def _answer(self, request: tuple[str, str] | None) -> tuple[str, bytes]:
        if request is None:
            return "400 Bad Request", b"bad request\n"
        method, target = request
        if method == "GET" and target.split("?", 1)[0] == "/metrics":
            return "200 OK", render_metrics(self._view()).encode()
        return "404 Not Found", b"not found: GET /metrics\n"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """(method, target) of an HTTP request; its headers read to the empty line and not
    kept. ValueError when it is not a request."""
    line = await reader.readuntil(b"\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    size = len(line)
    for _ in range(MAX_REQUEST_LINES):
        header = await reader.readuntil(b"\n")
        size += len(header)
        if size > MAX_REQUEST:
            raise ValueError("request head too large")
        if header in (b"\r\n", b"\n"):
            return parts[0], parts[1]
    raise ValueError("too many header lines")
