"""A real bulkhead-server (real mutual-TLS certificates from `bulkhead.pki`) on
127.0.0.1 for the playbook and inventory tests, and helpers to run ansible-* on it."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from bulkhead import pki
from bulkhead.testbed.ports import free_port

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@dataclass
class Server:
    url: str
    pki: Path
    proc: subprocess.Popen

    def cert(self, name):
        return str(self.pki / ("%s.crt" % name)), str(self.pki / ("%s.key" % name))

    def request(self, method, path, body=None, who="admin"):
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(*self.cert(who))
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def env(self, who="admin"):
        """Environment for ansible-* with the connection in BULKHEAD_* variables."""
        crt, key = self.cert(who)
        env = dict(os.environ)
        env.update(BULKHEAD_SERVER=self.url, BULKHEAD_CA=str(self.pki / "ca.crt"),
                   BULKHEAD_CERT=crt, BULKHEAD_KEY=key,
                   PATH="%s:%s" % (BIN, env.get("PATH", "")))
        env.update(ansible_env())
        return env

    def wipe(self):
        """Delete every resource: each test starts from an empty store."""
        items = self.request("GET", "/v1/resources")["items"]
        for doc in sorted(items, key=lambda d: d["kind"] == "Tier"):
            path = "/v1/resources/%s/%s" % (doc["kind"], doc["metadata"]["name"])
            self.request("DELETE", path)


def ansible_env():
    """Settings that make ansible-* quiet and reproducible, and find this collection."""
    tree = os.environ.get("BULKHEAD_COLLECTIONS_PATH")
    if not tree:
        raise RuntimeError("BULKHEAD_COLLECTIONS_PATH is not set: run tests/run-collection-tests.sh")
    return {
        "ANSIBLE_COLLECTIONS_PATH": tree,
        "ANSIBLE_ROLES_PATH": str(HERE / "targets"),
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_HOME": os.environ.get("BULKHEAD_ANSIBLE_HOME", str(Path(tree).parent / "home")),
    }


def start_server(d, cert="server", ca="ca.crt", who="viewer"):
    """bulkhead-server on a free 127.0.0.1 port with the certificates in D (D/CERT.crt and
    .key, the client CA D/CA), its store and log in D; returns once WHO's certificate
    (D/WHO.crt) reads /v1/nodes."""
    port = free_port()
    log = open(d / "server.log", "wb")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(
        [str(BIN / "bulkhead-server"), "--listen", "127.0.0.1:%d" % port,
         "--datastore", "sqlite://%s/store.db" % d, "--tls-cert", str(d / ("%s.crt" % cert)),
         "--tls-key", str(d / ("%s.key" % cert)), "--client-ca", str(d / ca),
         "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    srv = Server("https://127.0.0.1:%d" % port, d, proc)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError("bulkhead-server exited: %s" % (d / "server.log").read_text())
        try:
            srv.request("GET", "/v1/nodes", who=who)
            return srv
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def stop_server(srv):
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("bulkhead-server")
    pki.init_ca(d)
    pki.issue(d, "server", server=True, hosts=("127.0.0.1",))
    pki.issue(d, "admin", role="admin")
    pki.issue(d, "viewer", role="viewer")
    for node in ("node-1", "node-2"):
        pki.issue(d, node, role="agent")
    srv = start_server(d)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture
def clean_server(server):
    server.wipe()
    return server


def run(cmd, env, cwd=None, check=True):
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError("%s failed (%d)\n--- stdout\n%s\n--- stderr\n%s" % (
            " ".join(cmd), proc.returncode, proc.stdout[-20000:], proc.stderr[-5000:]))
    return proc


# ------------------------------------------------------------------ ansible-inventory
GOLDEN = HERE / "golden"


def plain(value):
    """ansible-inventory's JSON without the __ansible_unsafe wrappers that mark computed
    (untrusted) strings; the values themselves are compared."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def compare_golden(name, output):
    """ansible-inventory --list output against golden/NAME (BULKHEAD_GOLDEN_UPDATE=1 rewrites
    it; review the diff)."""
    data = plain(json.loads(output))
    path = GOLDEN / name
    if os.environ.get("BULKHEAD_GOLDEN_UPDATE"):
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    assert data == json.loads(path.read_text())


def inventory_env(tmp_path, **extra):
    """ansible-* settings with a jsonfile fact cache in TMP_PATH/facts."""
    env = dict(os.environ)
    env.update(ansible_env())
    env.update(ANSIBLE_CACHE_PLUGIN="jsonfile",
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(tmp_path / "facts"),
               ANSIBLE_CACHE_PLUGIN_TIMEOUT="0",
               PATH="%s:%s" % (BIN, env.get("PATH", "")))
    env.update(extra)
    return env


def inventory(env, *sources, check=True, args=("--list",)):
    """ansible-inventory -i SOURCE... ARGS."""
    cmd = ["ansible-inventory"]
    for source in sources:
        cmd += ["-i", str(source)]
    return run(cmd + list(args), env, check=check)


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def own_server(tmp_path_factory):
    """A server of its own: the playbooks wait for every agent that ever reported, and the
    session's server has heard from the other tests' make-believe agents. With a viewer's
    certificate and those of the agents of node-1 and node-2, for a test's own."""
    d = tmp_path_factory.mktemp("own-server")
    pki.init_ca(d)
    pki.issue(d, "server", server=True, hosts=("127.0.0.1",))
    pki.issue(d, "admin", role="admin")
    pki.issue(d, "viewer", role="viewer")
    for node in ("node-1", "node-2"):
        pki.issue(d, node, role="agent")
    srv = start_server(d, who="admin")
    try:
        yield srv
    finally:
        stop_server(srv)
