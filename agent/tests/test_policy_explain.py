"""bulkhead.policy.explain: the verdict and its trace as text."""

from __future__ import annotations

from bulkhead.policy.explain import explain_text
from tests.policyfixture import APP, DB, DB_ALLOW_DMZ, evaluator, tcp


def test_explain_text_reads_well() -> None:
    ev = evaluator(DB_ALLOW_DMZ)
    text = explain_text(ev, ev.evaluate(tcp(APP, DB, 5432)))
    assert text.splitlines()[0] == "flow 198.18.0.13 -> 198.18.0.12 TCP/5432"
    assert "verdict: DENIED" in text
    assert "ingress of db: Deny by the default action of tier default" in text
    assert 'not source selector zone == "dmz" selects host endpoint app' in text
