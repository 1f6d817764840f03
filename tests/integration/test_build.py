"""The collection as users get it: `ansible-galaxy collection build` makes an artifact,
`ansible-galaxy collection install` installs it into an empty directory, and from that
installed copy `ansible-doc` renders every plugin and a filter runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile

import pytest
import yaml

from conftest import BIN, HERE, ansible_env, run

ROOT = HERE.parents[1]
PLUGIN_TYPES = ("modules", "inventory", "lookup", "filter")


def plugins_in_tree():
    """Every plugin of the checkout, by ansible-doc type: name -> documented names."""
    found = {}
    for kind in PLUGIN_TYPES:
        folder = ROOT / "plugins" / kind
        if kind == "filter":
            # one Python file holds the filters; each has its sidecar documentation
            names = [yaml.safe_load(p.read_text())["DOCUMENTATION"]["name"]
                     for p in sorted(folder.glob("*.yml"))]
        else:
            names = [p.stem for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]
        found["module" if kind == "modules" else kind] = names
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The built artifact and an ansible-* environment that sees only its installed copy."""
    tmp = tmp_path_factory.mktemp("galaxy")
    env = dict(os.environ)
    env.update(ansible_env())
    env.update(ANSIBLE_COLLECTIONS_PATH=str(tmp / "installed"),
               PATH="%s:%s" % (BIN, env.get("PATH", "")))
    # The test run puts the checkout's tree on PYTHONPATH, where Ansible would find it too.
    env.pop("PYTHONPATH", None)
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    run(["ansible-galaxy", "collection", "build", str(ROOT), "--output-path", str(tmp)], env)
    artifact = tmp / ("%s-%s-%s.tar.gz" % (galaxy["namespace"], galaxy["name"],
                                           galaxy["version"]))
    assert artifact.is_file()
    run(["ansible-galaxy", "collection", "install", str(artifact), "-p",
         str(tmp / "installed"), "--offline"], env)
    return artifact, tmp / "installed" / "ansible_collections" / "bulkhead" / "microseg", env


def test_artifact_holds_the_collection_and_nothing_else(installed):
    artifact = installed[0]
    with tarfile.open(artifact) as tar:
        names = set(tar.getnames())
    for kind, plugins in plugins_in_tree().items():
        folder = "modules" if kind == "module" else kind
        for name in plugins:
            if kind != "filter":
                assert "plugins/%s/%s.py" % (folder, name) in names
    for path in ("MANIFEST.json", "FILES.json", "meta/runtime.yml", "plugins/filter/selector.py",
                 "plugins/filter/selector_match.yml", "plugins/plugin_utils/engine.py",
                 "plugins/module_utils/client.py", "plugins/doc_fragments/connection.py",
                 "README.md", "LICENSE"):
        assert path in names, path
    # The Python distribution, the venv and test output stay out.
    for name in names:
        assert not name.startswith(("agent/", ".venv/", "tests/output/", ".git/")), name
        assert "__pycache__" not in name and not name.endswith(".pyc"), name


def test_install_into_an_empty_directory(installed):
    copy, env = installed[1:]
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["namespace"] == "bulkhead"
    assert manifest["collection_info"]["name"] == "microseg"
    listed = run(["ansible-galaxy", "collection", "list", "bulkhead.microseg", "--format", "json"],
                 env)
    assert list(json.loads(listed.stdout)) == [str(copy.parents[1])]
    # The installed copy works: a filter evaluated by a real ad-hoc run.
    done = run(["ansible", "localhost", "-i", "localhost,", "-c", "local", "-m",
                "ansible.builtin.debug", "-a",
                "msg={{ {'zone': 'dmz'} | bulkhead.microseg.selector_match(\"zone != 'trusted'\") }}"],
               env)
    assert '"msg": true' in done.stdout


