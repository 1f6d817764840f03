"""`bulkhead pki`: a CA and client/server certificates, so mTLS needs no openssl lore.

A client certificate says who its holder is and what it may do:
- CN: the identity (for role `agent`, the node name it may report for);
- OU `role=<admin|viewer|agent>`: the role;
- OU `tier=<name>` (any number): limits an admin to those tiers' policies.

Revocation: `revoke` adds certificates' serials to `crl.pem` (an X.509 CRL signed by the
CA) in the CA's folder; `issue` records every certificate it signs in `issued.jsonl`
there, so a name finds its serials even when the certificate went elsewhere (`--out`) or
was issued again since.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("admin", "viewer", "agent")
CRL_FILE = "crl.pem"
ISSUED_FILE = "issued.jsonl"
CRL_DAYS = 30  # nextUpdate: `bulkhead pki crl` re-signs before then
REASONS = {"unspecified": x509.ReasonFlags.unspecified,
           "key-compromise": x509.ReasonFlags.key_compromise,
           "affiliation-changed": x509.ReasonFlags.affiliation_changed,
           "superseded": x509.ReasonFlags.superseded,
           "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
           "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn}


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
    if len(cns) != 1:   # which one names the caller would be a guess
        raise ValueError(f"the client certificate names {len(cns)} CNs; a bulkhead "
                         "identity has one")
    return Identity(str(cns[0].value), roles[0], tiers)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """`data` into `path`, whole or not at all: through a temporary file of a name nobody
    can foresee, created new (never a file or link planted beforehand) with mode 0600,
    and 0644 set only once it holds a public file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if not private:
                os.fchmod(f.fileno(), 0o644)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# What `issue` takes as a NAME: it is the certificate's CN (the node's name for an agent)
