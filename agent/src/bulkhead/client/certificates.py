"""What keeps a client certificate from being accepted, said before the server can:
a server refuses a client certificate by closing the connection, which tells the client
nothing of why. Used by the CLI's and the agent's messages for a failed connection."""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature


def certificate_problem(cert: str | Path, ca: str | Path | None = None,
                        now: datetime.datetime | None = None) -> str | None:
    """What keeps the certificate in `cert` from being accepted, as a sentence naming
    the file (expired, not yet valid, not issued by the CA in `ca`), or None when none
    of these is seen. For the messages of a failed TLS connection: a server refuses a
    client certificate by closing the connection, which says nothing of why."""
    try:
        pem = Path(cert).read_bytes()
    except OSError as e:
        return f"the certificate {cert} cannot be read: {e}"
    authorities = None
    if ca is not None:
        # (the CA file's own problem is reported where it is loaded)
        with contextlib.suppress(OSError):
            authorities = Path(ca).read_bytes()
    return pem_problem(pem, f"the certificate {cert}", authorities, ca, now)


def pem_problem(pem: bytes, name: str, authorities: bytes | None = None,
                ca: str | Path | None = None, now: datetime.datetime | None = None
                ) -> str | None:
    """`certificate_problem` for a certificate already read (`pem`, the first in it),
    called `name` in the sentence ("the certificate /etc/.../agent.crt"), checked
    against the CA certificates in `authorities` (read from `ca`; None: not checked).
    The agent's diagnosis passes the certificate it presents, which the file may no
    longer hold."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        return f"{name} cannot be read: {e}"
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    if certificate.not_valid_after_utc < now:
        return (f"{name} expired on "
                f"{certificate.not_valid_after_utc.strftime(stamp)}; issue a new one")
    if certificate.not_valid_before_utc > now:
        return (f"{name} is not valid before "
                f"{certificate.not_valid_before_utc.strftime(stamp)} (is this clock "
                "behind?)")
    if authorities is None:
        return None
    try:
        cas = x509.load_pem_x509_certificates(authorities)
    except ValueError:
        return None   # the CA file's own problem is reported where it is loaded
    for authority in cas:
        try:
            certificate.verify_directly_issued_by(authority)
            return None
        except (ValueError, TypeError, InvalidSignature):
            continue
    return (f"{name} is not issued directly by the CA in {ca} (its issuer: "
            f"{certificate.issuer.rfc4514_string()[:120]}); if the server's clients' CA is "
            "that one, it refuses it")
