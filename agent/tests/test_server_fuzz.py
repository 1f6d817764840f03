"""Fuzz tests (hypothesis) of the API of a real bulkhead-server process and of the
manifest loader: whatever a client sends, the answer is a 2xx or a 4xx with a JSON error,
never a 5xx or a traceback, and other clients are not stalled (healthz under 1 s)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead import pki
from bulkhead.model import LoadError, ValidationError, documents, json_value, load_text
from tests.test_server_hardening import Hardened, http, raw_request

STALL_BOUND = 1.0   # seconds a healthz probe may take while the fuzzer runs

KINDS = ["Tier", "GlobalNetworkPolicy", "gnp", "HostEndpoint", "GlobalNetworkSet",
         "StagedGlobalNetworkPolicy", "Profile", "nope"]
PARAMS = ["revision", "timeout", "stream", "dryRun", "mode", "selector", "resourceVersion",
          "tier", "owner", "limit", "kind", "name", "ignoreNotFound"]
CTYPES = ["application/json", "application/yaml", "text/plain", "application/json; charset=x",
          "application/yaml; charset=latin-1", "", "multipart/form-data; boundary=x"]

names = st.text(min_size=0, max_size=300)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30)


def resourceish() -> st.SearchStrategy[Any]:
    """Documents shaped like resources, with random holes, so validation runs deep."""
    rule = st.fixed_dictionaries({}, optional={
        "action": st.sampled_from(["Allow", "Deny", "Pass", "Log", "x"]) | json_values,
        "protocol": st.sampled_from(["TCP", "UDP", 6, "ICMP", 300]) | json_values,
        "source": st.fixed_dictionaries({}, optional={
            "nets": st.lists(st.sampled_from(["198.18.0.0/24", "::/0", "x", "1.2.3.4/40"])),
            "selector": st.sampled_from(["a == 'b'", "has(x", "all()", ""]) | st.text()}),
        "destination": st.fixed_dictionaries({}, optional={
            "ports": st.lists(st.sampled_from([80, "80:90", "http", -1, 70000]) | json_values,
                              max_size=3)})})
    spec = st.fixed_dictionaries({}, optional={
        "tier": st.sampled_from(["default", "t1"]) | json_values,
        "order": st.sampled_from([1, 1e308, -1]) | json_values,
        "selector": st.text(max_size=40), "types": json_values,
        "ingress": st.lists(rule, max_size=3), "egress": st.lists(rule, max_size=3),
        "nets": json_values, "node": json_values, "expectedIPs": json_values})
    return st.fixed_dictionaries({
        "apiVersion": st.sampled_from(["projectcalico.org/v3", "v1"]),
        "kind": st.sampled_from(KINDS[:-1]) | st.text(max_size=10),
        "metadata": st.fixed_dictionaries({"name": names}, optional={"labels": json_values}),
        "spec": spec})


def previewish() -> st.SearchStrategy[Any]:
    """Preview requests with random holes: manifests that parse, or not, and each field
    of every type."""
    manifests = st.lists(resourceish(), max_size=3).map(
        lambda docs: "\n---\n".join(json.dumps(d) for d in docs)) | st.text(max_size=200)
    return st.fixed_dictionaries({}, optional={
        "manifests": manifests | json_values,
        "promote": st.sampled_from(["all", "none", ["p1"], [], ["x" * 300]]) | json_values,
        "hours": st.sampled_from([1, 0, 1e308, -1, 24.5, 2160, 2161]) | json_values,
        "until": st.sampled_from([0, 1e12, -5]) | json_values,
        "protected": st.sampled_from(["app == 'db'", "has(x", "x" * 5000]) | json_values,
        "enforce": st.sampled_from(["all()", "app in {", ""]) | json_values,
        "limit": st.sampled_from([1, 0, 1000, 1001, True]) | json_values})


bodies = st.one_of(
    previewish().map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    resourceish().map(lambda v: json.dumps(v).encode()),
    st.lists(resourceish(), max_size=4).map(lambda v: json.dumps(v).encode()),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"a: &a [1]\nb: *a\n", b"? [1, 2]\n: x\n", b"[" * 5000,
                     b"- " * 2000 + b"x", b"{\"a\": 1, \"a\": 2}", b"[NaN, Infinity]"]))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, str]:
    route = draw(st.sampled_from(["apply", "list", "kind", "one", "status", "nodes", "watch",
                                  "snapshot", "metrics", "random", "delete", "sync",
                                  "rollback", "export", "history", "promote", "flows",
                                  "preview"]))
    kind = urllib.parse.quote(draw(st.sampled_from(KINDS) | st.text(max_size=20)), safe="")
    name = urllib.parse.quote(draw(names), safe="")
    method, path = {
        "apply": ("POST", "/v1/apply"), "list": ("GET", "/v1/resources"),
        "kind": (draw(st.sampled_from(["GET", "POST"])), f"/v1/resources/{kind}"),
        "one": (draw(st.sampled_from(["GET", "PUT", "DELETE"])), f"/v1/resources/{kind}/{name}"),
        "status": ("POST", f"/v1/status/{name}"), "nodes": ("GET", "/v1/nodes"),
        "watch": ("GET", "/v1/watch"), "snapshot": ("GET", "/v1/snapshot"),
        "metrics": ("GET", "/metrics"), "delete": ("POST", "/v1/delete"),
        "sync": ("POST", "/v1/sync"), "rollback": ("POST", "/v1/rollback"),
        "export": ("GET", "/v1/export"), "history": ("GET", "/v1/history"),
        "promote": ("POST", "/v1/promote"), "preview": ("POST", "/v1/preview"),
        "flows": (draw(st.sampled_from(["GET", "POST"])), "/v1/flows"),
        "random": (draw(st.sampled_from(["GET", "POST", "PATCH", "OPTIONS"])),
                   "/" + urllib.parse.quote(draw(st.text(max_size=30)), safe="/")),
    }[route]
    query = draw(st.dictionaries(st.sampled_from(PARAMS) | st.text(max_size=8),
                                 st.text(max_size=30) | st.sampled_from(
                                     ["0", "-1", "1e-9", "nan", "1e999", "9" * 5000, "true"]),
                                 max_size=3))
    if route == "watch":  # a stream must end: the fuzzer asks for long-polls only
        query.pop("stream", None)
        query["timeout"] = draw(st.sampled_from(["0", "0.01", "x", "-1", "nan"]))
    if query:
        path += "?" + urllib.parse.urlencode(query)
    body = draw(bodies) if method in ("POST", "PUT") else b""
    return method, path, body, draw(st.sampled_from(CTYPES))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hardened, list[float]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    pki.init_ca(tmp)
    pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
    server = Hardened(tmp)
    server.start()
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:  # another client, all along: its answers must stay prompt
        while not stop.wait(0.1):
            started = time.monotonic()
            server.conn.request("GET", "/healthz")
            latencies.append(time.monotonic() - started)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        yield server, latencies
    finally:
        stop.set()
        prober.join(15)
        server.kill()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=requests(), role=st.sampled_from(["admin", "viewer", "agent"]))
def test_no_request_gets_a_5xx(fuzzed: tuple[Hardened, list[float]],
                               request: tuple[str, str, bytes, str], role: str) -> None:
    server, _ = fuzzed
    method, path, body, ctype = request
    ctx = _contexts(server)[role]
    status, answer = raw_request(server, ctx, http(method, path, body,
                                                   {"Content-Type": ctype} if ctype else {}))
    assert status < 500, (method, path, body[:200], answer[:500])
    head, _, text = answer.partition(b"\r\n\r\n")
    if status >= 400 and b"application/json" in head:
        error = json.loads(text)["error"]
        assert error["code"] == status and error["message"]
    elif status >= 400:  # refused by aiohttp's HTTP parser before any handler ran
        assert status == 400 and len(path) > 8000, answer[:300]


def test_the_fuzzed_server_logged_no_traceback_and_stalled_no_one(
        fuzzed: tuple[Hardened, list[float]]) -> None:
    # Runs after the fuzzer (pytest keeps file order) on the same server.
    server, latencies = fuzzed
    log = server.log.read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]
    assert latencies and max(latencies) < STALL_BOUND, max(latencies, default=None)


_CONTEXTS: dict[int, dict[str, Any]] = {}


def _contexts(server: Hardened) -> dict[str, Any]:
    """TLS contexts by role. Not `alice`, whose files the prober's connection reads:
    issuing them again under it could hand it a key from one issue and a certificate
    from the other."""
    if id(server) not in _CONTEXTS:
        _CONTEXTS[id(server)] = {"admin": server.tls("fuzz-admin", "admin"),
                                 "viewer": server.tls("val", "viewer"),
                                 "agent": server.tls("web-1", "agent")}
    return _CONTEXTS[id(server)]


# ------------------------------------------------------------------------- the loader
@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=400) | st.sampled_from(
    ["a: &a [1]\nb: *a", "? [1]\n: 2", "<<: {a: 1}", "[" * 3000, "- " * 3000 + "x",
     "kind: List\nitems: 3", "!!python/object:os.system x"]))
def test_the_loader_raises_only_its_own_errors(text: str) -> None:
    try:
        load_text(text, "fuzz")
    except (LoadError, ValidationError) as e:
        assert str(e)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_strict_json_raises_only_load_errors(raw: bytes) -> None:
    try:
        json_value(raw, "fuzz")
    except LoadError as e:
        assert str(e).startswith("fuzz: not valid JSON")


def test_documents_of_an_empty_file(tmp_path: Path) -> None:
    assert documents("", "x") == [] and documents("---\n---\n", "x") == []
