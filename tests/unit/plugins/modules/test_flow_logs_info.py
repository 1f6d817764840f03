"""The flow_logs_info module end to end in-process: options -> the request it makes ->
the result, with the HTTP request replaced (the real server: tests/integration)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    ApiError,
    BulkheadClient,
    ServerUnreachable,
)
from ansible_collections.bulkhead.microseg.plugins.modules import flow_logs_info

URL = "https://bulkhead.example.com:7443"


class Server:
    """Requests the module makes; `answer` what the server says, unless it `refuse`s."""

    def __init__(self):
        self.requests = []
        self.answer = {"flows": [], "truncated": False}
        self.respond = lambda: self.answer

    def refuse(self, error):
        def respond():
            raise error
        self.respond = respond

    def reply(self, method, path, query):
        self.requests.append((method, path, query))
        return self.respond()


@pytest.fixture
def server(monkeypatch):
    fake = Server()

    def request(self, method, path, body=None, query=None, raw=None):
        return fake.reply(method, path, query)

    monkeypatch.setattr(BulkheadClient, "request", request)
    return fake


def run(capsys, **args):
    args.setdefault("server_url", URL)
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            flow_logs_info.main()
    result = json.loads(capsys.readouterr().out)
    return done.value.code, result


def test_records(server, capsys):
    server.answer = {"flows": [{"dst_name": "db-1"}], "truncated": False}
    code, result = run(capsys, action="deny", selector="app == 'db'", staged_differs=True)
    assert code == 0
    assert server.requests == [("GET", "/v1/flows", {
        "action": "deny", "selector": "app == 'db'", "staged": "differs", "limit": "1000"})]
    assert result["changed"] is False and result["truncated"] is False
    assert result["flows"] == [{"dst_name": "db-1"}] and "top" not in result
    assert result["since"] is None and result["until"] is None


def test_top_sends_no_limit(server, capsys):
    server.answer = {"top": [{"bytes": 3}], "truncated": False}
    code, result = run(capsys, top=5, since=1764950400)
    assert code == 0
    assert server.requests == [("GET", "/v1/flows", {"since": "1764950400", "top": "5"})]
    assert result["top"] == [{"bytes": 3}] and "flows" not in result
    assert result["since"] == 1764950400.0


def test_check_mode_reads_as_well(server, capsys):
    code, result = run(capsys, _ansible_check_mode=True, node="web-1")
    assert code == 0 and result["changed"] is False and result["flows"] == []
    assert server.requests[0][2] == {"node": "web-1", "limit": "1000"}


def test_limit_with_top_is_refused(server, capsys):
    code, result = run(capsys, top=5, limit=10)
    assert code == 1 and result["msg"] == "parameters are mutually exclusive: limit|top"
    assert server.requests == []


def test_a_bad_time_fails_naming_the_option(server, capsys):
    code, result = run(capsys, until="tomorrow")
    assert code == 1 and result["msg"].startswith("until: 'tomorrow' is not a time: give ")
    assert server.requests == []


def test_the_servers_refusal_is_passed_on(server, capsys):
    server.refuse(ApiError(400, "BadRequest", "selector: unexpected end of input"))
    code, result = run(capsys, selector="app ==")
    assert code == 1
    assert (result["msg"], result["status"], result["reason"]) == \
        ("selector: unexpected end of input", 400, "BadRequest")


def test_an_unreachable_server_fails_with_its_url(server, capsys):
    server.refuse(ServerUnreachable(URL + ": nothing accepts connections"))
    code, result = run(capsys)
    assert code == 1 and result["msg"].startswith(URL + ": ")
