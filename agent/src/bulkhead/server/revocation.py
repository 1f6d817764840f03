"""Revoked client certificates: the serials in a CRL signed by the client CA.

The server reads the CRL at start and again when the file changes: `is_revoked` looks at
the file's identity (inode, size, mtime) at most every `interval` seconds, so a
`bulkhead pki revoke` (which replaces the file atomically) takes effect within that
bound without a restart; SIGHUP re-reads at once. A CRL that cannot be read, or that
the client CA did not sign, is refused: the previous list stays in force and the error
is logged. One older than the CRL in force from the same CA (a lower CRL number, or
without numbers an earlier thisUpdate) adds its revocations and drops none: an old copy
put back would otherwise un-revoke what was revoked since, and a CRL begun again from
number 1 (the CA host lost its file) still revokes what it names. A
CRL past its nextUpdate stays in force (its serials are still revoked), with a warning:
re-sign it with `bulkhead pki crl`. A server started without the file (the default path,
before any revocation) says so in its log: nothing is revoked until the file appears.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from bulkhead import pki

log = logging.getLogger("bulkhead.server.revocation")

RELOAD_INTERVAL = 1.0  # seconds between looks at the CRL file

FileKey = tuple[int, int, int, int]  # device, inode, size, mtime_ns


class Revocation:
    def __init__(self, path: Path, ca_file: Path, *, required: bool,
                 interval: float = RELOAD_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`required`: the file must exist now (it was configured explicitly); otherwise
        a missing file means nothing is revoked until it appears."""
        self.path = path
        self.interval = interval
        self._clock = clock
        try:
            self._cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"client CA {ca_file}: {e}") from None
        self._revoked: frozenset[int] = frozenset()
        self._file: FileKey | None = None
        self._next_update: datetime.datetime | None = None
        self._this_update: datetime.datetime | None = None
        self._issuer: bytes | None = None
        self._number: int | None = None
        self._stale_warned = False
        self._checked = clock()
        # Bumped whenever the revoked set changes: a long-lived stream compares it with
        # the value it saw last and looks its certificate up again only then.
        self.generation = 0
        if required and not path.exists():
            raise ValueError(f"crl {path}: no such file (create it with `bulkhead pki crl`)")
        if path.exists():
            self._load(self._stat(), fatal=True)
        else:
            log.warning("no crl file yet: no certificate is revoked until it appears",
                        extra={"fields": {"crl": str(path)}})

    @property
    def revoked(self) -> frozenset[int]:
        return self._revoked

    def is_revoked(self, serial: int) -> bool:
        """Whether `serial` is revoked, re-reading the CRL first if it is due and changed.
        Cheap: a clock read, and a stat() at most every `interval` seconds."""
        now = self._clock()
        if now - self._checked >= self.interval:
            self._checked = now
            self.refresh()
        return serial in self._revoked

    def refresh(self) -> None:
        """Re-read the CRL if the file changed (SIGHUP calls this at once)."""
        key = self._stat()
        if key is None:
            if self._file is not None:
                log.error("crl file is gone; the revocations read before stay in force",
                          extra={"fields": {"crl": str(self.path)}})
                self._file = None
            return
        if key != self._file:
            self._load(key, fatal=False)
        self._warn_if_stale()

    def _stat(self) -> FileKey | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("crl file cannot be read", extra={"fields": {
                "crl": str(self.path), "error": str(e)}})
            return self._file  # keep what we have, try again next time
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self, key: FileKey | None, *, fatal: bool) -> None:
        try:
            crl = pki.read_crl(self.path, self._cas)
        except (OSError, ValueError) as e:
            if fatal:
                raise ValueError(f"crl {e}") from None
            log.error("crl refused; the previous revocations stay in force", extra={
                "fields": {"crl": str(self.path), "error": str(e)}})
            self._file = key  # do not parse the same bad file on every look
            return
        number: int | None = None
        with contextlib.suppress(x509.ExtensionNotFound):
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        issuer = crl.issuer.public_bytes()
        older = issuer == self._issuer and (
            number < self._number if number is not None and self._number is not None
            else self._this_update is not None and crl.last_update_utc < self._this_update)
        revoked = pki.revoked_serials(crl)
        if older:
            # An old copy put back, or a CRL begun again after the CA host lost its file
            # (numbered from 1): what it revokes is added, nothing in force is dropped.
            added = revoked - self._revoked
            log.error("crl older than the one in force: its revocations are added, none of "
                      "those in force is dropped", extra={"fields": {
                          "crl": str(self.path), "number": number, "in_force": self._number,
                          "thisUpdate": crl.last_update_utc.isoformat(),
                          "added": len(added)}})
            self._file = key
            if added:
                self._revoked |= added
                self.generation += 1
            return
        if revoked != self._revoked:
            self.generation += 1
        self._revoked = revoked
        self._file = key
        self._next_update = crl.next_update_utc
        self._issuer, self._this_update, self._number = issuer, crl.last_update_utc, number
        self._stale_warned = False
        log.info("crl loaded", extra={"fields": {"crl": str(self.path),
                                                  "revoked": len(revoked)}})
        self._warn_if_stale()

    def _warn_if_stale(self) -> None:
        if self._stale_warned or self._next_update is None:
            return
        if datetime.datetime.now(datetime.UTC) > self._next_update:
            self._stale_warned = True
            log.warning("crl is past its nextUpdate; its revocations stay in force; "
                        "re-sign it with `bulkhead pki crl`", extra={"fields": {
                            "crl": str(self.path),
                            "nextUpdate": self._next_update.isoformat()}})
