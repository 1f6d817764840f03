"""`/metrics` in Prometheus' text format on a local port (127.0.0.1:9473 by default)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from bulkhead.agent.status import Counters

log = logging.getLogger("bulkhead.agent.metrics")


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
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(self._view()), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Type": "version=0.0.4"})

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics listening", extra={"fields": {"listen": f"{host}:{port}"}})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
