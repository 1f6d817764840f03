"""`bulkhead pki`: a CA and client/server certificates, so mTLS needs no openssl lore.

A client certificate says who its holder is and what it may do:
- CN: the identity (for role `agent`, the node name it may report for);
- OU `role=<admin|viewer|agent>`: the role;
- OU `tier=<name>` (any number): limits an admin to those tiers' policies.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("admin", "viewer", "agent")


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    tiers: tuple[str, ...] = field(default=())  # empty: every tier

    def may_touch_tier(self, tier: str) -> bool:
        return not self.tiers or tier in self.tiers


def identity_from_subject(subject: x509.Name) -> Identity:
    """Read CN and the `role=`/`tier=` OUs; raises ValueError when they are missing."""
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    roles = [o.split("=", 1)[1] for o in ous if o.startswith("role=")]
    tiers = tuple(sorted(o.split("=", 1)[1] for o in ous if o.startswith("tier=")))
    if not cns or len(roles) != 1 or roles[0] not in ROLES:
        raise ValueError("the client certificate carries no bulkhead role (OU role=...)")
    return Identity(str(cns[0].value), roles[0], tiers)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, name: str = "bulkhead CA", days: int = 3650,
            force: bool = False) -> Path:
    """Create `ca.crt` and `ca.key` in `directory`; refuses to overwrite unless `force`."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if crt.exists() and not force:
        raise FileExistsError(f"{crt} exists; pass --force to replace the CA (every issued "
                              "certificate stops working)")
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt


def issue(directory: Path, name: str, *, role: str | None = None, server: bool = False,
          hosts: tuple[str, ...] = (), tiers: tuple[str, ...] = (), days: int = 825,
          out: Path | None = None) -> tuple[Path, Path]:
    """Issue `<name>.crt`/`<name>.key` signed by the CA in `directory`.

    A server certificate gets `hosts` (DNS names or IPs) as subject alternative names; a
    client certificate gets its role (and tier limits) in the subject.
    """
    if not server and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"role={role}"))
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"tier={t}") for t in tiers]
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH] if server
                   else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        sans: list[x509.GeneralName] = []
        for host in hosts or ("localhost", "127.0.0.1"):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    target = out or directory
    crt_path, key_path = target / f"{name}.crt", target / f"{name}.key"
    _write(key_path, _key_pem(key), private=True)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    return crt_path, key_path
