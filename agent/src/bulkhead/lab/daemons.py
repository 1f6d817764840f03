"""The host daemons (`bulkhead.lab.hostd`) from the controller's side: start one in each
lab host, and ask them to listen and to probe, one JSON line each way over their unix
sockets."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bulkhead
from bulkhead.lab.kernel import LabError
from bulkhead.lab.layout import LabHost, Layout
from bulkhead.lab.probe import ProbeResult, ProbeSpec
from bulkhead.lab.processes import log_tail, spawn

START_TIMEOUT = 15.0
REQUEST_SLACK = 10.0


class HostDaemons:
    """The daemons of the hosts of `lab`; their logs go to `log_dir`/HOST.hostd.log."""

    def __init__(self, lab: Layout, log_dir: Path) -> None:
        self.lab = lab
        self.log_dir = log_dir

    def start(self, hosts: Iterable[LabHost]) -> dict[str, subprocess.Popen[bytes]]:
        """Start the daemons of `hosts` (not waiting for them: see `wait_ready`)."""
        env = dict(os.environ)
        src = str(Path(bulkhead.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        return {h.name: spawn(h.ns, [sys.executable, "-m", "bulkhead.lab.hostd",
                                     "--socket", h.socket], self._log(h.name), env=env, cwd="/")
                for h in hosts}

    def wait_ready(self, started: Mapping[str, subprocess.Popen[bytes]]) -> None:
        """Wait until every daemon answers; LabError if one exits or START_TIMEOUT passes."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = dict(started)
        while waiting:
            for name, proc in list(waiting.items()):
                if proc.poll() is not None:
                    raise LabError(f"the host daemon of {name} exited with {proc.returncode}: "
                                   f"{log_tail(self._log(name))}")
                with contextlib.suppress(LabError):
                    self.request(name, {"op": "ping"}, timeout=1.0)
                    del waiting[name]
            if waiting:
                if time.monotonic() > deadline:
                    raise LabError(f"host daemons of {sorted(waiting)} not ready within "
                                   f"{START_TIMEOUT:.0f} s")
                time.sleep(0.02)

    def _log(self, host: str) -> Path:
        return self.log_dir / f"{host}.hostd.log"

    def request(self, host: str, payload: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """One request to `host`'s daemon; its answer, or LabError."""
        path = self.lab.host(host).socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(path)
                s.sendall(json.dumps(payload).encode() + b"\n")
                chunks: list[bytes] = []
                while not chunks or not chunks[-1].endswith(b"\n"):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except (FileNotFoundError, ConnectionRefusedError):
                raise LabError(f"the host daemon of {host} in lab {self.lab.name} is not "
                               f"running (no {path}); is the lab up?") from None
            except TimeoutError:
                raise LabError(f"the host daemon of {host} did not answer within "
                               f"{timeout:.1f} s") from None
        try:
            answer: dict[str, Any] = json.loads(b"".join(chunks))
        except ValueError:
            raise LabError(f"the host daemon of {host} sent no valid answer") from None
        if not answer.get("ok"):
            raise LabError(f"{host}: {answer.get('error', 'request failed')}")
        return answer

    def listen(self, host: str, tcp: Iterable[int], udp: Iterable[int], replace: bool
               ) -> dict[str, list[int]]:
        """Listen on these ports (`replace`: only these); the ports listened on after."""
        answer = self.request(host, {"op": "listen", "tcp": list(tcp), "udp": list(udp),
                                     "replace": replace}, timeout=REQUEST_SLACK)
        return {"tcp": list(answer["tcp"]), "udp": list(answer["udp"])}

    def probe_many(self, probes: Iterable[ProbeSpec]) -> list[ProbeResult]:
        """Run probes concurrently (all hosts at once, each host's probes in parallel);
        results in the order given. LabError if a probe could not be made at all."""
        checked: list[ProbeSpec] = []
        for p in probes:
            self.lab.host(p.src)
            family = p.family
            if family is None and p.src_ip is not None:
                family = 6 if ":" in p.src_ip else 4
            checked.append(p.checked(self.lab.resolve(p.dst, family)))
        by_src: dict[str, list[int]] = {}
        for i, p in enumerate(checked):
            by_src.setdefault(p.src, []).append(i)
        results: list[ProbeResult | None] = [None] * len(checked)

        def run(src: str) -> None:
            indices = by_src[src]
            specs = [checked[i] for i in indices]
            rounds = 1 + len(specs) // 512
            timeout = rounds * max(s.timeout for s in specs) + REQUEST_SLACK
            answer = self.request(src, {"op": "probe", "probes": [s.wire() for s in specs]},
                                  timeout=timeout)
            for i, spec, got in zip(indices, specs, answer["results"], strict=True):
                results[i] = _result(spec, got)

        if len(by_src) == 1:
            run(next(iter(by_src)))
        elif by_src:
            with ThreadPoolExecutor(max_workers=min(32, len(by_src))) as pool:
                list(pool.map(run, by_src))
        done = [r for r in results if r is not None]
        errors = [f"{r.spec.src} -> {r.spec.dst} {r.spec.proto}: {r.detail}"
                  for r in done if r.outcome not in ("open", "refused", "blocked")]
        if errors:
            raise LabError("probe could not be made: " + "; ".join(errors[:10]))
        return done


def _result(spec: ProbeSpec, got: Mapping[str, Any]) -> ProbeResult:
    outcome = str(got.get("outcome"))
    return ProbeResult(spec, outcome, float(got.get("elapsed", 0.0)),  # type: ignore[arg-type]
                       str(got.get("detail", "")))

