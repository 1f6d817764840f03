"""Errors raised while loading and validating resources."""

from __future__ import annotations


class ValidationError(ValueError):
    """A resource that is not valid. The message names kind, name and field path:

    `GlobalNetworkPolicy db-ingress: spec.ingress[0].destination.ports[1]: "80-90" is not a
    port, a range "a:b" or a port name`
    """

    def __init__(self, kind: str, name: str, path: str, problem: str) -> None:
        self.kind = kind
        self.name = name
        self.path = path
        self.problem = problem
        where = f"{kind or 'resource'} {name or '<unnamed>'}"
        super().__init__(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")


class LoadError(ValueError):
    """A file or document that is not YAML/JSON, or not a resource at all."""