@pytest.mark.parametrize("kind", ["module", "inventory", "lookup", "filter"])
def test_ansible_doc_renders_every_plugin(installed, kind):
    env = installed[2]
    names = plugins_in_tree()[kind]
    assert names, kind
    listed = run(["ansible-doc", "-t", kind, "-l", "bulkhead.microseg", "--json"], env)
    assert sorted(json.loads(listed.stdout)) == sorted("bulkhead.microseg." + n for n in names)
    full = ["bulkhead.microseg." + n for n in names]
    docs = json.loads(run(["ansible-doc", "-t", kind, "--json"] + full, env).stdout)
    assert sorted(docs) == sorted(full)
    for name, entry in docs.items():
        doc = entry["doc"]
        assert doc["short_description"] and doc["description"], name
        assert entry["examples"], name
        if kind in ("module", "lookup", "filter"):
            assert entry["return"], name
        assert "options" in doc, name
    # The text rendering (what a user reads) as well, without warnings.
    text = run(["ansible-doc", "-t", kind] + full, env)
    for name in names:
        assert "bulkhead.microseg." + name in text.stdout
    assert "WARNING" not in text.stderr and "ERROR" not in text.stderr, text.stderr


def test_store_plugin_and_modules_share_the_connection_options(installed):
    env = installed[2]
    module = json.loads(run(["ansible-doc", "-t", "module", "--json",
                             "bulkhead.microseg.host_endpoint"], env).stdout)
    store = json.loads(run(["ansible-doc", "-t", "inventory", "--json",
                            "bulkhead.microseg.store"], env).stdout)
    module_options = module["bulkhead.microseg.host_endpoint"]["doc"]["options"]
    store_options = store["bulkhead.microseg.store"]["doc"]["options"]
    for option in ("server_url", "ca_path", "client_cert", "client_key", "validate_certs",
                   "request_timeout"):
        assert store_options[option]["type"] == module_options[option]["type"], option
        assert store_options[option]["description"] == module_options[option]["description"]
    assert store_options["server_url"]["env"] == [{"name": "BULKHEAD_SERVER"}]
    assert store_options["client_key"]["env"] == [{"name": "BULKHEAD_KEY"}]


@pytest.mark.parametrize("kind, name, values", [
    ("lookup", "selector", ["!has(app)", "all()", "[?starts_with(@, 'web')]"]),
    ("inventory", "store", ["zone == 'trusted' && has(app)"]),
    ("inventory", "endpoints", ["app | default(omit)"]),
    ("filter", "selector_from_labels", ["all()", '(app == "kafka" && zone == "trusted")']),
])
def test_markup_with_parentheses_renders_whole(installed, kind, name, values):
    """V(), C() and friends end at the first unescaped parenthesis: a selector in them
    must escape its own, or ansible-doc shows `!has(app'."""
    env = installed[2]
    text = " ".join(run(["ansible-doc", "-t", kind, "bulkhead.microseg." + name],
                        env).stdout.split())
    for value in values:
        assert "`%s'" % value in text, value


