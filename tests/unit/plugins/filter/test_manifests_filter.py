"""The manifests filter: text read as the modules and the server read manifests."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.bulkhead.microseg.plugins.filter.manifests import FilterModule

F = FilterModule().filters()


def test_a_port_range_stays_a_range_where_from_yaml_all_reads_base_60():
    """`20:21` is the range calicoctl reads; YAML 1.1 (from_yaml_all) makes it 1221."""
    text = ("kind: GlobalNetworkPolicy\nmetadata: {name: ftp}\n"
            "spec: {ingress: [{action: Allow, destination: {ports: [20:21, 80]}}]}\n---\n"
            "---\nkind: List\nitems: [{kind: Tier, metadata: {name: t}}]\n")
    docs = F["manifests"](text)
    assert docs[0]["spec"]["ingress"][0]["destination"]["ports"] == ["20:21", 80]
    assert [d["kind"] for d in docs] == ["GlobalNetworkPolicy", "Tier"]


def test_what_the_server_refuses_fails_naming_the_text():
    with pytest.raises(AnsibleFilterError, match="web.yaml: not valid YAML: duplicate key 'kind'"):
        F["manifests"]("kind: A\nkind: B\n", "web.yaml")
    with pytest.raises(AnsibleFilterError, match="expected YAML or JSON text, not dict"):
        F["manifests"]({"kind": "A"})
