"""module_utils.flows: times as the module takes them, and the query sent to the server."""

from __future__ import annotations

import pytest

from ansible_collections.bulkhead.microseg.plugins.module_utils.flows import (
    flow_query,
    read_flows,
    unix_seconds,
    wire_seconds,
)

NOW = 1764950400.0   # 2025-12-05T16:00:00Z


@pytest.mark.parametrize("value, seconds", [
    (1764950000, 1764950000.0),
    (1764950000.25, 1764950000.25),
    ("1764950000", 1764950000.0),
    (" 1764950000.5 ", 1764950000.5),
    ("0", 0.0),
    ("90s", NOW - 90),
    ("30m", NOW - 1800),
    ("2h", NOW - 7200),
    ("1d", NOW - 86400),
    ("1w", NOW - 604800),
    ("1h30m", NOW - 5400),
    ("1.5h", NOW - 5400),
    ("0s", NOW),
    ("2025-12-05T15:00:00Z", NOW - 3600),
    ("2025-12-05T15:00:00z", NOW - 3600),
    ("2025-12-05T15:00:00", NOW - 3600),          # UTC unless it has an offset
    ("2025-12-05 15:00:00+00:00", NOW - 3600),
    ("2025-12-05T17:00:00+02:00", NOW - 3600),
    ("2025-12-05T15:00:00.5Z", NOW - 3599.5),
    ("2025-12-05", NOW - 16 * 3600),
])
def test_times(value, seconds):
    assert unix_seconds(value, "since", NOW) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("value", [
    "yesterday", "", "2x", "-2h", "h", "2h-", "-1", "nan", "inf", "1e999", "2025-13-01",
    True, None, [1], {"h": 2}, -5, float("nan"),
])
def test_what_is_not_a_time_is_refused_naming_the_option(value):
    with pytest.raises(ValueError) as err:
        unix_seconds(value, "until", NOW)
    text = str(err.value)
    assert text.startswith("until: %r is not a time: " % value)
    assert "unix seconds (1764950400)" in text and "(30m, 2h, 1d, 1h30m)" in text


def test_a_long_bad_value_is_cut_in_the_message():
    with pytest.raises(ValueError, match=r"^since: 'xxxxx+' is not a time") as err:
        unix_seconds("x" * 500, "since", NOW)
    assert len(str(err.value)) < 300


def test_wire_seconds_keep_microseconds_without_trailing_zeros():
    assert wire_seconds(1764950400.0) == "1764950400"
    assert wire_seconds(1764950400.5) == "1764950400.5"
    assert wire_seconds(1764950400.1234567) == "1764950400.123457"
    assert wire_seconds(0.0) == "0"


def params(**given):
    base = dict(since=None, until=None, node=None, reporter=None, action=None, policy=None,
                tier=None, staged_differs=False, selector=None, endpoint=None, limit=1000,
                top=None)
    base.update(given)
    return base


def test_defaults_send_only_the_limit():
    assert flow_query(params(), NOW) == ({"limit": "1000"}, None, None)


def test_every_filter_under_the_servers_name():
    query, since, until = flow_query(params(
        since="2h", until=NOW - 60, node="web-1", reporter="dst", action="deny",
        policy="security.db-in", tier="security", staged_differs=True,
        selector="app == 'db'", endpoint="db-1", limit=5), NOW)
    assert query == {"since": "1764943200", "until": "1764950340", "node": "web-1",
                     "reporter": "dst", "action": "deny", "policy": "security.db-in",
                     "tier": "security", "staged": "differs", "selector": "app == 'db'",
                     "endpoint": "db-1", "limit": "5"}
    assert (since, until) == (NOW - 7200, NOW - 60)


def test_top_replaces_the_limit():
    query = flow_query(params(top=3, since="1d"), NOW)[0]
    assert query == {"since": "1764864000", "top": "3"}


def test_values_the_server_checks_are_passed_as_given():
    # Empty names, out-of-range numbers: the server refuses them naming the parameter.
    query = flow_query(params(node="", limit=0), NOW)[0]
    assert query == {"node": "", "limit": "0"}


class FakeClient:
    def __init__(self, answer):
        self.answer, self.queries = answer, []

    def flows(self, query):
        self.queries.append(query)
        return self.answer


def test_read_flows_returns_records_and_the_range():
    record = {"dst_name": "db-1", "action": "deny"}
    client = FakeClient({"flows": [record], "truncated": True})
    result = read_flows(client, params(since="1h", action="deny"), NOW)
    assert client.queries == [{"since": "1764946800", "action": "deny", "limit": "1000"}]
    assert result == {"changed": False, "since": NOW - 3600, "until": None,
                      "truncated": True, "flows": [record]}


def test_read_flows_with_top_returns_top():
    row = {"src_name": "web-1", "dst_name": "db-1", "bytes": 3000}
    client = FakeClient({"top": [row], "truncated": False})
    result = read_flows(client, params(top=1), NOW)
    assert client.queries == [{"top": "1"}]
    assert result == {"changed": False, "since": None, "until": None, "truncated": False,
                      "top": [row]}


def test_a_bad_time_fails_before_any_request():
    client = FakeClient({"flows": [], "truncated": False})
    with pytest.raises(ValueError, match="^since: 'soon' is not a time"):
        read_flows(client, params(since="soon"), NOW)
    assert client.queries == []
