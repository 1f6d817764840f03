"""The selector filters, called as Jinja calls them."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.bulkhead.microseg.plugins.filter.selector import FilterModule

F = FilterModule().filters()


def test_every_filter_is_exported():
    assert sorted(F) == ["selector_canonical", "selector_from_labels", "selector_match",
                         "selector_reject", "selector_select"]


@pytest.mark.parametrize("labels, selector, expected", [
    ({"zone": "trusted", "app": "kafka"}, "zone == 'trusted' && app in {'kafka'}", True),
    ({"zone": "dmz"}, "zone == 'trusted'", False),
    ({}, "zone != 'trusted'", True),
    ({}, "zone not in {'a'}", True),
    ({"port": 9092}, "port == '9092'", True),
    ({"name": "web-01"}, "name starts with 'web' && name ends with '01'", True),
    (None, "all()", True),
])
def test_selector_match(labels, selector, expected):
    assert F["selector_match"](labels, selector) is expected


def test_selector_match_errors():
    with pytest.raises(AnsibleFilterError, match="at position 14: expected a label key"):
        F["selector_match"]({}, "zone == 'a' &&")
    with pytest.raises(AnsibleFilterError, match="labels must be a mapping"):
        F["selector_match"]("zone=a", "all()")


def test_selector_canonical():
    assert F["selector_canonical"]("app=='x'") == F["selector_canonical"]('app == "x"')
    assert F["selector_canonical"]("!has( a )") == "!has(a)"


HEPS = [
    {"kind": "HostEndpoint", "metadata": {"name": "a", "labels": {"zone": "trusted"}}},
    {"kind": "HostEndpoint", "metadata": {"name": "b", "labels": {"zone": "dmz"}}},
    {"kind": "HostEndpoint", "metadata": {"name": "c"}},
]


def test_select_and_reject_resources():
    assert [d["metadata"]["name"] for d in F["selector_select"](HEPS, "zone == 'trusted'")] == ["a"]
    assert [d["metadata"]["name"] for d in F["selector_reject"](HEPS, "zone == 'trusted'")] == [
        "b", "c"]
    assert F["selector_select"](HEPS, "!has(zone)") == [HEPS[2]]


def test_select_host_variables_and_plain_labels_and_attribute():
    hostvars = [{"inventory_hostname": "h1", "bulkhead_labels": {"app": "db"}, "app": "web"},
                {"inventory_hostname": "h2", "bulkhead_labels": {"app": "web"}}]
    assert F["selector_select"](hostvars, "app == 'db'") == [hostvars[0]]
    plain = [{"zone": "a", "n": 1}, {"zone": "b"}]
    assert F["selector_select"](plain, "zone == 'a'") == [plain[0]]
    nested = [{"x": {"l": {"t": "db"}}}, {"x": {}}, {}]
    assert F["selector_select"](nested, "t == 'db'", "x.l") == [nested[0]]


def test_select_errors_name_the_item():
    with pytest.raises(AnsibleFilterError, match="selector_select: expected a list, not string"):
        F["selector_select"]("abc", "all()")
    with pytest.raises(AnsibleFilterError, match="selector_select: item 1: expected a mapping"):
        F["selector_select"]([{}, "x"], "all()")
    with pytest.raises(AnsibleFilterError, match="item 0: metadata.labels: labels must be"):
        F["selector_select"]([{"kind": "HostEndpoint", "metadata": {"labels": "x"}}], "all()")


def test_selector_from_labels_round_trips():
    built = F["selector_from_labels"]({"zone": "trusted", "app": "kafka_2.13", "n": 3})
    assert built == '(app == "kafka_2.13" && n == "3" && zone == "trusted")'
    assert F["selector_match"]({"zone": "trusted", "app": "kafka_2.13", "n": "3"}, built)
    assert not F["selector_match"]({"zone": "trusted", "app": "kafka_2.13"}, built)
    assert F["selector_from_labels"]({}) == "all()"
    assert F["selector_from_labels"]({"e": ""}) == 'e == ""'


def test_selector_from_labels_errors():
    with pytest.raises(AnsibleFilterError, match="value is not valid"):
        F["selector_from_labels"]({"a": "'\""})
    with pytest.raises(AnsibleFilterError, match="label a: .* not list"):
        F["selector_from_labels"]({"a": ["x"]})


@pytest.mark.parametrize("labels, message", [
    ({"app == 'web' || all() || x": "y"},
     "label key \"app == 'web' || all() || x\" is not valid"),
    ({"app": "web", "zone)": "a"}, 'label key "zone)" is not valid'),
    ({"-app": "web"}, 'label key "-app" is not valid'),
    ({"bad prefix/app": "web"}, 'label key "bad prefix/app": prefix'),
    ({"app": "web' || all() || 'x"}, "label app=\"web' || all() || 'x\": value is not valid"),
    ({"app": "a" * 64}, "value is not valid"),
])
def test_selector_from_labels_refuses_what_is_not_a_label(labels, message):
    """A key is written into the selector as it is: `app == 'web' || all() || x` as a key
    widened the selector to every endpoint."""
    with pytest.raises(AnsibleFilterError, match="^selector_from_labels: ") as e:
        F["selector_from_labels"](labels)
    assert message in str(e.value)


def test_selector_from_labels_takes_calico_labels():
    assert F["selector_from_labels"]({"microseg.bulkhead.io/managed-by": "site", "a_b.c": "",
                                      "App-1": "v1.2_x"}) == \
        '(App-1 == "v1.2_x" && a_b.c == "" && microseg.bulkhead.io/managed-by == "site")'


def test_plain_labels_with_numbers_and_booleans_are_read_as_selector_match_reads_them():
    """selector_match found {pci: true} with pci == 'true', selector_select dropped its
    non-string values and missed it (and selector_reject kept a PCI host as outside)."""
    plain = [{"pci": True, "app": "web"}, {"app": "db", "port": 5432, "ratio": 0.5},
             {"app": "cache", "tags": ["a"], "more": {"x": "y"}, "none": None}]
    assert F["selector_match"](plain[0], "pci == 'true'") is True
    assert F["selector_select"](plain, "pci == 'true'") == [plain[0]]
    assert F["selector_reject"](plain, "pci == 'true'") == plain[1:]
    assert F["selector_select"](plain, "port == '5432' && ratio == '0.5'") == [plain[1]]
    # Lists, mappings and nulls are no labels.
    assert F["selector_select"](plain, "has(tags) || has(more) || has(none)") == []


@pytest.mark.parametrize("labels", [{"app": None}, {"app": None, "zone": "trusted"}])
def test_selector_from_labels_refuses_a_null_value(labels):
    """A null value was dropped as selector_match drops it: {app: null} (an undefined
    variable with default(none)) gave all(), and {app: null, zone: trusted} selected the
    whole zone - a policy selector wider than the labels asked for."""
    with pytest.raises(AnsibleFilterError, match="^selector_from_labels: label app: .*null"):
        F["selector_from_labels"](labels)


def test_label_keys_that_are_not_strings_are_read_as_the_modules_store_them():
    """YAML reads `1: a` with an integer key, which the modules and the endpoints plugin
    store as the label "1": selector_match did not find it, and selector_from_labels
    failed with Python's own AttributeError (a single key) or TypeError (mixed keys)."""
    assert F["selector_match"]({1: "a"}, "1 == 'a'") is True
    assert F["selector_select"]([{"bulkhead_labels": {7: "x"}}], "7 == 'x'") == [
        {"bulkhead_labels": {7: "x"}}]
    assert F["selector_from_labels"]({1: "a"}) == '1 == "a"'
    assert F["selector_from_labels"]({1: "a", "b": "c"}) == '(1 == "a" && b == "c")'