# and the base of the files it writes, so no path separator, no leading dot, at most 64
# characters (X.509's upper bound for a CN).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
CA_FILES = ("ca",)   # NAME.crt and NAME.key that are the CA's own in its directory


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ValueError(f"certificate name {name[:64]!r}: 1 to 64 letters, digits and . _ @ "
                         "-, starting with a letter or digit (it is the CN and the file "
                         "name)")


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
          out: Path | None = None, replace: bool = True) -> tuple[Path, Path]:
    """Issue `<name>.crt`/`<name>.key` signed by the CA in `directory`.

    A server certificate gets `hosts` (DNS names or IPs) as subject alternative names; a
    client certificate gets its role (and tier limits) in the subject. The CA's own files
    are never written over; other files of the same name only if `replace`.
    """
    check_name(name)
    if not server and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    target = out or directory
    crt_path, key_path = target / f"{name}.crt", target / f"{name}.key"
    if name.lower() in CA_FILES and target.resolve() == directory.resolve():
        # (lower case: on a filesystem that ignores case, CA.crt is ca.crt)
        raise ValueError(f"certificate name {name!r}: {directory / name}.crt and .key are "
                         "the CA's own files; choose another name or --out")
    if not replace:
        there = [str(p) for p in (crt_path, key_path) if p.exists() or p.is_symlink()]
        if there:
            raise FileExistsError(f"{' and '.join(there)} exist; pass --force to issue "
                                  "again over them")
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
    _write(key_path, _key_pem(key), private=True)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    line = json.dumps({"serial": serial_hex(cert.serial_number), "name": name,
                       "notAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "path": str(crt_path.absolute())})
    with open(directory / ISSUED_FILE, "a", encoding="utf-8") as index:
        index.write(line + "\n")
    return crt_path, key_path


# ------------------------------------------------------------------------ revocation
def serial_hex(serial: int) -> str:
    """A serial as `openssl x509 -serial` prints it: upper-case hex."""
    return f"{serial:X}"


def parse_serial(text: str) -> int:
    """A serial in hex, as printed by `serial_hex` or openssl (`0x` and colons allowed)."""
    digits = text.strip().removeprefix("0x").removeprefix("0X").replace(":", "")
    try:
        serial = int(digits, 16)
    except ValueError:
        raise ValueError(f"serial {text!r}: expected hexadecimal digits, as `openssl x509 "
                         "-serial` prints them") from None
    if serial <= 0:
        raise ValueError(f"serial {text!r}: must be positive")
    return serial


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'}: not an EC key (not made by bulkhead pki)")
    return ca_cert, ca_key


def signed_by(crl: x509.CertificateRevocationList, cas: list[x509.Certificate]) -> bool:
    """Whether one of `cas` issued and signed `crl`."""
    for ca in cas:
        key = ca.public_key()
        if crl.issuer == ca.subject and \
                isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) and \
                crl.is_signature_valid(key):
            return True
    return False


def read_crl(path: Path, cas: list[x509.Certificate]) -> x509.CertificateRevocationList:
    """The CRL in `path`, checked against `cas`; ValueError if it is not theirs."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM X.509 CRL: {e}") from None
    if not signed_by(crl, cas):
        names = ", ".join(c.subject.rfc4514_string() for c in cas)
        raise ValueError(f"{path}: not signed by the CA ({names})")
    return crl


def revoked_serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    return frozenset(r.serial_number for r in crl)


@contextlib.contextmanager
def _crl_lock(directory: Path) -> Iterator[None]:
    # Two `revoke`s at once must not both read the old list and drop each other's entry.
    with open(directory / ".crl.lock", "a") as lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory lock, run one revoke at a time
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_crl(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
               previous: x509.CertificateRevocationList | None,
               new: list[x509.RevokedCertificate], days: int) -> Path:
    if days < 1:
        raise ValueError("a CRL's nextUpdate must be at least 1 day ahead")
    now = datetime.datetime.now(datetime.UTC)
    number = 1
    if previous is not None:
        with contextlib.suppress(x509.ExtensionNotFound):
            number = previous.extensions.get_extension_for_class(x509.CRLNumber) \
                .value.crl_number + 1
    # Every entry handed over at once: adding them one by one copies the list each time
    # (a revocation into a CRL of 100,000 entries took 10 s).
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca_cert.subject, last_update=now - datetime.timedelta(minutes=5),
        next_update=now + datetime.timedelta(days=days),
        revoked_certificates=[*(previous or []), *new]
    ).add_extension(x509.CRLNumber(number), critical=False)
    path = directory / CRL_FILE
    _write(path, builder.sign(ca_key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM))
    return path


def _current_crl(directory: Path, ca_cert: x509.Certificate
                 ) -> x509.CertificateRevocationList | None:
    path = directory / CRL_FILE
    return read_crl(path, [ca_cert]) if path.exists() else None


def serials_of(directory: Path, name: str) -> list[int]:
    """Every serial the CA in `directory` issued to `name`: from `issued.jsonl`, and
    `NAME.crt` in `directory` if this CA signed it (certificates issued before the index)."""
    ca_cert, _ = _load_ca(directory)
    found: list[int] = []
    index = directory / ISSUED_FILE
    if index.exists():
        for line in index.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                if entry["name"] == name:
                    found.append(parse_serial(entry["serial"]))
    crt = directory / f"{name}.crt"
    if crt.exists():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        if cert.issuer == ca_cert.subject:
            found.append(cert.serial_number)
    return sorted(set(found))


@dataclass(frozen=True)
class Revoked:
    path: Path
    added: tuple[int, ...]      # serials revoked now
    already: tuple[int, ...]    # serials that were revoked before


def revoke(directory: Path, *, name: str | None = None, serial: int | None = None,
           reason: str | None = None, days: int = CRL_DAYS) -> Revoked:
    """Revoke `serial`, or every certificate issued to `name`, in `directory`'s CRL.

    Idempotent: a serial already in the CRL keeps its first revocation date and reason,
    and an unchanged CRL is not rewritten. ValueError names what is wrong."""
    if (name is None) == (serial is None):
        raise ValueError("give a certificate's NAME or --serial, not both")
    if reason is not None and reason not in REASONS:
        raise ValueError(f"reason {reason!r}: expected one of {', '.join(REASONS)}")
    ca_cert, ca_key = _load_ca(directory)
    if name is not None:
        serials = serials_of(directory, name)
        if not serials:
            raise ValueError(f"no certificate issued to {name!r} in {directory} (no "
                             f"{name}.crt, not in {ISSUED_FILE}); give --serial")
    else:
        assert serial is not None
        serials = [serial]
    with _crl_lock(directory):
        previous = _current_crl(directory, ca_cert)
        before = revoked_serials(previous) if previous is not None else frozenset()
        now = datetime.datetime.now(datetime.UTC)
        new = []
        for s in serials:
            if s in before:
                continue
            entry = x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now)
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
            new.append(entry.build())
        path = directory / CRL_FILE
        if new or previous is None:
            path = _write_crl(directory, ca_cert, ca_key, previous, new, days)
    return Revoked(path, tuple(r.serial_number for r in new),
                   tuple(s for s in serials if s in before))


def write_crl(directory: Path, days: int = CRL_DAYS) -> tuple[Path, int]:
    """(Re)sign `directory`'s CRL with a fresh nextUpdate, keeping its entries (an empty
    CRL if there is none yet); the path and how many serials it revokes."""
    ca_cert, ca_key = _load_ca(directory)
    with _crl_lock(directory):
        previous = _current_crl(directory, ca_cert)
        path = _write_crl(directory, ca_cert, ca_key, previous, [], days)
    return path, len(revoked_serials(previous)) if previous is not None else 0
