"""What keeps a client certificate from being accepted, said before the server can:
a server refuses a client certificate by closing the connection, which tells the client
nothing of why. Used by the CLI's and the agent's messages for a failed connection."""

from __future__ import annotations

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
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError) as e:
        return f"the certificate {cert} cannot be read: {e}"
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    if certificate.not_valid_after_utc < now:
        return (f"the certificate {cert} expired on "
                f"{certificate.not_valid_after_utc.strftime(stamp)}; issue a new one")
    if certificate.not_valid_before_utc > now:
        return (f"the certificate {cert} is not valid before "
                f"{certificate.not_valid_before_utc.strftime(stamp)} (is this clock "
                "behind?)")
    if ca is None:
        return None
    try:
        authorities = x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError):
        return None   # the CA file's own problem is reported where it is loaded
    for authority in authorities:
        try:
            certificate.verify_directly_issued_by(authority)
            return None
        except (ValueError, TypeError, InvalidSignature):
            continue
    return (f"the certificate {cert} is not issued directly by the CA in {ca} (its issuer: "
            f"{certificate.issuer.rfc4514_string()[:120]}); if the server's clients' CA is "
            "that one, it refuses it")
