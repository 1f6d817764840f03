"""bulkhead-server's HTTP API, stated once: the kinds and how users may spell them, the
fields the server owns, the routes and how a path is built.

The server, its Python client, the agent, the CLI and the lab read it here. The Ansible
collection's modules run where only Ansible is installed, so
`plugins/module_utils/api.py` carries a copy of everything between the two marker lines
below; `tests/test_api.py` keeps the copy identical. Standard library only.
"""

from __future__ import annotations

from urllib.parse import quote

# ---- the API (kept identical in plugins/module_utils/api.py) ----
API_VERSION = "projectcalico.org/v3"

KINDS = ("HostEndpoint", "GlobalNetworkPolicy", "StagedGlobalNetworkPolicy", "Tier",
         "GlobalNetworkSet", "Profile")

# Short names, as calicoctl accepts them besides the lower-case and plural spellings.
SHORT_NAMES = {"hep": "HostEndpoint", "heps": "HostEndpoint",
               "gnp": "GlobalNetworkPolicy", "gnps": "GlobalNetworkPolicy",
               "policy": "GlobalNetworkPolicy", "policies": "GlobalNetworkPolicy",
               "sgnp": "StagedGlobalNetworkPolicy", "sgnps": "StagedGlobalNetworkPolicy",
               "gns": "GlobalNetworkSet"}


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for kind in KINDS:
        plural = kind.lower()[:-1] + "ies" if kind.endswith("y") else kind.lower() + "s"
        for alias in (kind, kind.lower(), plural):
            out[alias] = kind
    out.update(SHORT_NAMES)
    return out


KIND_ALIASES = _aliases()

# Metadata the server owns: never part of a comparison or of what a user writes.
SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation")

# The label the collection marks what it owns with; labels under its prefix are the
# collection's own (purges keep them).
OWNER_LABEL = "microseg.bulkhead.io/managed-by"
RESERVED_LABEL_PREFIX = "microseg.bulkhead.io/"

ROUTES = {
    "resources": "/v1/resources",
    "kind": "/v1/resources/{kind}",
    "resource": "/v1/resources/{kind}/{name}",
    "apply": "/v1/apply",
    "delete": "/v1/delete",
    "sync": "/v1/sync",
    "rollback": "/v1/rollback",
    "promote": "/v1/promote",
    "export": "/v1/export",
    "history": "/v1/history",
    "snapshot": "/v1/snapshot",
    "watch": "/v1/watch",
    "status": "/v1/status/{node}",
    "nodes": "/v1/nodes",
    "flows": "/v1/flows",
    "dns": "/v1/dns",
    "preview": "/v1/preview",
    "healthz": "/healthz",
    "readyz": "/readyz",
    "metrics": "/metrics",
}


def canonical_kind(kind: str) -> str | None:
    """`gnp`, `globalnetworkpolicies`, ... -> GlobalNetworkPolicy; None if unknown."""
    return KIND_ALIASES.get(kind) or KIND_ALIASES.get(kind.lower())


def segment(value: str) -> str:
    """`value` as one URL path segment: every reserved character percent-encoded.

    A name is data, not URL syntax: unencoded, `web?x` would start a query string and
    `a/b` add a segment. "." and ".." are encoded too, or URL normalization would resolve
    them away."""
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if value and not value.strip(".") else encoded


def route(which: str, /, **params: str) -> str:
    """The path of route `which`, its {parameters} filled in as encoded segments."""
    return ROUTES[which].format(**{k: segment(v) for k, v in params.items()})


def resource_path(kind: str, name: str | None = None) -> str:
    """`/v1/resources/KIND[/NAME]`, each segment encoded."""
    if name is None:
        return route("kind", kind=kind)
    return route("resource", kind=kind, name=name)


def label_value(value: object) -> str:
    """The one rule for a label value every writer follows (the collection's modules and
    inventory plugin, the CLI): a boolean becomes `true`/`false`, a number stays as
    written, text is kept; TypeError for null and for containers."""
    if value is None:
        raise TypeError("a label value cannot be null; leave the label out instead "
                        "(in Jinja: default(omit))")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    kind = "mapping" if isinstance(value, dict) else \
        "list" if isinstance(value, (list, tuple)) else type(value).__name__
    raise TypeError(f"a label value must be a string, number or boolean, not {kind}")

# ---- end of the API ----
