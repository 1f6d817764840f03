"""The pki role for real on localhost, and what uses its certificates: the identities a
real bulkhead-server accepts, a second run and renewal, a certificate the CRL revokes issued
again, nothing issued for an agent being removed, the uninstall removing the agent's
certificate and key, and `--diff` never showing a private key. Apart from test_roles.py so
the two files run on the two workers side by side (the pki role's runs are the slowest)."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import stat
import urllib.error
import urllib.request

import pytest
import yaml
from cryptography import x509

from bulkhead import pki
from conftest import BIN, run, start_server, stop_server
from test_roles import INVENTORY, ROOT, cases_in_one_run, env

# -------------------------------------------------------------------------- pki, real
PKI_PLAY = """\
- name: The pki role on localhost
  hosts: all
  connection: local
  gather_facts: false
  roles:
    - role: bulkhead.microseg.pki
      vars:
        bulkhead_pki_ca_dir: {ca}
        bulkhead_pki_dir: "{target}/{{{{ inventory_hostname }}}}"
        bulkhead_pki_owner: root
        bulkhead_pki_group: root
        bulkhead_pki_clients:
          - {{name: ansible, role: admin}}
          - {{name: ops, role: admin, tiers: [app, db]}}
          - {{name: audit, role: viewer}}
"""


def recap(out):
    """Each host's changed count in a run's PLAY RECAP."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", out.stdout, re.M)}


def pki_run(tmp, *args):
    return recap(run(["ansible-playbook", "-i", str(tmp / "hosts.yml"), str(tmp / "pki.yml"),
                      *args], env()))


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    """One run of the pki role from nothing (PKI_PLAY: the CA, three clients, srv-1's server
    and agent certificates, web-1's agent certificate), made once for the tests that start
    from a fleet already issued: each takes a copy with issue_into()."""
    base = tmp_path_factory.mktemp("issued")
    (base / "hosts.yml").write_text(INVENTORY)
    (base / "pki.yml").write_text(PKI_PLAY.format(ca=base / "ca", target=base / "target"))
    pki_run(base)
    return base


def issue_into(issued, tmp, ca, target):
    """The issued fleet copied to CA and TARGET (modes and times kept), with hosts.yml and
    pki.yml for them in TMP; the paths issued.jsonl records are those of the copy."""
    shutil.copytree(issued / "ca", ca)
    shutil.copytree(issued / "target", target)
    journal = ca / "issued.jsonl"
    journal.write_text(journal.read_text().replace(str(issued / "ca"), str(ca)))
    (tmp / "hosts.yml").write_text(INVENTORY)
    (tmp / "pki.yml").write_text(PKI_PLAY.format(ca=ca, target=target))


# The pki role's preflight on what is in its CA directory, case by case:
# (name, bulkhead_pki_ca_dir, ca_create, clients as (name, role) pairs, refused, what the
# output must say).
PREFLIGHT_CASES = [
    ("a CA at a path with a variable", "$BULKHEAD_TEST_PKI/ca", False, None, False,
     "@@ found True True @@"),
    ("none there, to be created", "{tmp}/empty", True, None, False, "@@ found False False @@"),
    ("none there, not to be created", "{tmp}/empty", False, None, True,
     "must hold both ca.crt and ca.key"),
    ("ca.crt and ca.key dangling links: there, not made anew", "{tmp}/dangling", True, None,
     False, "@@ found True True @@"),
    ("only ca.key", "{tmp}/half", True, None, True, "must hold both ca.crt and ca.key"),
    ("a dangling crl.pem: refused, not read as no CRL", "{tmp}/badcrl", False, None, True,
     "crl.pem"),
    ("a client name with a slash", "{tmp}/ca", False, (("team/alice", "admin"),), True,
     "every client's name 1 to 64 letters"),
]


