"""bulkhead.model.snapshot: tiers must exist and names be unique."""

from __future__ import annotations

import pytest

from bulkhead.model import (
    Snapshot,
    ValidationError,
    parse_resource,
)
from tests.modelfixture import doc, gnp


def test_snapshot_checks_tiers_and_duplicates() -> None:
    with pytest.raises(ValidationError) as err:
        Snapshot.build([parse_resource(gnp({"tier": "security"}, "security.p"))])
    assert str(err.value) == ('GlobalNetworkPolicy security.p: spec.tier: tier "security" '
                              "does not exist")
    with pytest.raises(ValidationError) as err:
        Snapshot.build([parse_resource(gnp({})), parse_resource(gnp({}))])
    assert str(err.value) == "GlobalNetworkPolicy p: metadata.name: is defined twice"
    tier = parse_resource(doc("Tier", "security", {"order": 1}))
    snap = Snapshot.build([tier, parse_resource(gnp({"tier": "security"}, "security.p"))])
    assert [t.name for t in snap.ordered_tiers()] == ["security", "default"]
    assert [r.name for r in snap.resources()] == ["security", "security.p"]
