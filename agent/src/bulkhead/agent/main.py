"""`bulkhead-agent`: the node agent's command line.

    bulkhead-agent [--config FILE] [flags]      the daemon (SIGTERM/SIGINT stop it; the
                                                ruleset stays in the kernel)
    bulkhead-agent --once                       fetch, enforce, report status, exit
    bulkhead-agent --dry-run [--offline]        print the ruleset and the diff against the
                                                kernel; change nothing
    bulkhead-agent --flush-dns-cache            forget the learned DNS names (saved cache
                                                and the kernel's domain sets); a running
                                                agent does the same on SIGUSR1
    bulkhead-agent --release                    remove what the stopped agent set in the
                                                dataplane (an uninstall); refused while
                                                the agent runs (its lock, agent/lock.py)
    bulkhead-agent service install|remove|start|stop|run|debug [--config FILE]
                                                the Windows service (agent/win_service.py;
                                                `debug` runs it in the console anywhere)

Exit codes: 0 done; 1 the apply failed or the server refused; 2 bad configuration or
usage; 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from bulkhead.agent import lock
from bulkhead.agent.config import (
    DEFAULT_CONFIG,
    FLAGS,
    HNS,
    NFTABLES,
    WINDOWS_FIREWALL,
    AgentConfig,
    ConfigError,
    load_config,
)
from bulkhead.agent.daemon import Agent, AgentError
from bulkhead.agent.enforcer import EnforceError, Enforcer
from bulkhead.agent.http import HttpError
from bulkhead.agent.memory import limit_arenas
from bulkhead.agent.sync import SyncError
from bulkhead.logs import setup_logging

EnforcerFactory = Callable[[AgentConfig], Enforcer]


def default_enforcer(config: AgentConfig) -> Enforcer:
    """The enforcer `dataplane` names: nftables (Linux), or Windows Firewall / HNS."""
    if config.dataplane in (WINDOWS_FIREWALL, HNS):
        return windows_enforcer(config)
    assert config.dataplane == NFTABLES
    return nftables_enforcer(config)


def windows_enforcer(config: AgentConfig) -> Enforcer:
    """Windows Firewall rules on the host (agent/win_enforcer.py), or HNS ACLs on the
    host's HNS endpoints (agent/hns_enforcer.py)."""
    if config.dataplane == HNS:
        return hns_enforcer(config)
    try:
        from bulkhead.agent.win_enforcer import (  # type: ignore[import-not-found,unused-ignore]
            WindowsFirewallEnforcer,
        )
    except ImportError as e:
        raise AgentError(f"the Windows Firewall enforcer is not available: {e}") from None
    enforcer: Enforcer = WindowsFirewallEnforcer(config.node, config.failsafes,
                                                 default_mode=config.enforcement)
    return enforcer


def hns_enforcer(config: AgentConfig) -> Enforcer:
    """HNS ACLs through the Host Compute Network API (computenetwork.dll, loaded here:
    off Windows the agent stops at once, "HCN is only on Windows")."""
    from bulkhead.agent import hcn
    from bulkhead.agent.hns_enforcer import HnsEnforcer

    try:
        api = hcn.ComputeNetwork()
    except hcn.HcnError as e:
        raise AgentError(f"dataplane hns: {e}") from None
    enforcer: Enforcer = HnsEnforcer(config.node, config.failsafes, hcn=api,
                                     default_mode=config.enforcement,
                                     state_dir=config.state_dir)
    return enforcer


