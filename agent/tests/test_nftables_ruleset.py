"""bulkhead.dataplane.nftables.ruleset: structure, sameness and element changes of a
rendered table."""

from __future__ import annotations

import re

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


def test_set_element_timeouts_are_written_in_units_nft_reads() -> None:
    """nft refuses one unit's number from about 10^8 on (`100000000ms`, `2147483647s`):
    a timeout is written in days, hours, minutes, seconds and milliseconds, and reads back
    to the same milliseconds."""
    from bulkhead.dataplane.nftables.ruleset import timeout_text
    units = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}

    def back(text: str) -> int:
        parts = re.findall(r"(\d+)(ms|d|h|m|s)", text)
        assert "".join(n + u for n, u in parts) == text
        return sum(int(n) * units[u] for n, u in parts)

    assert timeout_text(0) == "0ms" and timeout_text(1500) == "1s500ms"
    assert timeout_text(172_800_000) == "2d"
    assert timeout_text((2**31 - 1) * 1000) == "24855d3h14m7s"
    for ms in (1, 999, 60_001, 99_999_999, 100_000_000, 172_800_001, (2**31 - 1) * 1000 + 7):
        text = timeout_text(ms)
        assert back(text) == ms, (ms, text)
        assert all(len(n) <= 5 for n, _ in re.findall(r"(\d+)(ms|d|h|m|s)", text))
