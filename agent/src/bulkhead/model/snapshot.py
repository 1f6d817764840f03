"""A consistent set of resources: what a store holds at one revision, or a set of files.

Building a Snapshot checks what no single resource can: names are unique per kind and every
policy's tier exists. The `default` tier and the `projectcalico-default-allow` profile are
always there, as in Calico.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bulkhead.model.errors import ValidationError
from bulkhead.model.resources import (
    DEFAULT_ALLOW,
    DEFAULT_TIER,
    DEFAULT_TIER_RESOURCE,
    GlobalNetworkPolicy,
    GlobalNetworkSet,
    HostEndpoint,
    Profile,
    Resource,
    StagedGlobalNetworkPolicy,
    Tier,
)


def order_key(order: float | None, name: str) -> tuple[int, float, str]:
    """Calico's ordering: by order ascending, nil (unset) last, ties by name."""
    return (1, 0.0, name) if order is None else (0, order, name)


@dataclass
class Snapshot:
    tiers: dict[str, Tier] = field(default_factory=dict)
    policies: dict[str, GlobalNetworkPolicy] = field(default_factory=dict)
    staged: dict[str, StagedGlobalNetworkPolicy] = field(default_factory=dict)
    # Mappings: the agent's snapshots hold Tables (bulkhead.model.table), a change's
    # version sharing what it did not change; never modified once built.
    host_endpoints: Mapping[str, HostEndpoint] = field(default_factory=dict)
    network_sets: Mapping[str, GlobalNetworkSet] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)

    @classmethod
    def build(cls, resources: Iterable[Resource]) -> Snapshot:
        """Index resources by kind; reject duplicates and policies in unknown tiers."""
        snap = cls()
        snap.tiers[DEFAULT_TIER_RESOURCE.name] = DEFAULT_TIER_RESOURCE
        snap.profiles[DEFAULT_ALLOW.name] = DEFAULT_ALLOW
        seen: set[tuple[str, str]] = set()
        for res in resources:
            if res.key in seen:
                raise ValidationError(res.kind, res.name, "metadata.name",
                                      "is defined twice")
            seen.add(res.key)
            snap._table(res)[res.name] = res
        for policy in [*snap.policies.values(), *snap.staged.values()]:
            if policy.spec.tier not in snap.tiers:
                raise ValidationError(policy.kind, policy.name, "spec.tier",
                                      f'tier "{policy.spec.tier}" does not exist')
        return snap

    def _table(self, res: Resource) -> dict[str, Resource]:
        tables: dict[type, Mapping[str, Resource]] = {
            Tier: self.tiers, GlobalNetworkPolicy: self.policies,
            StagedGlobalNetworkPolicy: self.staged,
            HostEndpoint: self.host_endpoints,
            GlobalNetworkSet: self.network_sets, Profile: self.profiles,
        }
        table = tables[type(res)]
        assert isinstance(table, dict), "only a Snapshot being built is filled"
        return table

    def resources(self) -> list[Resource]:
        """Every user resource (built-ins left out) in a stable order."""
        out: list[Resource] = []
        for table in (self.tiers, self.network_sets, self.profiles, self.host_endpoints,
                      self.policies, self.staged):
            out.extend(r for r in table.values()
                       if r is not DEFAULT_TIER_RESOURCE and r is not DEFAULT_ALLOW)
        return out

    def ordered_tiers(self) -> list[Tier]:
        return sorted(self.tiers.values(), key=lambda t: order_key(t.order, t.name))


def enforceable(resources: Mapping[tuple[str, str], Resource]
                ) -> tuple[Snapshot, dict[tuple[str, str], str]]:
    """The snapshot of `resources` (by kind and name) that agents enforce, and what is
    left out of it, a message each: a policy whose tier is not there, and an object the
    snapshot refuses. What the agents build from the store, and what a preview judges
    against."""
    kept = dict(resources)
    errors: dict[tuple[str, str], str] = {}
    tiers = {DEFAULT_TIER} | {r.name for r in kept.values() if isinstance(r, Tier)}
    for key, res in list(kept.items()):
        if isinstance(res, GlobalNetworkPolicy) and res.spec.tier not in tiers:
            errors[key] = (f'{res.kind} {res.name}: spec.tier: tier "{res.spec.tier}" '
                           "does not exist; the policy is left out")
            del kept[key]
    while True:
        try:
            return Snapshot.build(kept.values()), errors
        except ValidationError as e:   # not expected after the checks above; be safe
            key = (e.kind, e.name)
            if key not in kept:
                raise
            errors[key] = f"{e}; left out"
            del kept[key]
