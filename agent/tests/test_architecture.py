"""The package's imports follow the arrows of shared/DESIGN.md ("Repository layout"):

    selector <- model <- policy <- dataplane/observe <- agent
    model <- store <- server, and policy <- server (the impact preview)
    client <- agent/cli
    `net` below policy and dataplane; small shared rooms for pki and logging setup below
    server, agent and CLI, and for netlink framing below dataplane and observe (siblings:
    neither imports the other). policy/ knows nothing of nftables or HTTP; dataplane/ knows
    nothing of HTTP, datastores or the lab; the agent never imports the server; the
    collection's modules and module_utils never import `bulkhead`.

Every module is read with `ast` (nothing is imported), placed in its room, and each of its
imports (lazy ones inside functions too) is checked against the rooms that room may use.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

AGENT_DIR = Path(__file__).resolve().parents[1]
PACKAGE = AGENT_DIR / "src" / "bulkhead"
COLLECTION = AGENT_DIR.parent

# Module name prefix -> room; the longest prefix wins. A module under no prefix fails the
# test: give a new room a line here and its arrows below.
ROOMS = {
    "bulkhead.selector": "selector",
    "bulkhead.net": "net",
    "bulkhead.model": "model",
    "bulkhead.policy": "policy",
    "bulkhead.dataplane": "dataplane",
    "bulkhead.observe": "observe",
    "bulkhead.agent": "agent",
    "bulkhead.store": "store",
    "bulkhead.server": "server",
    "bulkhead.client": "client",
    "bulkhead.cli": "cli",
    "bulkhead.pki": "pki",
    "bulkhead.logs": "logging",
    # Netlink framing and sockets in a namespace, for the rooms that talk to the kernel.
    "bulkhead.netlink": "netlink",
    "bulkhead.lab": "lab",
    # Lab machines running the real server and agents, and the demo on them: they use the
    # client and the engine, which the lab itself (namespaces only) does not.
    "bulkhead.lab.testbed": "testbed",
    "bulkhead.testbed": "testbed",
    "bulkhead.lab.demo": "demo",
    "bulkhead.demo": "demo",
    "bulkhead.conformance": "conformance",
    # Shared by every room: the version, numbers every part agrees on, and the API's
    # statement (kinds, routes: standard library only).
    "bulkhead": "root",
    "bulkhead.defaults": "root",
    "bulkhead.api": "root",
}

# The rooms each room may import directly; what those may import is allowed too (see
# `allowed`). A room may always import itself and "root".
ARROWS: dict[str, set[str]] = {
    "selector": set(),
    "net": set(),
    "pki": set(),
    "logging": set(),
    "model": {"selector", "net"},
    "policy": {"model", "net"},
    "netlink": set(),
    "dataplane": {"policy", "net", "netlink"},
    "observe": {"policy", "net", "netlink"},
    "store": {"model"},
    "client": {"model"},
    # The impact preview (POST /v1/preview) judges stored flows with the policy engine
    # where they are stored, for the CLI and for Ansible modules that cannot import
    # bulkhead: an arrow DESIGN.md does not draw, pointing the same way as the others
    # (policy imports nothing of the server).
    "server": {"store", "pki", "logging", "policy"},
    "agent": {"dataplane", "observe", "client", "pki", "logging"},
    "lab": set(),
    "testbed": {"lab", "client", "policy", "pki", "logging"},
    "demo": {"testbed"},
    # The Windows dataplanes run here as compilers with fakes (conformance/windows.py).
    "conformance": {"testbed", "policy", "dataplane"},
    "cli": {"client", "conformance", "demo", "policy", "pki", "logging"},
}

# Imports known to run against the arrows, each with the fix under way (none today); an
# entry that no longer matches an import fails the test too.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

# Libraries that mark knowledge a room must not have.
FORBIDDEN_LIBRARIES = {
    "policy": {"aiohttp", "http", "urllib", "ssl", "nftables"},          # nftables, HTTP
    "dataplane": {"aiohttp", "http", "urllib", "ssl", "sqlite3"},         # HTTP, datastores
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str | None:
    best = ""
    for prefix in ROOMS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return ROOMS.get(best)


def allowed(room: str) -> set[str]:
    """The room itself, root, and every room reachable down the arrows."""
    seen = {room, "root"}
    todo = [room]
    while todo:
        for lower in ARROWS.get(todo.pop(), set()):
            if lower not in seen:
                seen.add(lower)
                todo.append(lower)
    return seen


def imports(source: str, package: str = "", known: frozenset[str] = frozenset()
            ) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in `source`, a module of `package`.
    `from a import b` names the module a.b when that is in `known`, else a."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def package_imports() -> Iterator[tuple[str, Path, str, int]]:
    """(module, its file, imported module, line) across the package."""
    found = modules()
    known = frozenset(found)
    for module, path in found.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target, line in imports(path.read_text(encoding="utf-8"), package, known):
            yield module, path, target, line


def is_bulkhead(module: str) -> bool:
    return module == "bulkhead" or module.startswith("bulkhead.")


def test_every_module_has_a_room() -> None:
    homeless = [m for m in modules() if room_of(m) is None]
    assert not homeless, f"modules in no room (add them to ROOMS and ARROWS): {homeless}"
    assert set(ROOMS.values()) - {"root"} <= set(ARROWS)


def test_imports_follow_the_arrows() -> None:
    wrong: list[str] = []
    seen_known: set[tuple[str, str]] = set()
    for module, path, target, line in package_imports():
        room = room_of(module)
        target_room = room_of(target)
        if not is_bulkhead(target) or (room and target_room in allowed(room)):
            continue
        if (module, target) in KNOWN_VIOLATIONS:
            seen_known.add((module, target))
            continue
        wrong.append(f"{path.relative_to(AGENT_DIR)}:{line}: {module} ({room}) imports "
                     f"{target} ({target_room})")
    assert not wrong, "imports against the arrows of DESIGN.md:\n" + "\n".join(wrong)
    stale = KNOWN_VIOLATIONS - seen_known
    assert not stale, f"fixed: remove from KNOWN_VIOLATIONS: {sorted(stale)}"


def test_rooms_do_not_use_libraries_of_other_stages() -> None:
    wrong = [f"{path.relative_to(AGENT_DIR)}:{line}: {module} imports {target}"
             for module, path, target, line in package_imports()
             if target.split(".")[0] in FORBIDDEN_LIBRARIES.get(room_of(module) or "", set())]
    assert not wrong, "\n".join(wrong)


def test_the_collections_modules_never_import_bulkhead() -> None:
    """Modules and module_utils run on targets that have Ansible alone."""
    files = [p for sub in ("modules", "module_utils")
             for p in sorted((COLLECTION / "plugins" / sub).glob("*.py"))]
    assert files
    wrong = [f"{p.relative_to(COLLECTION)}:{line}: {target}" for p in files
             for target, line in imports(p.read_text(encoding="utf-8"))
             if is_bulkhead(target)]
    assert not wrong, "\n".join(wrong)


def test_the_checker_finds_what_it_must() -> None:
    """Lazy imports inside functions count; relative imports resolve; the arrows refuse
    a policy module importing the dataplane and the agent importing the server."""
    source = ("import aiohttp\n"
              "def f():\n    from bulkhead.dataplane.nftables import render\n"
              "from ..model import snapshot\n"
              "from . import flow\n")
    known = frozenset({"bulkhead.model.snapshot"})
    assert list(imports(source, "bulkhead.policy", known)) == [
        ("aiohttp", 1), ("bulkhead.model.snapshot", 4), ("bulkhead.policy", 5),
        ("bulkhead.dataplane.nftables", 3)]
    assert room_of("bulkhead.dataplane.nftables") not in allowed("policy")
    assert room_of("bulkhead.server.main") not in allowed("agent")
    assert room_of("bulkhead.lab.core") not in allowed("dataplane")
    assert room_of("bulkhead.store.sqlite") not in allowed("dataplane")
    assert room_of("bulkhead.model.resources") in allowed("agent")
    assert room_of("bulkhead.lab.testbed") == "testbed"
