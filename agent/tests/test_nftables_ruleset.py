"""bulkhead.dataplane.nftables.ruleset: structure, sameness and element changes of a
rendered table."""

from __future__ import annotations

from bulkhead.dataplane.nftables import render
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import DB_POLICY, base, snap


def test_a_label_change_moves_set_elements_only() -> None:
    before = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    after = render(calculate(snap(*base({"app": "cache"})), "n1", {}, Failsafes.off()))
    assert before.structure() == after.structure()
    assert after.same_structure(before) and not after.same(before)
    assert after.same(after) and not after.same_structure(render(calculate(
        snap(*base(), DB_POLICY | {"metadata": {"name": "db2"}}), "n1", {}, Failsafes.off())))
    added, removed = after.element_changes(before)
    assert added == [] and [e for _, e in removed] == ["198.18.0.11"]
    assert "delete element inet bulkhead s4_" in after.element_script(before)
