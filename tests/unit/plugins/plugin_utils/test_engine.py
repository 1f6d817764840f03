"""plugin_utils.engine: selectors, label values, expected IPs, HostEndpoint validation."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleError, AnsibleFilterError

from ansible_collections.bulkhead.microseg.plugins.plugin_utils import engine


def test_compile_selector_is_the_agents_engine():
    sel = engine.compile_selector("app=='db' && zone not in {'dmz'}", "t")
    assert sel.canonical == '(app == "db" && zone not in {"dmz"})'
    assert sel.matches({"app": "db"}) and not sel.matches({"app": "db", "zone": "dmz"})


@pytest.mark.parametrize("error", [AnsibleError, AnsibleFilterError])
def test_bad_selector_names_position_and_expectation(error):
    with pytest.raises(error) as caught:
        engine.compile_selector("zone == 'a' && app = 'b'", "plug", error)
    assert str(caught.value).startswith("plug: selector ")
    assert "at position 19: expected an operator" in str(caught.value)


def test_selector_must_be_text():
    with pytest.raises(AnsibleError, match="must be a string, not list"):
        engine.compile_selector(["a"], "plug")


@pytest.mark.parametrize("value, expected", [
    ("web", "web"), ("", None), (True, "true"), (False, "false"),
    (9092, "9092"), (1.5, "1.5"),
])
def test_label_value(value, expected):
    assert engine.label_value(value) == expected


def test_label_value_null_is_an_error():
    with pytest.raises(TypeError, match="a label value cannot be null"):
        engine.label_value(None)


def test_label_value_rejects_containers():
    with pytest.raises(TypeError, match="not list"):
        engine.label_value(["a"])
    with pytest.raises(TypeError, match="not mapping"):
        engine.label_value({"a": 1})


def test_labels_of_converts_scalars_and_checks_mapping():
    plain = {"a": "x"}
    assert engine.labels_of(plain, "w") is plain
    assert engine.labels_of({"a": 1, "b": None, "c": True}, "w") == {"a": "1", "c": "true"}
    assert engine.labels_of(None, "w") == {}
    with pytest.raises(AnsibleError, match="host x: labels must be a mapping .* not list"):
        engine.labels_of(["a"], "host x")
    with pytest.raises(AnsibleError, match="w: label a: .* not list"):
        engine.labels_of({"a": [1]}, "w")


@pytest.mark.parametrize("value, expected", [
    (None, []), ("", []), ("198.18.0.1", ["198.18.0.1"]),
    ("198.18.0.1, 2001:2::1", ["198.18.0.1", "2001:2::1"]),
    (["198.18.0.1", "", None], ["198.18.0.1"]),
])
def test_ip_list(value, expected):
    assert engine.ip_list(value) == expected


def test_ip_list_rejects_other_types():
    with pytest.raises(TypeError, match="must be strings, not integer"):
        engine.ip_list([1])
    with pytest.raises(TypeError, match="not mapping"):
        engine.ip_list({"a": "b"})


def test_is_ip():
    assert engine.is_ip("198.18.0.1") and engine.is_ip("2001:2::1")
    assert not engine.is_ip("web-1.example.com") and not engine.is_ip(None)


def test_host_endpoint_document():
    doc = engine.host_endpoint("web-1", "web-1", {"zone": "trusted"}, ["198.18.0.1"], "*")
    assert doc == {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                   "metadata": {"name": "web-1", "labels": {"zone": "trusted"}},
                   "spec": {"node": "web-1", "interfaceName": "*",
                            "expectedIPs": ["198.18.0.1"]}}
    assert "labels" not in engine.host_endpoint("a", "a", {}, ["198.18.0.1"])["metadata"]


@pytest.mark.parametrize("args, message", [
    (("web-1", "web-1", {"zone": "a b"}, ["198.18.0.1"]),
     'HostEndpoint web-1: metadata.labels: label zone="a b": value is not valid'),
    (("web-1", "web-1", {"-x": "a"}, ["198.18.0.1"]), 'label key "-x" is not valid'),
    (("web-1", "web-1", {}, ["198.18.0.300"]),
     'spec.expectedIPs[0]: "198.18.0.300" is not an IP address'),
    (("Web_1", "web-1", {}, ["198.18.0.1"]), '"Web_1" is not a valid name'),
    (("web-1", "web-1", {}, []), "needs interfaceName or expectedIPs"),
    (("web-1", "web-1", {}, [], "eth0 x"), '"eth0 x" is not an interface name'),
])
def test_host_endpoint_validation_says_what_is_wrong(args, message):
    with pytest.raises(ValueError) as caught:
        engine.host_endpoint(*args)
    assert message in str(caught.value)


def test_label_group_names_are_sanitised():
    from ansible.plugins.inventory import to_safe_group_name

    labels = {"zone": "trusted", "microseg.bulkhead.io/owner": "site-a"}
    assert engine.label_group_names(labels, "label", to_safe_group_name) == [
        "label_microseg_bulkhead_io_owner_site_a", "label_zone_trusted"]
    assert engine.label_group_names({"zone": "a"}, "", to_safe_group_name) == ["zone_a"]


def test_require_bulkhead_passes_when_installed():
    engine.require_bulkhead("t")  # the venv has bulkhead; the missing case is an integration test
