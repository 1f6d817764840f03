"""What a failed TLS connection says: a server refuses a client certificate by closing
the connection, which tells the client nothing of why, so the CLI and the agent look at
their own certificate and say what is wrong with it (expired, not yet valid, issued by
another CA); a server certificate the client refuses is named with OpenSSL's reason
("certificate has expired"), not only "verify failed"."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bulkhead import pki
from bulkhead.agent.daemon import Agent
from bulkhead.agent.http import ConnectError, Session
from bulkhead.agent.sync import client_ssl_context
from bulkhead.client import Connection, Unreachable
from bulkhead.client.certificates import certificate_problem
from tests.agentfixture import Recorder, config_for, until
from tests.test_cli_hostile_server import FakeServer

NOW = datetime.datetime.now(datetime.UTC)


def expired_server_certificate(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1, signed by the CA in `ca_dir`, that expired
    yesterday."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=30))
            .not_valid_after(NOW - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = out / "old.crt", out / "old.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def test_certificate_problem_names_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b", name="another CA")
    crt, _ = pki.issue(tmp_path / "a", "web-1", role="agent", days=10)
    ca = tmp_path / "a" / "ca.crt"
    assert certificate_problem(crt, ca) is None
    later = certificate_problem(crt, ca, NOW + datetime.timedelta(days=11))
    assert later is not None and later.startswith(f"the certificate {crt} expired on ")
    earlier = certificate_problem(crt, ca, NOW - datetime.timedelta(days=1))
    assert earlier is not None and "is not valid before" in earlier and "clock" in earlier
    other = certificate_problem(crt, tmp_path / "b" / "ca.crt")
    assert other is not None and "not issued directly by the CA in" in other
    assert "(its issuer: CN=bulkhead CA)" in other
    missing = certificate_problem(tmp_path / "nope.crt", ca)
    assert missing is not None and "cannot be read" in missing


def test_the_cli_says_its_certificate_is_from_another_ca(tmp_path: Path) -> None:
    fake = FakeServer(tmp_path / "server")
    try:
        pki.init_ca(tmp_path / "other", name="another CA")
        crt, key = pki.issue(tmp_path / "other", "alice", role="admin")
        conn = Connection(server=f"https://127.0.0.1:{fake.port}", ca=str(fake.ca),
                          cert=str(crt), key=str(key), timeout=10)
        with pytest.raises(Unreachable) as err:
            conn.request("GET", "/v1/resources/Tier")
        text = str(err.value)
        assert f"the certificate {crt} is not issued directly by the CA in {fake.ca}" in text, text
    finally:
        fake.stopping = True
        fake.listener.close()


def test_an_expired_server_certificate_is_named_as_expired(tmp_path: Path) -> None:
    """The CLI says the server's certificate expired (not "not signed by the CA"), and the
    agent's message carries OpenSSL's reason."""
    fake = FakeServer(tmp_path / "server")
    try:
        old_crt, old_key = expired_server_certificate(tmp_path / "server", tmp_path)
        fake.ctx.load_cert_chain(old_crt, old_key)
        with pytest.raises(Unreachable) as err:
            fake.conn(timeout=10).request("GET", "/v1/resources/Tier")
        text = str(err.value)
        assert "the server's certificate (or the CA that issued it) has expired" in text
        assert "not signed" not in text

        async def connect() -> None:
            ctx = ssl.create_default_context(cafile=str(fake.ca))
            ctx.load_cert_chain(fake.crt, fake.key)
            async with Session(f"https://127.0.0.1:{fake.port}", ctx) as session:
                async with session.get("/v1/snapshot"):
                    pass
        with pytest.raises(ConnectError) as agent_err:
            asyncio.run(connect())
        assert "the server's certificate (or its CA): certificate has expired" in \
            str(agent_err.value)
    finally:
        fake.stopping = True
        fake.listener.close()


def test_the_agent_says_its_certificate_is_from_another_ca(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    fake = FakeServer(tmp_path / "server")
    try:
        pki.init_ca(tmp_path / "other", name="another CA")
        config = config_for(f"https://127.0.0.1:{fake.port}", tmp_path / "other",
                            tmp_path / "state", ca=str(fake.ca))
        agent = Agent(config, Recorder())

        def said() -> list[str]:
            return [str(getattr(r, "fields", {}).get("certificate", ""))
                    for r in caplog.records if r.getMessage().startswith("cannot reach")]

        async def run() -> None:
            async with Session(config.server, client_ssl_context(config)) as session:
                task = asyncio.create_task(agent._sync_forever(session))
                try:
                    await until(lambda: any(said()), "the agent's warning", timeout=20)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

        with caplog.at_level(logging.WARNING, logger="bulkhead.agent"):
            asyncio.run(run())
        assert any(f"the certificate {config.cert} is not issued directly by the CA in {fake.ca}"
                   in text for text in said()), said()
    finally:
        fake.stopping = True
        fake.listener.close()


def test_the_agent_does_not_blame_its_certificate_when_nothing_answers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Connection refused says so, with no word on the certificate (from another CA here,
    which is no cause of a refused connection)."""
    pki.init_ca(tmp_path / "server")
    pki.init_ca(tmp_path / "other", name="another CA")
    config = config_for("https://127.0.0.1:1", tmp_path / "other", tmp_path / "state",
                        ca=str(tmp_path / "server" / "ca.crt"))
    agent = Agent(config, Recorder())

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("cannot reach")]

    async def run() -> None:
        async with Session(config.server, client_ssl_context(config)) as session:
            task = asyncio.create_task(agent._sync_forever(session))
            try:
                await until(lambda: len(warnings()) >= 2, "two warnings", timeout=20)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="bulkhead.agent"):
        asyncio.run(run())
    for record in warnings():
        fields = getattr(record, "fields", {})
        assert "cannot connect" in fields["reason"] and "certificate" not in fields, fields
