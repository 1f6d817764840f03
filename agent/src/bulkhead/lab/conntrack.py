"""Connection tracking in lab hosts: forget tracked connections, so an old connection
never hides what a new policy does to new ones."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from bulkhead.lab.kernel import LabError
from bulkhead.lab.processes import in_namespace

TIMEOUT = 30.0


def flush(namespaces: Mapping[str, str]) -> None:
    """`conntrack -F` in every namespace of `namespaces` (host -> namespace), at once."""
    procs = []
    for host, ns in namespaces.items():
        try:
            procs.append((host, subprocess.Popen(
                in_namespace(ns, ["conntrack", "-F"]), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)))
        except FileNotFoundError:
            raise LabError("`ip` is not installed (Debian package iproute2)") from None
    errors = []
    for host, proc in procs:
        _out, err = proc.communicate(timeout=TIMEOUT)
        if proc.returncode != 0:
            errors.append(f"{host}: {err.strip()}")
    if errors:
        raise LabError("conntrack -F failed (Debian package conntrack): " + "; ".join(errors))
