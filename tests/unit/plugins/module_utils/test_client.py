"""module_utils.client against a fake HTTPS server on 127.0.0.1: answers bulkhead-server
never gives (too slow, too large, a redirect) fail with the collection's error, naming
the URL and what was wrong."""

from __future__ import annotations

import time

import pytest

from ansible_collections.bulkhead.microseg.plugins.module_utils import client as client_mod
from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    AnswerRefused,
    BulkheadClient,
)


def test_a_dribbling_answer_is_bounded_by_the_whole_request_timeout(fake_server):
    """A byte every 0.2 s never trips a per-read timeout of 1 s; the request's deadline
    does."""
    fake_server.set("/v1/nodes", b'{"nodes": []}' + b" " * 200, dribble=0.2)
    started = time.monotonic()
    with pytest.raises(AnswerRefused, match=r"/v1/nodes: the answer did not arrive whole "
                                            r"within 1\.0 seconds \(request_timeout\)"):
        BulkheadClient(fake_server.url, ca_path=fake_server.ca, timeout=1.0).nodes()
    assert time.monotonic() - started < 3


def test_an_answer_larger_than_the_cap_is_refused(fake_server, monkeypatch):
    monkeypatch.setattr(client_mod, "MAX_ANSWER_BYTES", 1000)
    client = BulkheadClient(fake_server.url, ca_path=fake_server.ca)
    fake_server.set("/v1/snapshot", b'{"a": "%s"}' % (b"x" * 5000))
    with pytest.raises(AnswerRefused, match=r"https://127\.0\.0\.1:\d+/v1/snapshot: the answer "
                                            r"is 5009 bytes, more than the 1000"):
        client.snapshot()
    # Without Content-Length (read to the connection's end), counted as it comes.
    fake_server.set("/v1/snapshot", b'{"a": "%s"}' % (b"x" * 200000), headers={
        "Content-Type": "application/json", "Content-Length": "", "Connection": "close"})
    with pytest.raises(AnswerRefused, match=r"/v1/snapshot: the answer is more than 1000 "
                                            r"bytes \(MAX_ANSWER_BYTES\)"):
        client.snapshot()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_names_where_it_pointed(fake_server, status):
    """A 302 to plain http:// made resource_info report another server's data."""
    fake_server.set("/v1/resources/Tier", status=status,
                    headers={"Location": "http://127.0.0.1:9/v1/resources/Tier"})
    client = BulkheadClient(fake_server.url, ca_path=fake_server.ca)
    with pytest.raises(AnswerRefused, match=r"GET https://127\.0\.0\.1:\d+/v1/resources/Tier: "
                                            r"the server answered %d, a redirect to "
                                            r"http://127\.0\.0\.1:9/v1/resources/Tier: redirects "
                                            r"are not followed" % status):
        client.list("Tier")
    assert fake_server.requests == [("GET", "/v1/resources/Tier")]


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0])
def test_a_request_timeout_no_socket_takes_fails_naming_it(timeout):
    """nan and -1 failed with the socket's words ("Invalid value NaN (not a number)",
    "Timeout value out of range"), naming no option; inf with an OverflowError ("timestamp
    out of range for platform time_t") that was not caught at all."""
    client = BulkheadClient("https://127.0.0.1:9", timeout=timeout)
    with pytest.raises(client_mod.ConnectionSettingsError) as caught:
        client.nodes()
    assert str(caught.value) == f"request_timeout: {timeout}: give a number of seconds greater than 0"
