"""Who a request comes from (issue 23): the client certificate is read once per TLS
connection, not once per request; revocation still holds per request on a connection
already open; two connections never share an identity; the server's TLS refuses
renegotiation, so a connection's certificate cannot change."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from typing import Any

import aiohttp
import pytest

from bulkhead import pki
from bulkhead.server import app as server_app
from bulkhead.server.main import ServerConfig
from tests.conftest import Server

REVOKED_WITHIN = 5.0   # the CRL is looked at about once a second


def netset(name: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": name}, "spec": {"nets": ["198.18.0.0/24"]}}


def one_connection(server: Server, name: str, role: str) -> aiohttp.ClientSession:
    """A client that sends every request over one kept-alive connection."""
    crt, key = pki.issue(server.pki, name, role=role)
    ctx = ssl.create_default_context(cafile=str(server.pki / "ca.crt"))
    ctx.load_cert_chain(crt, key)
    return aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(
        ssl=ctx, limit=1))


class CountingLoads:
    """Counts the client certificates the server parses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.real = server_app.x509.load_der_x509_certificate
        monkeypatch.setattr(server_app.x509, "load_der_x509_certificate", self)

    def __call__(self, der: bytes) -> Any:
        self.count += 1
        return self.real(der)


async def test_a_connections_certificate_is_read_once(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = CountingLoads(monkeypatch)
    async with one_connection(server, "alice", "admin") as alice:
        for i in range(5):
            async with alice.post("/v1/resources/GlobalNetworkSet", json=netset(f"a{i}")) as r:
                assert r.status == 201, await r.text()
        assert len(alice.connector._conns) == 1   # type: ignore[union-attr]
    assert loads.count == 1


async def test_two_connections_keep_their_own_identities(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = CountingLoads(monkeypatch)
    async with one_connection(server, "alice", "admin") as alice, \
            one_connection(server, "victor", "viewer") as victor:
        for i in range(3):   # interleaved, each on its own connection
            async with alice.post("/v1/resources/GlobalNetworkSet", json=netset(f"a{i}")) as r:
                assert r.status == 201
            async with victor.post("/v1/resources/GlobalNetworkSet",
                                   json=netset(f"v{i}")) as r:
                assert r.status == 403
                assert (await r.json())["error"]["message"].startswith("viewer victor ")
            async with victor.get("/v1/resources/GlobalNetworkSet") as r:
                assert r.status == 200
    assert loads.count == 2


async def test_a_revoked_certificate_is_refused_on_a_connection_already_open(
        server: Server) -> None:
    async with one_connection(server, "alice", "admin") as alice:
        async with alice.get("/v1/resources") as r:
            assert r.status == 200
        pki.revoke(server.pki, name="alice")
        deadline = time.monotonic() + REVOKED_WITHIN
        while True:
            async with alice.post("/v1/resources/GlobalNetworkSet", json=netset("late")) as r:
                if r.status == 403:
                    assert (await r.json())["error"]["message"] == "certificate revoked"
                    break
                assert r.status == 201 and time.monotonic() < deadline
            await alice.delete("/v1/resources/GlobalNetworkSet/late")
            await asyncio.sleep(0.05)
        assert len(alice.connector._conns) == 1   # type: ignore[union-attr]
        async with alice.get("/v1/resources") as r:
            assert r.status == 403


def test_the_servers_tls_refuses_renegotiation(tmp_path: Any) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", server=True, hosts=("127.0.0.1",))
    config = ServerConfig(tls_cert=str(tmp_path / "server.crt"),
                          tls_key=str(tmp_path / "server.key"),
                          client_ca=str(tmp_path / "ca.crt"))
    assert config.ssl_context().options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.parametrize("serial", ["0", "-5"])
async def test_a_certificate_that_could_not_be_revoked_is_refused(
        server: Server, tmp_path: Any, serial: str) -> None:
    """A certificate of the CA whose serial number is not positive (openssl signs one when
    told to): no CRL can name it, so the server takes no role from it (403)."""
    key, csr, crt = tmp_path / "z.key", tmp_path / "z.csr", tmp_path / "z.crt"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=zero/OU=role=admin"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA",
                    str(server.pki / "ca.crt"), "-CAkey", str(server.pki / "ca.key"),
                    "-set_serial", serial, "-days", "1", "-out", str(crt)],
                   check=True, capture_output=True)
    ctx = ssl.create_default_context(cafile=str(server.pki / "ca.crt"))
    ctx.load_cert_chain(str(crt), str(key))
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(ssl=ctx)
                                     ) as zero:
        async with zero.get("/v1/nodes") as r:
            assert r.status == 403
            assert "is not positive" in (await r.json())["error"]["message"]
        async with zero.post("/v1/resources/GlobalNetworkSet", json=netset("zero")) as r:
            assert r.status == 403
        async with zero.get("/healthz") as r:   # the probes need no identity
            assert r.status == 200
