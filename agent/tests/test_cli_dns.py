"""`bulkhead dns` against a real bulkhead-server process: filters as options, the table,
wide and JSON outputs, and --follow until Ctrl-C."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from bulkhead import pki
from bulkhead.cli.main import main
from bulkhead.client.flows import send_dns
from tests.test_cli_flows import as_viewer, following  # noqa: F401
from tests.test_server_dns import record
from tests.test_server_process import ServerProcess

NOW = round(time.time(), 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module, holding three DNS records web-1 sent."""
    tmp = tmp_path_factory.mktemp("dns-cli")
    pki.init_ca(tmp)
    pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
    process = ServerProcess(tmp, f"sqlite://{tmp}/store.db")
    try:
        process.start()
        send_dns(process.client("web-1", "agent"), [
            record(NOW - 50),
            record(NOW - 40, "www.example.org", answers=[
                "edge.cdn.example A 198.18.0.14", "www.example.org CNAME edge.cdn.example"]),
            record(NOW - 30, "gone.example", rcode="NXDOMAIN", answers=[], latency_count=0,
                   latency_mean_ms=0, latency_max_ms=0)])
        yield process
    finally:
        process.kill()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["dns", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def qnames(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    code, out, err = run(capsys, *argv, "-o", "json")
    assert code == 0, err
    return [r["qname"] for r in json.loads(out)["dns"]]


def test_the_table_and_the_filters(as_viewer: dict[str, str],  # noqa: F811
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert code == 0, err
    head, *rows = out.splitlines()
    assert head.split() == ["TIME", "(UTC)", "NODE", "CLIENT", "SERVER", "QUESTION", "RCODE",
                            "ADDRESSES", "COUNT", "LATENCY"]
    assert rows[0].split()[2:] == ["web-1", "web-1", "198.18.0.53", "api.example.com", "A",
                                   "NOERROR", "198.18.3.4", "2", "1.2", "ms", "(max", "1.5)"]
    assert rows[1].split()[8] == "198.18.0.14"            # the address behind the CNAME
    assert rows[2].split()[7:10] == ["NXDOMAIN", "-", "2"] and rows[2].endswith("-")
    assert qnames(capsys, "--qname", "*.example.org") == ["www.example.org"]
    assert qnames(capsys, "--rcode", "NXDOMAIN") == ["gone.example"]
    assert qnames(capsys, "--client", "db-1") == []
    assert qnames(capsys, "--limit", "1") == ["gone.example"]
    code, out, _ = run(capsys, "-o", "wide")
    assert "www.example.org CNAME edge.cdn.example" in out
    code, _, err = run(capsys, "--qname", "Bad Name")
    assert code != 0 and "qname" in err


def test_follow_prints_new_records_until_ctrl_c(as_viewer: dict[str, str],  # noqa: F811
                                                server: ServerProcess) -> None:
    with following("dns", "web-3", as_viewer) as (proc, out):
        agent = server.client("web-3", "agent")
        send_dns(agent, [record(time.time(), "new-1.example", node="web-3")])
        assert json.loads(out.read(1, 30)[0])["qname"] == "new-1.example"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        assert out.buffer + proc.stdout.read() == b""