def nftables_enforcer(config: AgentConfig) -> Enforcer:
    """The Linux dataplane: nftables, in a table of the agent's own."""
    try:
        from bulkhead.agent.nft_enforcer import (  # type: ignore[import-not-found,unused-ignore]
            NftablesEnforcer,
        )
    except ImportError as e:
        raise AgentError(f"the nftables enforcer is not available: {e}") from None
    from bulkhead.agent.dns import snooping
    from bulkhead.dataplane.nftables.render import FlowLogging

    flows = config.flow_logs
    logged = FlowLogging(flows.inbound_group, flows.outbound_group) if flows else None
    enforcer: Enforcer = NftablesEnforcer(
        config.node, config.failsafes, flow_logs=logged, default_mode=config.enforcement,
        dns=snooping(config.dns) if config.dns is not None else None)
    return enforcer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bulkhead-agent", description="The Bulkhead node agent: pulls policy from "
        "bulkhead-server and enforces it on this host.")
    p.add_argument("--config", type=Path,
                   help=f"YAML config (default {DEFAULT_CONFIG} if it exists)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="fetch the snapshot, enforce it, report status and exit")
    mode.add_argument("--dry-run", action="store_true",
                      help="print the ruleset and its diff against the kernel; change nothing")
    mode.add_argument("--flush-dns-cache", action="store_true",
                      help="forget the DNS names learned (the saved cache and the kernel's "
                      "domain sets) and exit; send SIGUSR1 to a running agent instead")
    mode.add_argument("--release", action="store_true",
                      help="remove what the agent set in the dataplane and exit, as an "
                      "uninstall does (a stopped agent keeps it: fail static): nftables, "
                      "its table; hns, its ACLs on the HNS endpoints it set; stop the "
                      "agent first")
    p.add_argument("--offline", action="store_true",
                   help="with --dry-run: use the cached policy, not the server")
    helps = {
        "server": "https://HOST:PORT of bulkhead-server", "node": "this node's name "
        "(default: the hostname)", "ca": "CA certificate file", "cert": "client "
        "certificate file", "key": "client key file", "state_dir": "where the cache lives "
        "(default /var/lib/bulkhead-agent)", "failsafe_inbound": "comma-separated, e.g. "
        "tcp:22,udp:68 (\"\" for none)", "failsafe_outbound": "comma-separated, e.g. "
        "udp:53,tcp:7443", "log_level": "debug, info, warning, error",
        "metrics_listen": "HOST:PORT for /metrics (default 127.0.0.1:9473; \"\" turns it "
        "off)", "drift_interval": "seconds between drift checks (default 30)",
        "status_interval": "seconds between status reports (default 60)",
        "heartbeat_interval": "seconds between the server's heartbeats (default 10)",
        "enforcement": "enforce (default) or observe: the mode of endpoints without the "
        "microseg.bulkhead.io/enforcement label",
        "dataplane": "nftables (the default on Linux), windows-firewall (the default on "
        "Windows) or hns"}
    for attr, flag in FLAGS.items():
        p.add_argument(flag, dest=attr, metavar="VALUE", help=helps[attr])
    return p


def _error(message: str, code: int) -> int:
    print(f"bulkhead-agent: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, *,
         make_enforcer: EnforcerFactory | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["service"]:
        from bulkhead.agent.win_service import command

        return command(argv[1:], make_enforcer=make_enforcer or default_enforcer)
    args = _parser().parse_args(argv)
    if args.offline and not args.dry_run:
        return _error("--offline goes with --dry-run", 2)
    path: Path | None = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    try:
        config = load_config(path, {attr: getattr(args, attr) for attr in FLAGS})
    except ConfigError as e:
        return _error(str(e), 2)
    setup_logging(config.log_level)
    if args.flush_dns_cache:
        return _flush_dns(config)
    if args.release:
        return _release(config, make_enforcer or default_enforcer)
    limit_arenas()          # before any thread starts (see bulkhead.agent.memory)
    try:
        agent = Agent(config, (make_enforcer or default_enforcer)(config))
        if args.dry_run:
            return _dry_run(agent, args.offline)
        if args.once:
            revision = asyncio.run(agent.once())
            print(f"applied revision {revision}")
            return 0
        asyncio.run(_daemon(agent))
        return 0
    except ConfigError as e:
        return _error(str(e), 2)
    except AgentError as e:
        return _error(str(e), 1)
    except SyncError as e:
        return _error(f"{config.server}: {e}", 1)
    except (HttpError, OSError, TimeoutError) as e:
        return _error(f"cannot reach {config.server}: {e or type(e).__name__}", 3)


def _dry_run(agent: Agent, offline: bool) -> int:
    revision, text, diff = asyncio.run(agent.dry_run(offline))
    source = "the cache" if offline else agent.config.server
    out = sys.stdout
    out.write(f"# bulkhead-agent --dry-run: node {agent.config.node}, revision {revision} "
              f"from {source}; nothing was changed\n")
    out.write(text if text.endswith("\n") or not text else text + "\n")
    out.write("# diff against the kernel:\n")
    if diff.strip():
        out.write(diff if diff.endswith("\n") else diff + "\n")
    else:
        out.write("# (none: the kernel holds this ruleset)\n")
    for message in agent.object_errors:
        print(f"bulkhead-agent: {message}", file=sys.stderr)
    return 0


def _flush_dns(config: AgentConfig) -> int:
    """The stopped agent's DNS names: the saved cache removed, the domain sets emptied."""
    from bulkhead.agent.dns import flush_saved

    try:
        names, sets = flush_saved(Path(config.state_dir))
    except (OSError, ValueError) as e:
        return _error(f"flushing the DNS cache: {e}", 1)
    print(f"forgot {names} DNS names; emptied {sets} domain sets")
    return 0


def _release(config: AgentConfig, make_enforcer: EnforcerFactory) -> int:
    """`--release`: the enforcer's objects removed from the dataplane, each named."""
    if config.dataplane == WINDOWS_FIREWALL:
        return _error("--release: dataplane windows-firewall: remove the agent's rule "
                      "group instead (Get-NetFirewallRule -Group bulkhead | "
                      "Remove-NetFirewallRule), as the agent role does", 2)
    try:   # a running agent would put back what is removed here
        held = lock.take(config.state_dir, create=False)
    except lock.Held as e:
        return _error(f"--release: {e}: stop the agent first", 1)
    except OSError as e:
        return _error(f"--release: cannot take {Path(config.state_dir) / lock.LOCK_FILE}: "
                      f"{e.strerror or e}", 1)
    try:
        enforcer = make_enforcer(config)
        release = getattr(enforcer, "release", None)
        if release is None:
            return _error(f"--release: dataplane {config.dataplane}: not offered", 2)
        released, warnings = release()
    except AgentError as e:
        return _error(str(e), 1)
    except EnforceError as e:
        return _error(f"--release: {e}", 1)
    finally:
        if held is not None:
            held.close()
    for message in warnings:
        print(f"bulkhead-agent: {message}", file=sys.stderr)
    for name in released:
        print(f"released {name}")
    if not released:
        print(f"nothing to release (dataplane {config.dataplane})")
    return 0


async def _daemon(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    flushes: set[asyncio.Task[int]] = set()

    def flush() -> None:
        task = asyncio.ensure_future(agent.flush_dns())
        flushes.add(task)
        task.add_done_callback(flushes.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
        loop.add_signal_handler(signal.SIGUSR1, flush)
    await agent.run(stop)


if __name__ == "__main__":
    sys.exit(main())