def _build_wheel(out, env):
    """The bulkhead-microseg wheel from agent/: without build isolation (offline) when this
    interpreter has the build backend agent/pyproject.toml asks for (tests/requirements.txt
    installs it), else with pip's isolated build from the configured index."""
    try:
        import setuptools  # pylint: disable=import-outside-toplevel
        offline = int(setuptools.__version__.split(".")[0]) >= 77
    except ImportError:
        offline = False
    # From a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = out.parent / "agent-source"
    shutil.copytree(ROOT / "agent", source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "tests", "benchmarks"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    run(cmd + (["--no-build-isolation", "--no-index"] if offline else []), env)
    wheels = sorted(out.glob("bulkhead_microseg-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_and_artifact_in_a_fresh_venv_offline(installed, tmp_path):
    """What an execution environment holds: the collection as ansible-galaxy built and
    installed it, and the bulkhead-microseg wheel installed into a fresh venv, nothing
    from this checkout. A play there uses the lookup, a filter and the endpoints inventory
    plugin, with no index reachable (pip --no-index; PIP_NO_INDEX for anything else)."""
    copy, env = installed[1:]
    # The collection names its controller dependency by the distribution's real name.
    for name in ("requirements.txt", "meta/ee-requirements.txt"):
        lines = [line.split("#")[0].strip() for line in (copy / name).read_text().splitlines()]
        assert any(line.startswith("bulkhead-microseg") for line in lines), name
    assert (copy / "bindep.txt").is_file() and (copy / "meta/execution-environment.yml").is_file()

    wheel = _build_wheel(tmp_path / "dist", env)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env)
    python = venv / "bin" / "python"
    offline = dict(env, PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         "--no-deps", str(wheel)], offline)
    # Ansible and the wheel's dependencies (PyYAML, netaddr, aiohttp, cryptography) come
    # from this test's environment through a .pth line: nothing is downloaded, and its
    # bulkhead (an editable install of the checkout) stays out of sight, since .pth files
    # inside that directory are not processed.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    fresh_site = next(venv.glob("lib/python*/site-packages"))
    (fresh_site / "zz-test-deps.pth").write_text(site + "\n")
    where = run([str(python), "-c", "import bulkhead, importlib.metadata as m; "
                 "print(bulkhead.__file__); print(m.version('bulkhead-microseg'))"], offline)
    module_file, version = where.stdout.split()
    assert module_file.startswith(str(fresh_site)), module_file
    assert version == yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]

    hosts = tmp_path / "hosts.yml"
    hosts.write_text("all:\n  hosts:\n    web-1: {ansible_host: 198.18.4.1, zone: dmz, app: web}\n"
                     "    db-1: {ansible_host: 198.18.4.2, zone: trusted, app: db}\n")
    (tmp_path / "site.bulkhead.yml").write_text(
        "plugin: bulkhead.microseg.endpoints\nstrict: true\nlabels:\n  zone: zone\n  app: app\n")
    play = tmp_path / "play.yml"
    play.write_text("""\
- name: The collection's controller plugins in a fresh environment
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Lookup, filter and inventory plugin agree
      ansible.builtin.assert:
        that:
          - query('bulkhead.microseg.selector', "zone == 'dmz'") == ['web-1']
          - query('bulkhead.microseg.selector', "app == 'db'", return='ips') == ['198.18.4.2']
          - hostvars['db-1'].bulkhead_labels | bulkhead.microseg.selector_match("zone == 'trusted'")
          - hostvars['web-1'].bulkhead_host_endpoint.spec.expectedIPs == ['198.18.4.1']
          - groups['label_zone_trusted'] == ['db-1']
""")
    fresh = dict(offline, ANSIBLE_PYTHON_INTERPRETER=str(python),
                 PATH="%s:%s" % (venv / "bin", offline["PATH"]))
    fresh.pop("PYTHONPATH", None)
    done = run([str(python), "-m", "ansible", "playbook", "-i", str(hosts),
                "-i", str(tmp_path / "site.bulkhead.yml"), str(play)], fresh)
    assert "failed=0" in done.stdout


def test_release_hygiene(installed):
    """requires_ansible claims what the tests run with; changelog fragments are in known
    sections; related modules name each other; the typed modules' `action` has choices."""
    copy, env = installed[1:]
    runtime = yaml.safe_load((copy / "meta" / "runtime.yml").read_text())
    claimed = runtime["requires_ansible"]
    tested = [line for line in (ROOT / "tests" / "requirements.txt").read_text().splitlines()
              if line.startswith("ansible-core")][0]
    low = tested.split(">=")[1].split(",")[0]
    assert claimed == ">=%s.0" % low, (claimed, tested)
    assert (ROOT / "tests" / "sanity" / ("ignore-%s.txt" % low)).is_file()
    config = yaml.safe_load((ROOT / "changelogs" / "config.yaml").read_text())
    sections = {section[0] for section in config["sections"]}
    sections |= {config["prelude_section_name"], config["trivial_section_name"]}
    fragments = sorted((ROOT / "changelogs" / "fragments").glob("*.yml"))
    assert fragments
    for fragment in fragments:
        assert set(yaml.safe_load(fragment.read_text())) <= sections, fragment.name
    modules = plugins_in_tree()["module"]
    docs = json.loads(run(["ansible-doc", "-t", "module", "--json"] +
                          ["bulkhead.microseg." + n for n in modules], env).stdout)
    for name, entry in docs.items():
        assert entry["doc"].get("seealso"), name
        action = (entry.get("return") or {}).get("action")
        if action:
            assert set(action["choices"]) == {"created", "updated", "deleted", "unchanged"}, name
