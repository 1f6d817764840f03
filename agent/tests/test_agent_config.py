"""bulkhead.agent.config: a bad key or flag names itself and exits 2; the docs list every
key and flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead.agent import main as agent_main
from bulkhead.agent.config import FLAGS, KEYS, load_config
from tests.agentfixture import Recorder, restore_logging  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize(("content", "argv", "message"), [
    ({"bogus": 1}, [], "bogus: unknown key (known: server, node,"),
    ({"failsafeInbound": ["tcp:22", "tcp:99999"]}, [],
     "failsafeInbound[1]: failsafe port 'tcp:99999': '99999' is not a port"),
    ({"failsafeOutbound": 53}, [], "failsafeOutbound: must be a list of protocol:port"),
    ({"driftInterval": "soon"}, [], "driftInterval: must be a number of seconds"),
    ({"statusInterval": -1}, [], "statusInterval: -1: must be more than 0 seconds"),
    ({"server": "http://bulkhead:7443"}, [], "server: 'http://bulkhead:7443': expected https"),
    ({"metricsListen": "localhost"}, [], "metricsListen: 'localhost': expected HOST:PORT"),
    ({"logLevel": "loud"}, [], "logLevel: 'loud': expected one of debug"),
    ({"node": "web 1"}, [], "node: 'web 1': a node name is one word"),
    ({"flowLogs": True}, [], "flowLogs: must be a mapping (enabled: true"),
    ({"flowLogs": {"enabled": "yes"}}, [], "flowLogs.enabled: must be true or false"),
    ({"flowLogs": {"enabled": True, "flush": 3}}, [], "flowLogs.flush: unknown key"),
    ({"flowLogs": {"enabled": True, "flushInterval": 0.5}}, [],
     "flowLogs.flushInterval: 0.5: must be 1 to 3600 s"),
    ({"flowLogs": {"enabled": True, "inboundGroup": 70000}}, [],
     "flowLogs.inboundGroup: 70000: must be an integer from 0 to 65535"),
    ({"flowLogs": {"enabled": True, "conntrackEvents": "yes"}}, [],
     "flowLogs.conntrackEvents: must be true or false"),
    ({"flowLogs": {"enabled": True, "inboundGroup": 2}}, [],
     "flowLogs.outboundGroup: must differ from inboundGroup"),
    ("[1, 2]", [], "must be a mapping of keys to values"),
    ("a: [", [], "not YAML"),
    (b"node: web-\xff1\n", [], "not UTF-8 text (byte 10)"),
    ({}, ["--failsafe-inbound", "tcp:22,tcpx:1"], "--failsafe-inbound[1]: failsafe port"),
    ({}, ["--heartbeat-interval", "0"], "--heartbeat-interval: '0': must be more than 0"),
    ({}, ["--offline"], "--offline goes with --dry-run"),
    ({"enforcement": "audit"}, [], "enforcement: 'audit': expected enforce or observe"),
    ({}, ["--enforcement", "off"], "--enforcement: 'off': expected enforce or observe"),
])
def test_bad_config_names_the_key_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, argv: list[str],
        message: str) -> None:
    conf = tmp_path / "agent.yaml"
    if isinstance(content, bytes):
        conf.write_bytes(content)
    else:
        conf.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    rc = agent_main.main(["--config", str(conf), *argv], make_enforcer=lambda _: Recorder())
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.startswith("bulkhead-agent: ")



def test_docs_list_every_config_key_and_flag() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in doc, key
    for flag in FLAGS.values():
        assert f"`{flag}`" in doc, flag


def test_flow_logs_settings_are_read(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"flowLogs": {"enabled": True, "flushInterval": 5,
                                                 "spoolBytes": 2 << 20,
                                                 "conntrackEvents": True}}))
    settings = load_config(conf).flow_logs
    assert settings is not None and settings.conntrack_events
    assert (settings.flush_interval, settings.spool_bytes, settings.inbound_group) == \
        (5.0, 2 << 20, 1)
    conf.write_text(yaml.safe_dump({"flowLogs": {"enabled": False, "flushInterval": 5}}))
    assert load_config(conf).flow_logs is None
    assert load_config(None).flow_logs is None
