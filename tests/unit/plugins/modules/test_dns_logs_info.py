"""The dns_logs_info module end to end in-process: options -> the request it makes ->
the result, with the HTTP request replaced (the real server: tests/integration)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    ApiError,
    BulkheadClient,
)
from ansible_collections.bulkhead.microseg.plugins.modules import dns_logs_info

URL = "https://bulkhead.example.com:7443"


@pytest.fixture
def requests(monkeypatch):
    made = []
    answer = {"dns": [{"qname": "api.example.com"}], "truncated": True}

    def request(self, method, path, body=None, query=None, raw=None):
        made.append((method, path, query))
        if query and query.get("qname") == "Bad":
            raise ApiError(400, "BadRequest", "qname: 'Bad' is not a lowercase DNS name")
        return answer

    monkeypatch.setattr(BulkheadClient, "request", request)
    return made


def run(capsys, **args):
    args.setdefault("server_url", URL)
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            dns_logs_info.main()
    return done.value.code, json.loads(capsys.readouterr().out)


def test_filters_go_to_the_server_as_it_names_them(requests, capsys):
    code, result = run(capsys, qname="*.example.com", rcode="NXDOMAIN", client="web-1",
                       node="node-1", since=1764950400)
    assert code == 0
    assert requests == [("GET", "/v1/dns", {
        "since": "1764950400", "qname": "*.example.com", "rcode": "NXDOMAIN",
        "client": "web-1", "node": "node-1", "limit": "1000"})]
    assert result["changed"] is False and result["truncated"] is True
    assert result["dns"] == [{"qname": "api.example.com"}]
    assert result["since"] == 1764950400.0 and result["until"] is None


def test_a_bad_time_fails_naming_the_option_before_any_request(requests, capsys):
    code, result = run(capsys, since="last tuesday")
    assert code == 1 and result["msg"].startswith("since: 'last tuesday' is not a time")
    assert requests == []


def test_the_servers_refusal_is_passed_on(requests, capsys):
    code, result = run(capsys, qname="Bad")
    assert code == 1 and result["msg"].startswith("qname: ")
    assert (result["status"], result["reason"]) == (400, "BadRequest")
