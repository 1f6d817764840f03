"""The API is stated once (`bulkhead.api`); the collection's copy for targets that have
Ansible alone (`plugins/module_utils/api.py`) is kept identical, and every route the
server answers is one of its routes."""

from __future__ import annotations

from pathlib import Path

from bulkhead import api
from bulkhead.model import KINDS
from bulkhead.server.app import HANDLERS

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "# ---- the API (kept identical in plugins/module_utils/api.py) ----"
END = "# ---- end of the API ----"


def section(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, path
    return text[text.index(BEGIN):text.index(END)]


def test_the_collections_copy_is_identical() -> None:
    package = section(ROOT / "agent" / "src" / "bulkhead" / "api.py")
    copy = section(ROOT / "plugins" / "module_utils" / "api.py")
    assert copy == package, ("plugins/module_utils/api.py differs from bulkhead/api.py: "
                             "copy the section between the marker lines")


def test_the_server_answers_every_route_and_only_those() -> None:
    assert {which for _, which, _ in HANDLERS} == set(api.ROUTES)


def test_kinds_and_aliases() -> None:
    assert tuple(KINDS) == api.KINDS
    for kind in api.KINDS:
        assert api.canonical_kind(kind) == kind
        assert api.canonical_kind(kind.lower()) == kind
    assert api.canonical_kind("policies") == api.canonical_kind("GNP") == \
        "GlobalNetworkPolicy"
    assert api.canonical_kind("heps") == "HostEndpoint"
    assert api.canonical_kind("nope") is None


def test_paths_encode_names() -> None:
    assert api.resource_path("HostEndpoint", "web?x") == "/v1/resources/HostEndpoint/web%3Fx"
    assert api.resource_path("Tier", "..") == "/v1/resources/Tier/%2E%2E"
    assert api.route("status", node="a/b") == "/v1/status/a%2Fb"
    assert api.resource_path("Tier") == "/v1/resources/Tier"
