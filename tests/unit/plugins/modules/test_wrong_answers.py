"""Every module against a fake HTTPS server on 127.0.0.1 answering what bulkhead-server
never answers: each fails with a message naming the URL and what was wrong, never with
a Python traceback (KeyError, TypeError, ...)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.modules import (
    agent_status,
    dns_logs_info,
    export,
    flow_logs_info,
    history_info,
    host_endpoints,
    policy_preview,
    policy_promote,
    resource,
    resource_info,
    rollback,
    tier,
)

MODULES = [
    (agent_status, {}),
    (dns_logs_info, {}),
    (export, {}),
    (flow_logs_info, {}),
    (flow_logs_info, {"top": 3}),
    (history_info, {}),
    (host_endpoints, {"owner": "site", "endpoints": []}),
    (policy_preview, {}),
    (policy_promote, {"names": ["a"]}),
    (resource, {"definition": {"kind": "Tier", "metadata": {"name": "t"}, "spec": {}}}),
    (resource_info, {"kind": "Tier"}),
    (rollback, {"revision": 1}),
    (tier, {"name": "t", "order": 1}),
]
WRONG = [b"[1, 2, 3]", b'"hello"', b'{"results": [{"x": 1}]}', b"null",
         b'{"items": [{"kind": "Tier", "metadata": {"name": 5}}], "revision": 1}']


def run(capsys, module, **args):
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            module.main()
    return done.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("body", WRONG, ids=[b.decode() for b in WRONG])
@pytest.mark.parametrize("module, args", MODULES,
                         ids=["%s%s" % (m.__name__.rsplit(".", 1)[-1], "-top" if "top" in a else "")
                              for m, a in MODULES])
def test_a_wrong_shape_fails_naming_the_url(fake_server, capsys, module, args, body):
    fake_server.default.body = body
    code, result = run(capsys, module, server_url=fake_server.url, ca_path=fake_server.ca,
                       **args)
    assert code == 1, result
    assert result["msg"].startswith(("GET " + fake_server.url, "POST " + fake_server.url)), \
        result["msg"]
    assert ": not an answer bulkhead-server gives: the answer" in result["msg"]


def test_an_answer_that_is_not_json_names_the_url(fake_server, capsys):
    fake_server.default.body = b"<html>hello</html>"
    code, result = run(capsys, resource_info, server_url=fake_server.url,
                       ca_path=fake_server.ca, kind="Tier")
    assert code == 1
    assert result["msg"] == ("GET %s/v1/resources/Tier: the answer is not JSON (Expecting value: "
                             "line 1 column 1 (char 0)): b'<html>hello</html>'" % fake_server.url)


def test_the_message_says_where_in_the_answer(fake_server, capsys):
    fake_server.set("/v1/resources/Tier", b'{"items": [{"kind": "Tier", "metadata": {"name": 5}}]}')
    code, result = run(capsys, resource_info, server_url=fake_server.url,
                       ca_path=fake_server.ca, kind="Tier")
    assert code == 1
    assert result["msg"] == ("GET %s/v1/resources/Tier: not an answer bulkhead-server gives: "
                             "the answer.items[0].metadata.name: expected a string, found an "
                             "integer" % fake_server.url)