@pytest.fixture(scope="module")
def preflight_cases(tmp_path_factory):
    """Every case of PREFLIGHT_CASES in one ansible-playbook run; each one's (refused,
    output)."""
    tmp = tmp_path_factory.mktemp("pki-preflight")
    pki.init_ca(tmp / "ca")
    (tmp / "empty").mkdir()
    (tmp / "dangling").mkdir()
    for name in ("ca.crt", "ca.key"):
        (tmp / "dangling" / name).symlink_to(tmp / "nowhere" / name)
    (tmp / "half").mkdir()
    shutil.copy(tmp / "ca" / "ca.key", tmp / "half" / "ca.key")
    shutil.copytree(tmp / "ca", tmp / "badcrl")
    (tmp / "badcrl" / "crl.pem").symlink_to(tmp / "nowhere" / "crl.pem")

    def step(case):
        ca_dir, create, clients = case[1:4]
        variables = {"bulkhead_pki_ca_dir": ca_dir.format(tmp=tmp),
                     "bulkhead_pki_ca_create": create}
        if clients is not None:
            variables["bulkhead_pki_clients"] = [{"name": n, "role": r} for n, r in clients]
        return {"name": "The case", "block": [
            {"name": "Preflight", "ansible.builtin.include_role": {
                "name": "bulkhead.microseg.pki", "tasks_from": "preflight"}, "vars": variables},
            {"name": "Found", "ansible.builtin.debug": {
                "msg": "@@ found {{ _bulkhead_pki_ca_found }} {{ _bulkhead_pki_ca_key_found }} @@"}},
        ]}

    os.environ["BULKHEAD_TEST_PKI"] = str(tmp)   # env() passes it on to ansible-playbook
    try:
        return cases_in_one_run(tmp, "The pki role's preflight", PREFLIGHT_CASES, step)
    finally:
        del os.environ["BULKHEAD_TEST_PKI"]


@pytest.mark.parametrize("case", PREFLIGHT_CASES, ids=[c[0] for c in PREFLIGHT_CASES])
def test_preflight_finds_the_ca_as_the_modules_would(preflight_cases, case):
    """The CA, its CRL and the certificates are looked for on the controller without a
    module run, and found as the modules would find them: a path with a $VARIABLE (a
    module's path option expands it), and anything at a path, a dangling link too (the
    modules refuse it, loudly; it is not taken for no CA, which the role would create
    anew, nor for no CRL, which would let a revoked certificate stand). A client's name is
    a certificate name, as `bulkhead pki issue` takes it."""
    refused, text = preflight_cases[case]
    assert refused is case[4], text
    assert case[5] in text, text


def identity(path):
    return pki.identity_from_subject(x509.load_pem_x509_certificate(path.read_bytes()).subject)


def serial(path):
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_pki_role_issues_what_the_server_accepts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the role chowns the keys it distributes: run as root")
    ca, target = tmp_path / "ca", tmp_path / "target"
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "pki.yml").write_text(PKI_PLAY.format(ca=ca, target=target))

    # check mode with no CA: nothing written
    pki_run(tmp_path, "--check", "--diff")
    assert not ca.exists() and not target.exists()

    assert pki_run(tmp_path)["web-1"] > 0
    assert identity(target / "web-1" / "agent.crt") == pki.Identity("web-1", "agent")
    assert identity(target / "srv-1" / "agent.crt") == pki.Identity("srv-1", "agent")
    assert identity(ca / "clients" / "ansible.crt") == pki.Identity("ansible", "admin")
    assert identity(ca / "clients" / "ops.crt") == pki.Identity("ops", "admin", ("app", "db"))
    assert identity(ca / "clients" / "audit.crt") == pki.Identity("audit", "viewer")
    assert not (target / "web-1" / "server.crt").exists()
    for host, names in (("srv-1", ("server", "agent")), ("web-1", ("agent",))):
        for name in names:
            assert stat.S_IMODE((target / host / ("%s.key" % name)).stat().st_mode) == 0o600
    # `bulkhead pki revoke NAME` finds what the role issued
    issued = [json.loads(line) for line in (ca / "issued.jsonl").read_text().splitlines()]
    assert {e["name"] for e in issued} == {"ansible", "ops", "audit", "server@srv-1", "srv-1",
                                           "web-1"}

    # idempotent, also in check mode
    assert set(pki_run(tmp_path).values()) == {0}
    assert set(pki_run(tmp_path, "--check", "--diff").values()) == {0}

    # a real server with the role's certificates: each client gets its role
    d = tmp_path / "server"
    d.mkdir()
    for name in ("ca.crt", "server.crt", "server.key", "agent.crt", "agent.key"):
        shutil.copy(target / "srv-1" / name, d / name)
    for name in ("ansible.crt", "ansible.key"):
        shutil.copy(ca / "clients" / name, d / name)
    srv = start_server(d, who="ansible")
    try:
        assert srv.request("GET", "/v1/nodes", who="ansible") is not None
        assert "revision" in srv.request("GET", "/v1/snapshot", who="agent")
        with pytest.raises(urllib.error.HTTPError) as refused:
            srv.request("GET", "/v1/nodes", who="agent")
        assert refused.value.code == 403
        # the server's own certificate (serverAuth and clientAuth) probes /healthz, as the
        # server role's health wait does
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        ctx.load_cert_chain(str(d / "server.crt"), str(d / "server.key"))
        with urllib.request.urlopen(srv.url + "/healthz", context=ctx, timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop_server(srv)

    # rotation: certificates expiring within bulkhead_pki_renew_days are issued again
    before = serial(target / "web-1" / "agent.crt")
    out = run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "pki.yml"),
               "-e", "bulkhead_pki_renew_days=900", "-e", "bulkhead_pki_cert_days=1000"], env())
    assert "changed=0" not in out.stdout.split("PLAY RECAP")[1].split("web-1")[1].splitlines()[0]
    assert serial(target / "web-1" / "agent.crt") != before
    assert identity(target / "web-1" / "agent.crt") == pki.Identity("web-1", "agent")


