"""A connection that cannot work says which option, which path and the likely cause, the
same way in a module, the store inventory plugin and the `bulkhead` CLI."""

from __future__ import annotations

import json

import pytest

from bulkhead import pki

from conftest import BIN, inventory, run, write


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A client certificate from another CA: the server must refuse it."""
    d = tmp_path_factory.mktemp("foreign-ca")
    pki.init_ca(d)
    pki.issue(d, "admin", role="admin")
    return d


def _cases(server, foreign, tmp):
    crt = server.cert("admin")[0]
    viewer_key = server.cert("viewer")[1]
    missing = str(tmp / "absent")
    return {
        "missing CA": ({"BULKHEAD_CA": missing + "/ca.crt"},
                       ["BULKHEAD_CA", missing + "/ca.crt", "no such file"]),
        "missing certificate": ({"BULKHEAD_CERT": missing + "/admin.crt"},
                                ["BULKHEAD_CERT", missing + "/admin.crt", "no such file"]),
        "missing key": ({"BULKHEAD_KEY": missing + "/admin.key"},
                        ["BULKHEAD_KEY", missing + "/admin.key", "no such file"]),
        "certificate of another CA": (
            {"BULKHEAD_CERT": str(foreign / "admin.crt"), "BULKHEAD_KEY": str(foreign / "admin.key")},
            ["BULKHEAD_CERT", str(foreign / "admin.crt"), "rejected the client certificate"]),
        "key of another certificate": (
            {"BULKHEAD_KEY": viewer_key},
            ["BULKHEAD_KEY", viewer_key, crt, "is not the private key of"]),
        "server URL with a path": (
            {"BULKHEAD_SERVER": server.url + "/api"},
            ["BULKHEAD_SERVER", server.url + "/api", "has a path (/api)"]),
        "server URL over plain HTTP": (
            {"BULKHEAD_SERVER": server.url.replace("https:", "http:")},
            ["BULKHEAD_SERVER", "speaks HTTPS only"]),
        "the wrong CA": (
            {"BULKHEAD_CA": str(foreign / "ca.crt")},
            ["BULKHEAD_CA", str(foreign / "ca.crt"), "not signed by"]),
    }


CASES = ["missing CA", "missing certificate", "missing key", "certificate of another CA",
         "key of another certificate", "server URL with a path", "server URL over plain HTTP",
         "the wrong CA"]


def _env(server, foreign, tmp, case):
    settings, expected = _cases(server, foreign, tmp)[case]
    env = server.env()
    env.update(settings)
    return env, expected


def _flat(text):
    return " ".join(text.split())


@pytest.mark.parametrize("case", CASES)
def test_module_names_option_path_and_cause(server, foreign, tmp_path, case):
    env, expected = _env(server, foreign, tmp_path, case)
    done = run(["ansible", "localhost", "-i", "localhost,", "-c", "local", "-m",
                "bulkhead.microseg.resource_info", "-a", "kind=Tier"], env, check=False)
    assert done.returncode != 0
    for part in expected:
        assert part in _flat(done.stdout), done.stdout


@pytest.mark.parametrize("case", CASES)
def test_store_inventory_names_option_path_and_cause(server, foreign, tmp_path, case):
    env, expected = _env(server, foreign, tmp_path, case)
    env["ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED"] = "true"
    config = write(tmp_path, "s.bulkhead_store.yml", "plugin: bulkhead.microseg.store\n")
    done = inventory(env, config, check=False)
    assert done.returncode != 0
    for part in expected:
        assert part in _flat(done.stderr), done.stderr


@pytest.mark.parametrize("case", CASES)
def test_cli_names_option_path_and_cause(server, foreign, tmp_path, case):
    env, expected = _env(server, foreign, tmp_path, case)
    env["HOME"] = str(tmp_path)  # no ~/.config/bulkhead/config.yaml
    done = run([str(BIN / "bulkhead"), "get", "tier"], env, check=False)
    assert done.returncode == 3, done.stderr
    for part in expected:
        assert part in _flat(done.stderr), done.stderr


def test_a_good_connection_still_works(server, tmp_path):
    done = run(["ansible", "localhost", "-i", "localhost,", "-c", "local", "-m",
                "bulkhead.microseg.resource_info", "-a", "kind=Tier"], server.env())
    assert "SUCCESS" in done.stdout
    done = run([str(BIN / "bulkhead"), "get", "tier", "-o", "json"],
               dict(server.env(), HOME=str(tmp_path)))
    assert isinstance(json.loads(done.stdout), (list, dict))
