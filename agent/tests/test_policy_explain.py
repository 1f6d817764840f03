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


def test_neighbour_discovery_is_said_to_pass_before_policy_on_the_tables() -> None:
    """The evaluator decides ICMPv6 133-136 by the policies (as HNS does); the explanation
    says the nftables tables and Windows Firewall accept them before any policy."""
    from bulkhead.model import Snapshot, parse_resource
    from bulkhead.policy import Evaluator, Failsafes, Flow
    from bulkhead.policy.explain import explain_text

    docs = [{"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
             "metadata": {"name": "web", "labels": {"app": "web"}},
             "spec": {"node": "web-1", "interfaceName": "*", "expectedIPs": ["2001:2::11"]}}]
    evaluator = Evaluator(Snapshot.build(parse_resource(d) for d in docs), Failsafes.off())
    for icmp_type, noted in ((135, True), (136, True), (128, False)):
        flow = Flow.make("2001:2::10", "2001:2::11", "ICMPv6", icmp_type=icmp_type)
        text = explain_text(evaluator, evaluator.evaluate(flow))
        assert "verdict: DENIED" in text
        assert ("accept IPv6 neighbour discovery (ICMPv6 133-136) before any policy"
                in text) is noted, text
