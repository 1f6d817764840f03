"""bulkhead-agent as a Windows service, on pywin32's service framework.

    bulkhead-agent service install [--config FILE] [--startup auto|delayed|manual]
    bulkhead-agent service remove | start | stop
    bulkhead-agent service run   [--config FILE]    what the service control manager (SCM)
                                                    starts; not for a console
    bulkhead-agent service debug [--config FILE]    the service in the console, Ctrl+C
                                                    stops it as the SCM would (any OS)

Why pywin32 and not WinSW or NSSM (docs/windows.md#the-service): the stop request reaches
Python itself (`SvcStop`), so it sets the daemon's stop event and the agent ends as it does
on SIGTERM on Linux, leaving its rules in place (fail static); a wrapper would send a
console Ctrl+C or kill the process. pywin32 is a pip dependency (Windows only) under the
PSF licence, so there is no extra binary to fetch, verify and update.

The service is hosted by the `python.exe` of a dedicated CPython install, not by a venv's
(on Windows a venv's `python.exe` is a redirector that starts the base interpreter as a
child process, bpo-35797) and not by pywin32's `pythonservice.exe` (which does not find a
venv's packages: pywin32 issue #1450). pywin32's own source says python.exe can host a
service directly (PythonService.cpp): `servicemanager.PrepareToHostSingle` and
`StartServiceCtrlDispatcher`, which `run` calls.

What runs here, without Windows: `ServiceCore` (start, the stop request from another
thread, the stop-pending reports while the agent winds down, the exit codes) and the
command line's parsing; the SCM is the `Scm` protocol, given to the core. The pywin32
classes at the bottom are defined only on Windows and were not run (docs/windows.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from bulkhead.agent.config import DEFAULT_CONFIG, PATHS, AgentConfig, ConfigError, load_config
from bulkhead.agent.daemon import Agent, AgentError
from bulkhead.agent.enforcer import Enforcer
from bulkhead.agent.sync import SyncError
from bulkhead.logs import JsonFormatter, setup_logging

SERVICE_NAME = "bulkhead-agent"
DISPLAY_NAME = "Bulkhead agent"
DESCRIPTION = ("Enforces the policy of bulkhead-server on this host (Windows Firewall). "
               "Stopping it leaves the rules in place.")
# Exit codes, as bulkhead-agent's: 1 the agent failed, 2 bad configuration.
FAILED, BAD_CONFIG = 1, 2
STOP_HINT = 10.0      # seconds the SCM is told to wait between two stop-pending reports
STOP_REPORT = 5.0     # seconds between those reports while the agent winds down
STOP_LIMIT = 120.0    # after this long stopping, the reports end (the SCM then gives up)
LOG_BYTES = 10 << 20  # the service's log file: rotated at 10 MiB, 5 kept
LOG_FILES = 5

log = logging.getLogger("bulkhead.agent")
EnforcerFactory = Callable[[AgentConfig], Enforcer]


class Scm(Protocol):
    """The service control manager as the service sees it: the states it is told and the
    event log. On Windows, `_PywinScm` over pywin32; in the console, `ConsoleScm`."""

    def running(self) -> None: ...
    def stop_pending(self, wait_hint: float) -> None: ...   # seconds until the next report
    def event(self, level: str, message: str) -> None: ...  # "info" | "warning" | "error"


class ServiceCore:
    """The service without Windows: load the config, start the agent's daemon, stop it
    when `stop()` is called (from the SCM's control thread), say so to the SCM, and give
    the exit code (0, FAILED, BAD_CONFIG). The daemon never removes the rules it applied
    (fail static), also not on stop."""

    def __init__(self, scm: Scm, config_path: Path | None, make_enforcer: EnforcerFactory,
                 *, setup_logging: Callable[[AgentConfig], object] | None = None,
                 stop_report: float = STOP_REPORT, stop_limit: float = STOP_LIMIT) -> None:
        self.scm = scm
        self.config_path = config_path
        self.make_enforcer = make_enforcer
        self.setup_logging = setup_logging   # None: as the caller set it up
        self.stop_report, self.stop_limit = stop_report, stop_limit
        self.config: AgentConfig | None = None
        self._lock = threading.Lock()
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._done = threading.Event()

    def run(self) -> int:
        """Until stopped (0) or failed; the reason of a failure is in the event log."""
        try:
            return self._run()
        finally:
            self._end()

    def _run(self) -> int:
        path = self.config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        try:
            config = self.config = load_config(path)
        except ConfigError as e:
            return self._failed(BAD_CONFIG, f"bad configuration: {e}")
        if self.setup_logging is not None:
            try:
                self.setup_logging(config)
            except OSError as e:
                return self._failed(BAD_CONFIG, f"cannot write the log file: {e}")
        try:
            agent = Agent(config, self.make_enforcer(config))
        except (ConfigError, AgentError) as e:
            return self._failed(BAD_CONFIG if isinstance(e, ConfigError) else FAILED, str(e))
        try:
            asyncio.run(self._daemon(agent))
        except ConfigError as e:   # a certificate file that cannot be read
            return self._failed(BAD_CONFIG, str(e))
        except (AgentError, SyncError) as e:
            return self._failed(FAILED, str(e))
        except Exception as e:   # the daemon's loops re-raise what ended them
            log.exception("the agent failed")
            return self._failed(FAILED, f"internal error: {e!r}")
        self._end()
        self.scm.event("info", f"{SERVICE_NAME} stopped; the rules it applied stay in "
                       f"place (revision {agent.applied_revision})")
        return 0

    async def _daemon(self, agent: Agent) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), stop
            if self._stop_requested:
                stop.set()
        self.scm.running()
        try:
            await agent.run(stop)
        finally:
            with self._lock:
                self._loop = self._stop = None

    def stop(self) -> None:
        """The SCM's stop (or shutdown) request, from its control thread: returns at once;
        the daemon winds down (its loops cancelled, an apply under way finished) while
        stop-pending is reported every `stop_report` seconds, up to `stop_limit`."""
        with self._lock:
            if self._stop_requested or self._done.is_set():
                return
            self._stop_requested = True
            loop, stop = self._loop, self._stop
            self.scm.stop_pending(STOP_HINT)
        if loop is not None and stop is not None:
            # RuntimeError: the loop closed meanwhile, the daemon has ended
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        threading.Thread(target=self._report_stopping, name="stop-pending",
                         daemon=True).start()

    def _report_stopping(self) -> None:
        deadline = time.monotonic() + self.stop_limit
        while not self._done.wait(self.stop_report) and time.monotonic() < deadline:
            # The wait may have timed out just before the end: looked at again under the
            # lock `_end` takes, so no report follows the service's last word.
            with self._lock:
                if self._done.is_set():
                    return
                self.scm.stop_pending(STOP_HINT)

    def _end(self) -> None:
        """No stop-pending report from here on (one under way is finished first): the
        service's last word (an event) follows, then the SCM reports it stopped."""
        with self._lock:
            self._done.set()

    def _failed(self, code: int, message: str) -> int:
        self._end()
        log.error(message)
        self.scm.event("error", f"{SERVICE_NAME} stopped (exit {code}): {message}")
        return code


def file_logging(config: AgentConfig, log_dir: str = PATHS.log_dir) -> Path | None:
    """JSON lines into LOG_DIR/agent.log (rotated, bounded) where the platform has a log
    directory (Windows: a service has no stderr); None elsewhere."""
    if not log_dir:
        return None
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.log"
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES,
                                                   backupCount=LOG_FILES, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    return path


class ConsoleScm:
    """`service debug`: the SCM's states and events printed on stderr."""

    def running(self) -> None:
        print(f"{SERVICE_NAME}: running (Ctrl+C stops it as the SCM would)", file=sys.stderr)

    def stop_pending(self, wait_hint: float) -> None:
        print(f"{SERVICE_NAME}: stopping", file=sys.stderr)

    def event(self, level: str, message: str) -> None:
        print(f"{SERVICE_NAME}: {level}: {message}", file=sys.stderr)


def service_command_line(python: str, config: str) -> str:
    """The command line the SCM starts (the service's ImagePath): the dedicated Python
    runs this module's `service run` with the config file. The role writes the same."""
    return subprocess.list2cmdline([python, "-m", "bulkhead.agent.main", "service", "run",
                                    "--config", config])


def hosting_problem(prefix: str, base_prefix: str) -> str | None:
    """Why this Python cannot host the service, or None (see the module's doc)."""
    if Path(prefix) != Path(base_prefix):
        return (f"{prefix} is a venv: its python.exe starts the base interpreter as a child, "
                "which the SCM does not wait for; install bulkhead-microseg into a "
                "dedicated Python (the agent role does) and run its bulkhead-agent")
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bulkhead-agent service",
                                description="bulkhead-agent as a Windows service.")
    p.add_argument("action", choices=("install", "remove", "start", "stop", "run", "debug"))
    p.add_argument("--config", type=Path,
                   help=f"YAML config (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--startup", choices=("auto", "delayed", "manual"), default="auto",
                   help="with install: how the service starts (default auto)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="with start and stop: how long to wait for the state (default 60)")
    return p


def command(argv: list[str], *, make_enforcer: EnforcerFactory) -> int:
    """`bulkhead-agent service ...`: exit 0, 1 (failed), 2 (bad usage or configuration)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.action == "debug":
        return _debug(args.config, make_enforcer)
    if sys.platform != "win32":
        print(f"bulkhead-agent: service {args.action}: needs Windows (`service debug` runs "
              "the service in the console here)", file=sys.stderr)
        return BAD_CONFIG
    return _windows(args, make_enforcer)  # pragma: no cover (Windows only)


def _debug(config: Path | None, make_enforcer: EnforcerFactory) -> int:
    """The service in this console; Ctrl+C (SIGINT) is the SCM's stop request."""
    import signal

    core = ServiceCore(ConsoleScm(), config, make_enforcer,
                       setup_logging=lambda c: setup_logging(c.log_level))
    previous = signal.signal(signal.SIGINT, lambda *_: core.stop())
    try:
        return core.run()
    finally:
        signal.signal(signal.SIGINT, previous)


if sys.platform == "win32":  # pragma: no cover (not run here: no Windows)
    import servicemanager
    import win32service
    import win32serviceutil
    import winerror

    class _PywinScm:
        """The real SCM, through the framework instance's status handle."""

        def __init__(self, service: win32serviceutil.ServiceFramework) -> None:
            self.service = service

        def running(self) -> None:
            self.service.ReportServiceStatus(win32service.SERVICE_RUNNING)

        def stop_pending(self, wait_hint: float) -> None:
            self.service.ReportServiceStatus(win32service.SERVICE_STOP_PENDING,
                                             waitHint=int(wait_hint * 1000))

        def event(self, level: str, message: str) -> None:
            write = {"info": servicemanager.LogInfoMsg, "warning": servicemanager.LogWarningMsg,
                     "error": servicemanager.LogErrorMsg}[level]
            write(message)

    class ServiceFailed(Exception):
        """Raised out of SvcRun: pywin32 then reports SERVICE_STOPPED with
        ERROR_SERVICE_SPECIFIC_ERROR, which the SCM's recovery actions act on (the
        service is created with FailureActionsOnNonCrashFailures)."""

    class AgentService(win32serviceutil.ServiceFramework):
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION
        config_path: Path | None = None
        make_enforcer: EnforcerFactory | None = None

        def __init__(self, args: list[str]) -> None:
            super().__init__(args)
            factory = type(self).make_enforcer
            assert factory is not None
            self.core = ServiceCore(_PywinScm(self), type(self).config_path, factory,
                                    setup_logging=file_logging)

        def SvcRun(self) -> None:  # pywin32's names
            # Not the framework's SvcRun, which reports RUNNING before anything started:
            # the core reports it once the daemon's loop runs.
            code = self.core.run()
            if code:
                raise ServiceFailed(f"{SERVICE_NAME} exited {code} (see the event log and "
                                    f"{PATHS.log_dir}\\agent.log)")

        def SvcStop(self) -> None:
            self.core.stop()

        def SvcShutdown(self) -> None:  # Windows shuts down: the rules stay
            self.core.stop()

    def _windows(args: argparse.Namespace, make_enforcer: EnforcerFactory) -> int:
        config = str(args.config or DEFAULT_CONFIG)
        try:
            if args.action == "run":
                AgentService.config_path = args.config
                AgentService.make_enforcer = make_enforcer
                servicemanager.Initialize(SERVICE_NAME, None)
                servicemanager.PrepareToHostSingle(AgentService)
                servicemanager.StartServiceCtrlDispatcher()  # type: ignore[no-untyped-call]
                return 0
            if args.action == "install":
                problem = hosting_problem(sys.prefix, sys.base_prefix)
                if problem:
                    print(f"bulkhead-agent: service install: {problem}", file=sys.stderr)
                    return BAD_CONFIG
                _install(service_command_line(sys.executable, config), args.startup)
            elif args.action == "remove":
                win32serviceutil.RemoveService(SERVICE_NAME)
            elif args.action == "start":
                win32serviceutil.StartService(SERVICE_NAME)
                win32serviceutil.WaitForServiceStatus(
                    SERVICE_NAME, win32service.SERVICE_RUNNING, int(args.wait))
            elif args.action == "stop":
                win32serviceutil.StopService(SERVICE_NAME)
                win32serviceutil.WaitForServiceStatus(
                    SERVICE_NAME, win32service.SERVICE_STOPPED, int(args.wait))
        except win32service.error as e:
            if e.winerror == winerror.ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
                print("bulkhead-agent: service run is for the SCM; use service debug in a "
                      "console", file=sys.stderr)
                return BAD_CONFIG
            print(f"bulkhead-agent: service {args.action}: {e.strerror} ({e.winerror})",
                  file=sys.stderr)
            return FAILED
        print(f"bulkhead-agent: service {args.action}: done")
        return 0

    def _install(command_line: str, startup: str) -> None:
        start = win32service.SERVICE_DEMAND_START if startup == "manual" \
            else win32service.SERVICE_AUTO_START
        scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
        try:
            handle = win32service.CreateService(
                scm, SERVICE_NAME, DISPLAY_NAME, win32service.SERVICE_ALL_ACCESS,
                win32service.SERVICE_WIN32_OWN_PROCESS, start,
                win32service.SERVICE_ERROR_NORMAL, command_line, None, False, None, None, None)
            try:
                win32service.ChangeServiceConfig2(
                    handle, win32service.SERVICE_CONFIG_DESCRIPTION, DESCRIPTION)
                if startup == "delayed":
                    win32service.ChangeServiceConfig2(
                        handle, win32service.SERVICE_CONFIG_DELAYED_AUTO_START_INFO, True)
                # Restart after 5 s, three times; the count resets after a day.
                restart = (win32service.SC_ACTION_RESTART, 5000)
                win32service.ChangeServiceConfig2(
                    handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS,
                    {"ResetPeriod": 86400, "RebootMsg": None, "Command": None,
                     "Actions": (restart, restart, restart)})
                win32service.ChangeServiceConfig2(
                    handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True)
            finally:
                win32service.CloseServiceHandle(handle)
        finally:
            win32service.CloseServiceHandle(scm)
else:
    def _windows(args: argparse.Namespace, make_enforcer: EnforcerFactory) -> int:
        raise AssertionError("Windows only")
