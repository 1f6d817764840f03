"""A certificate renewed on disk while the agent runs (`bulkhead pki issue --force` from
cron): the agent's next connection presents it, without a restart; a replacement that
does not load (a key not the certificate's, a file half written) leaves the certificate
in use working and is said once; and a refused connection's diagnosis is about the
certificate the agent presented, not the file on disk now. Against a real
bulkhead-server process over mutual TLS."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bulkhead import pki
from bulkhead.agent.daemon import Agent
from bulkhead.agent.sync import Backoff
from tests.agentfixture import NODE, Recorder, config_for, gnp, running, until
from tests.test_server_process import ServerProcess, pki_dir, servers  # noqa: F401

RELOADED = "TLS files reloaded: new connections present the certificate now in cert"
NOT_LOADED = "the agent's TLS files changed but do not load"


def serial_of(crt: str | Path) -> int:
    return x509.load_pem_x509_certificate(Path(crt).read_bytes()).serial_number


def put(path: str | Path, data: bytes) -> None:
    """`data` in place of the file at `path`, at once (a new file renamed over it)."""
    tmp = Path(f"{path}.new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def expired_agent_certificate(ca_dir: Path, crt: str, key: str) -> datetime.datetime:
    """The node's client certificate, from the CA in `ca_dir`, expired an hour ago,
    written over `crt` and `key`; its end of validity."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, NODE),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "role=agent")]))
            .issuer_name(ca_cert.subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(now - datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    put(key, private.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    put(crt, cert.public_bytes(serialization.Encoding.PEM))
    return cert.not_valid_after_utc


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(text)]


async def create(server: ServerProcess, name: str) -> int:
    doc = await asyncio.to_thread(server.conn.request, "POST",
                                  "/v1/resources/GlobalNetworkPolicy", gnp(name))
    return int(doc["metadata"]["resourceVersion"])


async def applied(server: ServerProcess, rec: Recorder, name: str) -> None:
    """Policy `name` created now reaches the agent (its watch is connected) and the
    server hears of it (a status report, on a connection of its own)."""
    revision = await create(server, name)
    await until(lambda: any(name in names for _, names in rec.calls),
                f"policy {name} at the agent", timeout=30)
    viewer = server.client("val", "viewer")

    async def reported() -> dict[str, Any]:
        nodes = await asyncio.to_thread(viewer.request, "GET", "/v1/nodes")
        return {n["node"]: n for n in nodes["nodes"]}.get(NODE, {})

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (await reported()).get("appliedRevision", 0) < revision:
        assert loop.time() < deadline, f"no status report of revision {revision}"
        await asyncio.sleep(0.1)


def start_server(pki_dir: Path, servers: list[ServerProcess]) -> ServerProcess:  # noqa: F811
    server = ServerProcess(pki_dir, f"sqlite://{pki_dir}/store.db")
    servers.append(server)
    server.start()
    return server


def test_a_certificate_renewed_on_disk_is_presented_on_the_next_connection(
        pki_dir: Path, servers: list[ServerProcess],  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Renewed in place, then the old certificate revoked: the server ends the watch
    opened with it and refuses it from then on; the agent's next connections (the watch,
    the status reports) present the new one."""
    server = start_server(pki_dir, servers)
    config = config_for(f"https://127.0.0.1:{server.port}", pki_dir, pki_dir / "state",
                        status_interval=0.5)
    old = serial_of(config.cert)
    rec = Recorder()
    agent = Agent(config, rec)

    async def run() -> None:
        async with running(agent):
            await applied(server, rec, "before")
            crt, _ = pki.issue(pki_dir, NODE, role="agent")   # as cron's `--force` does
            assert crt == Path(config.cert) and serial_of(crt) != old
            lost = agent.counters.reconnects
            pki.revoke(pki_dir, serial=old)
            # The server ends the watch opened with the old certificate; the agent
            # opens it again (and reports status) with the new one.
            await until(lambda: agent.counters.reconnects > lost, "the watch ended",
                        timeout=30)
            await applied(server, rec, "after")
            assert agent.connected

    with caplog.at_level(logging.INFO, logger="bulkhead.agent"):
        asyncio.run(run())
    reloads = messages(caplog, RELOADED)
    assert len(reloads) == 1, [r.getMessage() for r in reloads]
    fields = getattr(reloads[0], "fields", {})
    assert fields["serial"] == f"{serial_of(config.cert):X}", fields
    assert not messages(caplog, NOT_LOADED)


def test_a_replacement_that_does_not_load_keeps_the_certificate_in_use(
        pki_dir: Path, servers: list[ServerProcess],  # noqa: F811
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The key renewed before the certificate (as `pki issue` writes them), then the
    certificate half written: each said once in an error naming the file, while the
    agent goes on with the certificate it has, on new connections too (the server
    restarted). Written whole, the new pair is taken, and the old one may go."""
    server = start_server(pki_dir, servers)
    config = config_for(f"https://127.0.0.1:{server.port}", pki_dir, pki_dir / "state",
                        status_interval=0.3)
    old = serial_of(config.cert)
    new_crt, new_key = pki.issue(pki_dir, NODE, role="agent", out=tmp_path / "next")
    rec = Recorder()
    agent = Agent(config, rec)

    def errors() -> list[str]:
        return [str(getattr(r, "fields", {}).get("reason"))
                for r in messages(caplog, NOT_LOADED)]

    def said(count: int) -> Callable[[], bool]:
        return lambda: len(errors()) >= count

    async def run() -> None:
        async with running(agent):
            await applied(server, rec, "before")
            put(config.key, new_key.read_bytes())
            await until(said(1), "the error on the key", timeout=30)
            text = new_crt.read_bytes()
            put(config.cert, text[:len(text) // 2])
            await until(said(2), "the error on the certificate", timeout=30)
            await asyncio.to_thread(server.kill)     # new connections from here on
            await asyncio.to_thread(server.start)
            await applied(server, rec, "restarted")
            assert len(errors()) == 2, errors()   # once each, many requests later
            put(config.cert, text)
            await until(lambda: messages(caplog, RELOADED), "the reload", timeout=30)
            lost = agent.counters.reconnects
            pki.revoke(pki_dir, serial=old)
            await until(lambda: agent.counters.reconnects > lost, "the watch ended",
                        timeout=30)
            await applied(server, rec, "renewed")

    with caplog.at_level(logging.INFO, logger="bulkhead.agent"):
        asyncio.run(run())
    first, second = errors()
    assert first == (f"cert/key: {config.key} is not the key of the certificate in "
                     f"{config.cert} (one renewed, not yet the other?)"), first
    assert second == (f"cert: {config.cert}: no complete PEM certificate (half "
                      "written?)"), second


def test_the_diagnosis_is_of_the_certificate_presented(
        pki_dir: Path, servers: list[ServerProcess],  # noqa: F811
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """An agent with an expired certificate is refused; a valid certificate copied over
    it without its key does not load, so the agent still presents the expired one, and
    its warning says so (the file on disk is valid: read from there, it named nothing).
    The key copied too, the agent connects."""
    server = start_server(pki_dir, servers)
    config = config_for(f"https://127.0.0.1:{server.port}", pki_dir, pki_dir / "state")
    expired = expired_agent_certificate(pki_dir, config.cert, config.key)
    new_crt, new_key = pki.issue(pki_dir, NODE, role="agent", out=tmp_path / "next")
    rec = Recorder()
    agent = Agent(config, rec)
    agent._backoff = Backoff(base=0.05, cap=0.1)   # warnings at attempts 1, 2, 10, 20, ...
    stamp = expired.strftime("%Y-%m-%d %H:%M:%S UTC")

    def diagnoses() -> list[str]:
        return [str(getattr(r, "fields", {}).get("certificate", ""))
                for r in messages(caplog, "cannot reach the server")]

    async def run() -> None:
        async with running(agent):
            await until(lambda: any(diagnoses()), "the first diagnosis", timeout=30)
            put(config.cert, new_crt.read_bytes())
            await until(lambda: any("presents" in d for d in diagnoses()),
                        "a diagnosis after the copy", timeout=30)
            put(config.key, new_key.read_bytes())
            await until(lambda: agent.connected, "the connection", timeout=30)

    with caplog.at_level(logging.INFO, logger="bulkhead.agent"):
        asyncio.run(run())
    said = [d for d in diagnoses() if d]
    assert said[0] == f"the certificate {config.cert} expired on {stamp}; issue a new one"
    assert f"the certificate this agent presents (read from {config.cert}, changed " \
        f"since) expired on {stamp}; issue a new one" in said, said
    assert len(messages(caplog, NOT_LOADED)) == 1
