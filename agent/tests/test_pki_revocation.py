"""Certificate revocation: `bulkhead pki revoke|crl`, and a running bulkhead-server that
refuses a revoked certificate within its reload bound, keeps its CRL when handed a forged
one, and still answers the probes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bulkhead import pki
from bulkhead.cli.main import main
from bulkhead.client import ApiError, Connection
from bulkhead.server.app import REVOCATION, SERIAL, peer_revoked
from bulkhead.server.main import ServerConfig
from bulkhead.server.revocation import RELOAD_INTERVAL, Revocation
from tests.test_server_process import ServerProcess, pki_dir, servers  # noqa: F401

REFUSED_WITHIN = RELOAD_INTERVAL + 2.0  # the reload bound, and room for a loaded machine


def serial_of(crt: Path) -> int:
    return x509.load_pem_x509_certificate(crt.read_bytes()).serial_number


def crl_serials(directory: Path) -> list[int]:
    crl = pki.read_crl(directory / "crl.pem",
                       [x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())])
    return [r.serial_number for r in crl]


def test_pki_revoke_and_crl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert main(["pki", "init", "--dir", d]) == 0
    assert main(["pki", "crl", "--dir", d, "--days", "7"]) == 0
    assert "(0 revoked; next update in 7 days)" in capsys.readouterr().out
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert list(crl) == [] and crl.next_update_utc is not None
    assert timedelta(days=7) < crl.next_update_utc - crl.last_update_utc < \
        timedelta(days=7, minutes=6)
    alice, _ = pki.issue(tmp_path, "alice", role="admin")
    first = serial_of(alice)
    bob, _ = pki.issue(tmp_path, "bob", role="admin", out=tmp_path / "elsewhere")
    assert main(["pki", "revoke", "alice", "--dir", d, "--reason", "key-compromise"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"revoked: serial {first:X}"
    assert crl_serials(tmp_path) == [first]
    entry = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes()) \
        .get_revoked_certificate_by_serial_number(first)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    # Idempotent: again is fine, changes nothing, and does not rewrite the file.
    before = (tmp_path / "crl.pem").read_bytes()
    assert main(["pki", "revoke", "alice", "--dir", d]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"already revoked: serial {first:X}"
    assert (tmp_path / "crl.pem").read_bytes() == before
    # Issued again: revoking the name revokes every certificate it was given.
    second = serial_of(pki.issue(tmp_path, "alice", role="admin")[0])
    assert main(["pki", "revoke", "alice", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert f"revoked: serial {second:X}" in out and f"already revoked: serial {first:X}" in out
    assert sorted(crl_serials(tmp_path)) == sorted([first, second])
    # A certificate written elsewhere (--out) is found by name through issued.jsonl; by
    # serial, as openssl prints it (colons and 0x allowed).
    assert serial_of(bob) in pki.serials_of(tmp_path, "bob")
    hexed = f"{serial_of(bob):X}"
    assert main(["pki", "revoke", "--serial", "0x" + ":".join(hexed[i:i + 2] for i in
                                                               range(0, len(hexed), 2)),
                 "--dir", d]) == 0
    assert sorted(crl_serials(tmp_path)) == sorted([first, second, serial_of(bob)])
    # `pki crl` keeps the entries and signs again.
    assert main(["pki", "crl", "--dir", d]) == 0
    assert "(3 revoked; next update in 30 days)" in capsys.readouterr().out
    # Usage errors: exit 2 with a message, nothing changed.
    for argv, message in (
            (["nobody"], "no certificate issued to 'nobody'"),
            ([], "give a certificate's NAME or --serial"),
            (["alice", "--serial", "1"], "give a certificate's NAME or --serial"),
            (["--serial", "xyz"], "serial 'xyz': expected hexadecimal digits"),
            (["alice", "--reason", "bored"], "reason 'bored': expected one of"),
            (["alice", "--days", "0"], "--days must be at least 1")):
        assert main(["pki", "revoke", *argv, "--dir", d]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["pki", "revoke", "alice", "--dir", str(tmp_path / "no-ca")]) == 2
    assert "no-ca/ca.crt" in capsys.readouterr().err
    assert sorted(crl_serials(tmp_path)) == sorted([first, second, serial_of(bob)])


def forged_crl(tmp_path: Path, serial: int) -> bytes:
    """A CRL revoking `serial`, from another CA that even has the same name."""
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    return pki.revoke(other, serial=serial).path.read_bytes()


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def refused_after(conn: Connection, deadline: float) -> float:
    """Seconds until `conn` is refused as revoked (bounded by `deadline` seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        try:
            conn.request("GET", "/v1/resources")
        except ApiError as e:
            assert (e.status, e.message) == (403, "certificate revoked")
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"still accepted {deadline} s after the revocation")


