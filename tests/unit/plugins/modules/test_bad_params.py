"""Parameters no server call can take fail in the module, naming the parameter and what
is wrong, not with a Python traceback (OverflowError, TypeError, ...). Each fails before
any request, so no server is needed."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.modules import (
    agent_status,
    flow_logs_info,
    global_network_policy,
    host_endpoints,
    policy_preview,
    resource,
    tier,
)

URL = "https://127.0.0.1:9"

CASES = [
    (tier, {"name": "t", "order": "inf"}, "order: inf is not a number"),
    (tier, {"name": "t", "order": "nan"}, "order: nan is not a number"),
    (global_network_policy, {"name": "p", "tier": "default", "order": "-inf"},
     "order: -inf is not a number"),
    (global_network_policy, {"name": "p", "order": "nan"}, "order: nan is not a number"),
    (resource, {"definition": {"kind": "Tier", "metadata": {"name": 5}}},
     "document 1: metadata.name: 5 is not a string"),
    (resource, {"definition": {"kind": ["Tier"], "metadata": {"name": "t"}}},
     "document 1: kind: ['Tier'] is not a string"),
    (host_endpoints, {"owner": "site", "endpoints": [{"metadata": {"name": ["a"]}}]},
     "endpoints[0]: metadata.name: ['a'] is not a string"),
    (agent_status, {"wait_for_revision": 3, "timeout": "nan"},
     "timeout: nan is not a number of seconds a wait can end after"),
    (agent_status, {"wait_for_revision": 3, "timeout": "inf"},
     "timeout: inf is not a number of seconds a wait can end after"),
    (tier, {"name": "t", "wait": True, "wait_timeout": "nan"},
     "wait_timeout: nan is not a number of seconds a wait can end after"),
    (resource, {"definition": {"kind": "Tier", "metadata": {"name": "t"}}, "wait": True,
                "wait_timeout": "inf"},
     "wait_timeout: inf is not a number of seconds a wait can end after"),
    (flow_logs_info, {"since": 10 ** 400},
     "since: 'an integer of 401 digits' is not a time"),
    (policy_preview, {"until": -10 ** 400},
     "until: 'an integer of 401 digits' is not a time"),
]


@pytest.mark.parametrize("module, args, message", CASES,
                         ids=["%s-%d" % (c[0].__name__.rsplit(".", 1)[-1], i)
                              for i, c in enumerate(CASES)])
def test_a_bad_parameter_fails_naming_it(capsys, module, args, message):
    with patch_module_args(dict(server_url=URL, **args)):
        with pytest.raises(SystemExit) as done:
            module.main()
    result = json.loads(capsys.readouterr().out)
    assert done.value.code == 1, result
    assert result["msg"].startswith(message), result["msg"]


def test_a_whole_order_is_written_as_an_integer():
    class Fake:
        params = {"order": 100.0}
        order = tier.BulkheadModule.order
    assert Fake().order() == 100 and isinstance(Fake().order(), int)


@pytest.mark.parametrize("interval", ["-1", "0", "0.01", "nan", "inf"])
def test_agent_status_poll_interval_must_be_a_pause(capsys, interval):
    """-1 failed with "sleep length must be non-negative" (no option named), 0 polled the
    server in a tight loop."""
    with patch_module_args(dict(server_url=URL, wait_for_revision=3, poll_interval=interval)):
        with pytest.raises(SystemExit) as done:
            agent_status.main()
    result = json.loads(capsys.readouterr().out)
    assert done.value.code == 1
    assert result["msg"] == ("poll_interval: %s: give a number of seconds of at least 0.1 (each "
                             "poll is a request to the server)" % float(interval))