@pytest.mark.skipif(os.geteuid() != 0,   # a marker: the `issued` fixture runs the role too
                    reason="the role chowns the keys it distributes: run as root")
def test_pki_role_issues_again_a_certificate_the_crl_revokes(tmp_path, issued):
    """A host added again under a name whose certificate was revoked (`bulkhead pki revoke
    NAME --dir CA_DIR`, as a decommission does) gets a new key and certificate, never the
    revoked one back: the run says why, --check shows it and writes nothing, the next run
    changes nothing, and a real server with the CRL takes the new certificate."""
    ca, target = tmp_path / "ca", tmp_path / "target"
    issue_into(issued, tmp_path, ca, target)

    def others():
        return {p: p.read_bytes() for p in sorted(ca.rglob("*.crt")) if "web-1" not in p.parts}

    old = {n: (ca / "hosts" / "web-1" / n).read_bytes() for n in ("agent.crt", "agent.key")}
    before = others()
    run([str(BIN / "bulkhead"), "pki", "revoke", "web-1", "--dir", str(ca)], env())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    revoked = pki.revoked_serials(pki.read_crl(ca / "crl.pem", [ca_cert]))
    assert serial(ca / "hosts" / "web-1" / "agent.crt") in revoked

    cmd = ["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "pki.yml")]
    # srv-1's one change: the server host gets the new crl.pem
    out = run(cmd + ["--check", "--diff"], env())
    assert recap(out)["web-1"] > 0 and recap(out)["srv-1"] == 1
    assert "web-1: the certificate %s/hosts/web-1/agent.crt (serial %X) is revoked" % (
        ca, serial(ca / "hosts" / "web-1" / "agent.crt")) in out.stdout
    assert {n: (ca / "hosts" / "web-1" / n).read_bytes() for n in old} == old
    assert {n: (target / "web-1" / n).read_bytes() for n in old} == old
    assert not (target / "srv-1" / "crl.pem").exists()

    out = run(cmd, env())
    assert recap(out)["web-1"] > 0 and recap(out)["srv-1"] == 1
    assert (target / "srv-1" / "crl.pem").read_bytes() == (ca / "crl.pem").read_bytes()
    assert "is revoked in %s/crl.pem" % ca in out.stdout
    new = {n: (ca / "hosts" / "web-1" / n).read_bytes() for n in old}
    assert new["agent.crt"] != old["agent.crt"] and new["agent.key"] != old["agent.key"]
    assert {n: (target / "web-1" / n).read_bytes() for n in old} == new
    assert serial(ca / "hosts" / "web-1" / "agent.crt") not in revoked
    assert identity(ca / "hosts" / "web-1" / "agent.crt") == pki.Identity("web-1", "agent")
    assert others() == before
    # `bulkhead pki revoke web-1` would find the new one too
    assert serial(ca / "hosts" / "web-1" / "agent.crt") in pki.serials_of(ca, "web-1")

    # idempotent, also in check mode: the new certificate is not in the CRL
    assert set(pki_run(tmp_path).values()) == {0}
    assert set(pki_run(tmp_path, "--check", "--diff").values()) == {0}

    # a real server reading the CRL: the revoked certificate is refused, the new one taken
    d = tmp_path / "server"
    d.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(target / "srv-1" / name, d / name)
    shutil.copy(ca / "crl.pem", d / "crl.pem")
    for name in ("ansible.crt", "ansible.key"):
        shutil.copy(ca / "clients" / name, d / name)
    (d / "old.crt").write_bytes(old["agent.crt"])
    (d / "old.key").write_bytes(old["agent.key"])
    shutil.copy(target / "web-1" / "agent.crt", d / "web-1.crt")
    shutil.copy(target / "web-1" / "agent.key", d / "web-1.key")
    srv = start_server(d, who="ansible")
    try:
        assert "revision" in srv.request("GET", "/v1/snapshot", who="web-1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            srv.request("GET", "/v1/snapshot", who="old")
        assert refused.value.code == 403
    finally:
        stop_server(srv)


def test_pki_role_issues_nothing_for_an_agent_to_be_removed(tmp_path):
    """With bulkhead_agent_state=absent (site.yml -e, to uninstall the agent) the pki role
    issues and copies no agent certificate: a new host gets nothing at all, a server host
    keeps its server certificate only; the run says why and a second run changes nothing.
    With the agent present again, the certificates come."""
    if os.geteuid() != 0:
        pytest.skip("the role chowns the keys it distributes: run as root")
    ca, target = tmp_path / "ca", tmp_path / "target"
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "pki.yml").write_text(PKI_PLAY.format(ca=ca, target=target))
    cmd = ["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "pki.yml"),
           "-e", "bulkhead_agent_state=absent"]
    out = run(cmd, env())
    assert "web-1: the agent is to be removed (bulkhead_pki_agent_state absent)" in out.stdout
    assert not (ca / "hosts" / "web-1").exists() and not (target / "web-1").exists()

    def files(folder):
        return sorted(p.name for p in folder.iterdir())

    assert files(ca / "hosts" / "srv-1") == ["server.crt", "server.key"]
    assert files(target / "srv-1") == ["ca.crt", "server.crt", "server.key"]
    issued = [json.loads(line) for line in (ca / "issued.jsonl").read_text().splitlines()]
    assert {e["name"] for e in issued} == {"ansible", "ops", "audit", "server@srv-1"}
    assert set(recap(run(cmd, env())).values()) == {0}

    assert pki_run(tmp_path)["web-1"] > 0
    assert identity(target / "web-1" / "agent.crt") == pki.Identity("web-1", "agent")
    assert identity(target / "srv-1" / "agent.crt") == pki.Identity("srv-1", "agent")


# site.yml's second play with -e bulkhead_agent_state=absent, on hosts whose certificates
# are in HOSTS/NAME and whose agent's files in HOSTS/NAME-agent.
SITE_ABSENT = """\
- name: Certificates and bulkhead-agent, the agent removed
  hosts: bulkhead_agents
  connection: local
  gather_facts: false
  roles:
    - role: bulkhead.microseg.pki
      vars:
        bulkhead_pki_ca_dir: {ca}
        bulkhead_pki_dir: "{hosts}/{{{{ inventory_hostname }}}}"
        bulkhead_pki_owner: root
        bulkhead_pki_group: root
    - role: bulkhead.microseg.agent
      vars:
        bulkhead_agent_allow_offline: true
        bulkhead_agent_pki_dir: "{hosts}/{{{{ inventory_hostname }}}}"
        bulkhead_agent_config_dir: "{hosts}/{{{{ inventory_hostname }}}}-agent/etc"
        bulkhead_agent_state_dir: "{hosts}/{{{{ inventory_hostname }}}}-agent/state"
        bulkhead_agent_venv: "{hosts}/{{{{ inventory_hostname }}}}-agent/venv"
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare")
def test_agent_uninstall_removes_the_certificate_and_key(tmp_path, issued):
    """site.yml with bulkhead_agent_state=absent on hosts the pki role gave certificates:
    nothing is issued, the agent's certificate and key leave the host (ca.crt too, unless
    the server's certificate is beside it), the run says that revoking is still to do;
    --check removes nothing and a second run changes nothing. In a network namespace of
    its own: the uninstall deletes the table inet bulkhead."""
    ca, hosts = tmp_path / "ca", tmp_path / "hosts"
    issue_into(issued, tmp_path, ca, hosts)
    (tmp_path / "absent.yml").write_text(SITE_ABSENT.format(ca=ca, hosts=hosts))
    assert {p.name for p in (hosts / "web-1").iterdir()} == {"ca.crt", "agent.crt", "agent.key"}
    controller = {p: p.read_bytes() for p in sorted(ca.rglob("*")) if p.is_file()}

    def ls():   # None: the directory is gone
        return {h: sorted(p.name for p in (hosts / h).iterdir()) if (hosts / h).exists()
                else None for h in ("srv-1", "web-1")}

    before = ls()
    play = ("ansible-playbook -i %s %s -e bulkhead_agent_state=absent "
            "-e _bulkhead_common_wheelhouse_dest=%s" % (   # not the host's own cache
                tmp_path / "hosts.yml", tmp_path / "absent.yml", tmp_path / "wheelhouse"))
    script = ("set -e; %s --check --diff > check.out; ls %s/web-1 > after-check; "
              "%s > first.out; %s > second.out" % (play, hosts, play, play))
    run(["unshare", "-n", "sh", "-c", script], env(), cwd=tmp_path)
    check = (tmp_path / "check.out").read_text()
    assert (tmp_path / "after-check").read_text().split() == before["web-1"]
    assert "web-1: the agent's key and certificate (CN web-1) would be removed" in check
    # web-1's pki directory, left empty, goes; srv-1's keeps the server's files.
    assert ls() == {"srv-1": ["ca.crt", "server.crt", "server.key"], "web-1": None}
    first = (tmp_path / "first.out").read_text()
    for host in ("srv-1", "web-1"):
        assert "bulkhead pki revoke %s --dir %s" % (host, ca) in first
    # nothing issued: the controller's files are as they were (issued.jsonl too)
    assert {p: p.read_bytes() for p in sorted(ca.rglob("*")) if p.is_file()} == controller
    second = (tmp_path / "second.out").read_text()
    assert re.findall(r"changed=(\d+)", second) == ["0", "0"], second


def stand_ins():
    """Handlers in the place of the server's and the agent's restarts, each listening to
    what the role's own restart handler listens to (roles/*/handlers/main.yml)."""
    handlers = []
    for role in ("server", "agent"):
        restart = next(h for h in yaml.safe_load((ROOT / "roles" / role / "handlers" /
                                                  "main.yml").read_text())
                       if h["name"] == "Restart bulkhead-%s" % role)
        handlers.append({"name": "Restart %s (a stand-in)" % role, "listen": restart["listen"],
                         "ansible.builtin.debug": {"msg": "@@ restart %s @@" % role}})
    return json.dumps(handlers)


def test_diff_shows_no_private_key(tmp_path):
    """`--check --diff` (what docs/roles.md runs first) and a run with --diff show what
    the certificates' copies change, never a private key's text: a pipeline's log keeps it.
    A new agent certificate on a host running both restarts the agent, not the server
    (which restarts for its own certificate and for the CA's), also through site.yml's two
    plays."""
    if os.geteuid() != 0:
        pytest.skip("the role chowns the keys it distributes: run as root")
    ca, target = tmp_path / "ca", tmp_path / "target"
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "pki.yml").write_text(PKI_PLAY.format(ca=ca, target=target) +
                                      "  handlers: %s\n" % stand_ins())
    cmd = ["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "pki.yml")]
    first = run(cmd + ["--diff"], env()).stdout
    shutil.rmtree(target)  # the CA is there: new hosts, as a fleet grows
    checked = run(cmd + ["--check", "--diff"], env()).stdout
    again = run(cmd + ["--diff"], env()).stdout
    for out in (first, checked, again):
        assert "Copy this host's server certificate" in out, out
        assert "Copy this host's agent certificate" in out, out
        assert "PRIVATE KEY" not in out, out
    assert "PRIVATE KEY" in (target / "web-1" / "agent.key").read_text()
    assert "@@ restart server @@" in again and "@@ restart agent @@" in again, again

    # The renewal through site.yml's two plays (its pki roles as they are there, the
    # services' roles replaced by the stand-ins): srv-1, in both groups, gets its agent's
    # certificate in the agents' play, whose handler restarts the agent, not the server.
    plays = []
    site = yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())
    for play in [p for p in site if any(r.get("role") == "bulkhead.microseg.pki"
                                        for r in p.get("roles", []))]:
        role = next(r for r in play["roles"] if r["role"] == "bulkhead.microseg.pki")
        service = "server" if play["hosts"] == "bulkhead_servers" else "agent"
        plays.append({
            "name": play["name"], "hosts": play["hosts"], "connection": "local",
            "gather_facts": False,
            "roles": [{"role": "bulkhead.microseg.pki", "vars": {
                **yaml.safe_load(PKI_PLAY.format(ca=ca, target=target))[0]["roles"][0]["vars"],
                **role.get("vars", {})}}],
            "handlers": [h for h in json.loads(stand_ins()) if service in h["name"]]})
    assert [p["hosts"] for p in plays] == ["bulkhead_servers", "bulkhead_agents"], plays
    (tmp_path / "site.yml").write_text(json.dumps(plays))
    (target / "srv-1" / "agent.crt").unlink()   # copied again: the agent's alone
    renewed = run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"),
                   str(tmp_path / "site.yml")], env()).stdout
    assert "@@ restart agent @@" in renewed, renewed
    assert "@@ restart server @@" not in renewed, renewed