def test_a_running_server_refuses_a_revoked_certificate(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    server = ServerProcess(pki_dir, f"sqlite://{pki_dir}/store.db")
    servers.append(server)
    server.start()  # no crl.pem yet: the default (beside clientCA) is watched anyway
    alice = server.conn
    bob_crt, bob_key = pki.issue(pki_dir, "bob", role="admin")
    bob = Connection(alice.server, alice.ca, str(bob_crt), str(bob_key), timeout=10)
    assert alice.request("GET", "/v1/resources")["items"] == []
    assert main(["pki", "revoke", "alice", "--dir", str(pki_dir)]) == 0
    took = refused_after(alice, REFUSED_WITHIN)
    print(f"revoked certificate refused {took:.3f} s after `pki revoke`")
    assert bob.request("GET", "/v1/resources")["items"] == []
    assert alice.request("GET", "/healthz") == "ok\n"
    assert alice.request("GET", "/readyz") == "ready\n"
    with pytest.raises(ApiError) as err:
        alice.request("POST", "/v1/resources/GlobalNetworkSet", {
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": "late"}, "spec": {}})
    assert err.value.status == 403
    # A CRL from another CA is refused: logged, and the old one stays in force.
    good = (pki_dir / "crl.pem").read_bytes()
    replace(pki_dir / "crl.pem", forged_crl(pki_dir, serial_of(bob_crt)))
    deadline = time.monotonic() + REFUSED_WITHIN
    while "crl refused" not in server.log.read_text() and time.monotonic() < deadline:
        bob.request("GET", "/v1/resources")  # a request makes the server look
        time.sleep(0.05)
    assert "not signed by the CA" in server.log.read_text()
    assert bob.request("GET", "/v1/resources")["items"] == []
    with pytest.raises(ApiError, match="certificate revoked"):
        alice.request("GET", "/v1/resources")
    # `pki revoke` does not build on a CRL it did not sign either.
    assert main(["pki", "revoke", "bob", "--dir", str(pki_dir)]) == 2
    replace(pki_dir / "crl.pem", good)
    # SIGHUP re-reads the file at once and does not stop the server.
    assert main(["pki", "revoke", "bob", "--dir", str(pki_dir)]) == 0
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGHUP)
    refused_after(bob, REFUSED_WITHIN)
    assert server.proc.poll() is None


def test_an_explicit_crl_must_exist_and_be_the_cas(
        pki_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    base = ServerConfig(client_ca=str(pki_dir / "ca.crt"))
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(client_ca=base.client_ca, crl=str(tmp_path / "missing.pem")).revocation()
    forged = tmp_path / "forged.pem"
    forged.write_bytes(forged_crl(tmp_path, 12345))
    with pytest.raises(ValueError, match="not signed by the CA"):
        ServerConfig(client_ca=base.client_ca, crl=str(forged)).revocation()
    assert base.revocation().revoked == frozenset()  # default path, not there yet: fine
    config = ServerConfig.load(None, {"client_ca": base.client_ca, "crl": str(forged)})
    assert config.crl == str(forged)
    server = Path(sys.executable).parent / "bulkhead-server"
    done = subprocess.run([str(server), "--client-ca", base.client_ca, "--crl", str(forged),
                           "--datastore", f"sqlite://{tmp_path}/s.db"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "not signed by the CA" in done.stderr
    assert "Traceback" not in done.stderr


def stale_crl(directory: Path, serial: int) -> bytes:
    """A CRL of the CA in `directory` revoking `serial`, whose nextUpdate has passed (its
    CRL number above any `pki revoke` gave, so it is not an older copy)."""
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
    return (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
            .last_update(now - timedelta(days=2)).next_update(now - timedelta(days=1))
            .add_revoked_certificate(entry).add_extension(x509.CRLNumber(1000), critical=False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_revocation_reloads_within_its_interval(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    pki.init_ca(tmp_path)
    a = serial_of(pki.issue(tmp_path, "a", role="viewer")[0])
    b = serial_of(pki.issue(tmp_path, "b", role="viewer")[0])
    clock = Clock()
    rev = Revocation(tmp_path / "crl.pem", tmp_path / "ca.crt", required=False,
                     interval=5.0, clock=clock)
    assert not rev.is_revoked(a) and rev.generation == 0
    pki.revoke(tmp_path, name="a")
    clock.now += 4.9
    assert not rev.is_revoked(a)  # not looked at yet: the bound is the interval
    clock.now += 0.2
    assert rev.is_revoked(a) and not rev.is_revoked(b) and rev.generation == 1
    pki.revoke(tmp_path, name="b")
    rev.refresh()  # SIGHUP
    assert rev.is_revoked(b) and rev.generation == 2
    # Forged, garbage, or gone: the last good list stays, with an error in the log.
    caplog.set_level(logging.INFO, "bulkhead.server.revocation")
    for bad in (forged_crl(tmp_path, a), b"not a crl", None):
        caplog.clear()
        if bad is None:
            (tmp_path / "crl.pem").unlink()
        else:
            replace(tmp_path / "crl.pem", bad)
        clock.now += 6.0
        assert rev.is_revoked(a) and rev.is_revoked(b) and rev.generation == 2
        assert [r.levelname for r in caplog.records] == ["ERROR"], bad
    # Past its nextUpdate: still in force, and one warning.
    replace(tmp_path / "crl.pem", stale_crl(tmp_path, a))
    clock.now += 6.0
    assert rev.is_revoked(a) and not rev.is_revoked(b) and rev.generation == 3
    clock.now += 6.0
    assert rev.is_revoked(a)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "past its nextUpdate" in warnings[0]


def test_an_older_crl_put_back_does_not_unrevoke(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A CRL older than the one in force from the same CA (a lower CRL number; without
    numbers, an earlier thisUpdate) adds what it revokes and drops nothing: an old copy
    put back un-revokes nothing, and a CRL begun again from number 1 (the CA host lost
    its file) still revokes what it names. Another CA's CRL is not compared."""
    caplog.set_level(logging.INFO, "bulkhead.server.revocation")
    pki.init_ca(tmp_path)
    rev = Revocation(tmp_path / "crl.pem", tmp_path / "ca.crt", required=False)
    assert "no crl file yet: no certificate is revoked until it appears" in caplog.text
    a, b, d = (serial_of(pki.issue(tmp_path, n, role="viewer")[0]) for n in "abd")
    pki.revoke(tmp_path, name="a")
    only_a = (tmp_path / "crl.pem").read_bytes()
    pki.revoke(tmp_path, name="b")
    both = (tmp_path / "crl.pem").read_bytes()
    rev.refresh()
    assert rev.is_revoked(a) and rev.is_revoked(b)
    caplog.clear()
    replace(tmp_path / "crl.pem", only_a)
    rev.refresh()
    assert rev.is_revoked(a) and rev.is_revoked(b)
    assert "crl older than the one in force" in caplog.text
    # The CA host lost crl.pem: the next revocation starts again at number 1.
    (tmp_path / "crl.pem").unlink()
    pki.revoke(tmp_path, name="d")
    rev.refresh()
    assert rev.is_revoked(a) and rev.is_revoked(b) and rev.is_revoked(d)
    # Without CRL numbers, thisUpdate decides.
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    bare = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
            .last_update(now - timedelta(hours=1)).next_update(now + timedelta(days=1))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    replace(tmp_path / "crl.pem", both)
    fresh = Revocation(tmp_path / "crl.pem", tmp_path / "ca.crt", required=False)
    assert fresh.is_revoked(b)
    caplog.clear()
    replace(tmp_path / "crl.pem", bare)   # no number, and older than the one read
    fresh.refresh()
    assert fresh.is_revoked(b) and "older than the one in force" in caplog.text
    # Another CA of the bundle numbers its CRLs on its own: its number 1 replaces.
    other = tmp_path / "other"
    pki.init_ca(other, name="another CA")
    (tmp_path / "bundle.crt").write_bytes((tmp_path / "ca.crt").read_bytes() +
                                          (other / "ca.crt").read_bytes())
    replace(tmp_path / "crl.pem", both)
    bundled = Revocation(tmp_path / "crl.pem", tmp_path / "bundle.crt", required=False)
    x = serial_of(pki.issue(other, "x", role="viewer")[0])
    replace(tmp_path / "crl.pem", pki.revoke(other, name="x").path.read_bytes())
    bundled.refresh()
    assert bundled.is_revoked(x) and not bundled.is_revoked(b)


def test_peer_revoked_for_long_lived_responses(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    serial = serial_of(pki.issue(tmp_path, "web-1", role="agent")[0])
    rev = Revocation(tmp_path / "crl.pem", tmp_path / "ca.crt", required=False, interval=0)
    app = web.Application()
    app[REVOCATION] = rev
    request = make_mocked_request("GET", "/v1/watch", app=app)
    assert not peer_revoked(request)  # no certificate seen: nothing to check
    request[SERIAL] = serial
    assert not peer_revoked(request)
    pki.revoke(tmp_path, name="web-1")
    assert peer_revoked(request)
