"""`bulkhead pki issue` and `bulkhead.pki.issue`: a name is a CN and a file name, so it
cannot leave the folder; the CA's own files are never written over, and the CLI keeps an
existing certificate unless told `--force`; keys are 0600 from their first byte, written
through a temporary file nobody could plant beforehand."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from bulkhead import pki
from bulkhead.cli.main import main


def cn(crt: Path) -> str:
    subject = x509.load_pem_x509_certificate(crt.read_bytes()).subject
    return str(subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize("name", ["../escaped", "a/b", "", ".hidden", "-dash", "x" * 65,
                                  "tab\there", "new\nline", "ca.crt/../x"])
def test_a_name_that_is_no_plain_file_name_is_refused(tmp_path: Path, name: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    pki.init_ca(tmp_path / "ca")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="certificate name"):
        pki.issue(tmp_path / "ca", name, role="admin")
    assert main(["pki", "issue", "--role", "admin", "--dir", str(tmp_path / "ca"), "--",
                 name]) == 2
    assert "certificate name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_names_the_roles_and_docs_use_are_taken(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    for name in ("web-1", "server@srv-1", "alice", "node_7.example.com", "x" * 64):
        crt, _ = pki.issue(tmp_path, name, role="agent")
        assert cn(crt) == name


def test_the_ca_files_are_never_written_over(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_ca(tmp_path)
    ca = {p: (tmp_path / p).read_bytes() for p in ("ca.crt", "ca.key")}
    for name in ("ca", "CA", "Ca"):
        with pytest.raises(ValueError, match="the CA's own files"):
            pki.issue(tmp_path, name, role="agent")
    assert main(["pki", "issue", "ca", "--role", "agent", "--dir", str(tmp_path),
                 "--force"]) == 2
    assert "the CA's own files" in capsys.readouterr().err
    assert {p: (tmp_path / p).read_bytes() for p in ca} == ca
    # elsewhere, "ca" is a name like any other; the CA still signs
    crt, _ = pki.issue(tmp_path, "ca", role="agent", out=tmp_path / "out")
    assert cn(crt) == "ca" and {p: (tmp_path / p).read_bytes() for p in ca} == ca
    assert cn(pki.issue(tmp_path, "bob", role="admin")[0]) == "bob"


def test_the_cli_keeps_an_existing_certificate_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert main(["pki", "init", "--dir", d]) == 0
    assert main(["pki", "issue", "server", "--server", "--dir", d]) == 0
    first = (tmp_path / "server.crt").read_bytes(), (tmp_path / "server.key").read_bytes()
    capsys.readouterr()
    assert main(["pki", "issue", "server", "--role", "admin", "--dir", d]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert ((tmp_path / "server.crt").read_bytes(),
            (tmp_path / "server.key").read_bytes()) == first
    assert main(["pki", "issue", "server", "--server", "--dir", d, "--force"]) == 0
    assert (tmp_path / "server.crt").read_bytes() != first[0]


def test_keys_are_private_whatever_was_there_and_a_planted_link_is_not_followed(
        tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "alice.key").write_bytes(b"old")
    (out / "alice.key").chmod(0o644)          # an older, readable key: replaced at 0600
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    (out / "alice.key.tmp").symlink_to(victim)   # where an earlier version wrote first
    old_umask = os.umask(0)
    try:
        crt, key = pki.issue(tmp_path, "alice", role="admin", out=out)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and not key.is_symlink()
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(crt.stat().st_mode) == 0o644
    assert victim.read_bytes() == b"victim"
    assert sorted(p.name for p in out.iterdir()) == ["alice.crt", "alice.key",
                                                     "alice.key.tmp"]


@pytest.mark.parametrize(("attrs", "found"), [
    ([("CN", "web-1"), ("OU", "role=agent")], pki.Identity("web-1", "agent")),
    ([("CN", "ops"), ("OU", "role=admin"), ("OU", "tier=b"), ("OU", "tier=a")],
     pki.Identity("ops", "admin", ("a", "b"))),
    ([("CN", "web-1"), ("CN", "db-1"), ("OU", "role=agent")], "names 2 CNs"),
    ([("OU", "role=agent")], "no bulkhead role"),
    ([("CN", "x"), ("OU", "role=agent"), ("OU", "role=admin")], "no bulkhead role"),
    ([("CN", "x"), ("OU", "role=Admin")], "no bulkhead role"),
])
def test_the_identity_a_subject_names(attrs: list[tuple[str, str]],
                                      found: pki.Identity | str) -> None:
    oids = {"CN": x509.NameOID.COMMON_NAME, "OU": x509.NameOID.ORGANIZATIONAL_UNIT_NAME}
    subject = x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs])
    if isinstance(found, pki.Identity):
        assert pki.identity_from_subject(subject) == found
    else:
        with pytest.raises(ValueError, match=found):
            pki.identity_from_subject(subject)
