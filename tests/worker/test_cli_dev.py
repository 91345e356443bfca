"""``breakglass dev up | status | down`` end to end, and its refusals (nothing started)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.helpers import assert_eventually, fresh_id
from worker import devstack
from worker.cli import app
from worker.devstack import PROJECT_ROOT, ComponentState
from worker.settings import Settings
from worker.temporal_client import connect
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import RollbackInput, RollbackOutcome, RollbackReport
from workflows.shared import TASK_QUEUE, ExitCode

# The embedded stack's own processes (Temporal, sandbox, worker, supervisord): the full tier.
pytestmark = pytest.mark.servers

PORT_VARS = (
    "BREAKGLASS_DEV_TEMPORAL_PORT",
    "BREAKGLASS_DEV_UI_PORT",
    "BREAKGLASS_DEV_SANDBOX_PORT",
    "BREAKGLASS_DEV_SANDBOX_ADMIN_PORT",
)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a private stack: tmp state dir and non-default free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BREAKGLASS_")}
    env["BREAKGLASS_STATE_DIR"] = str(tmp_path / "state")
    env.update(zip(PORT_VARS, map(str, free_ports(len(PORT_VARS))), strict=True))
    env["BREAKGLASS_DEV_READY_TIMEOUT_S"] = "60"
    yield env
    # Whatever a test left running is stopped (the processes outlive the CLI by design).
    cli(env, "dev", "down")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(
        state_dir=Path(env["BREAKGLASS_STATE_DIR"]),
        dev_temporal_port=int(env["BREAKGLASS_DEV_TEMPORAL_PORT"]),
        dev_ui_port=int(env["BREAKGLASS_DEV_UI_PORT"]),
        dev_sandbox_port=int(env["BREAKGLASS_DEV_SANDBOX_PORT"]),
        dev_sandbox_admin_port=int(env["BREAKGLASS_DEV_SANDBOX_ADMIN_PORT"]),
        dev_ready_timeout_s=60,
    )


def status_json(env: dict[str, str]) -> dict[str, dict]:
    out = cli(env, "dev", "status", "--json")
    assert out.returncode == 0, out.stderr
    return {c["name"]: c for c in json.loads(out.stdout)["components"]}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_temporal_up_status_down(stack_env: dict[str, str]) -> None:
    ui_port = stack_env["BREAKGLASS_DEV_UI_PORT"]
    started = time.monotonic()
    out = cli(stack_env, "dev", "up", "--component", "temporal")
    up_seconds = time.monotonic() - started
    assert out.returncode == ExitCode.OK, out.stderr
    assert f"http://127.0.0.1:{ui_port}" in out.stdout
    assert "temporal  running" in out.stdout and "(started)" in out.stdout
    print(f"dev up (temporal) took {up_seconds:.2f}s")

    temporal = status_json(stack_env)["temporal"]
    assert temporal["state"] == "running"
    pid = temporal["pid"]
    assert pid_alive(pid)
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=10) as resp:
        assert resp.status == 200

    # Idempotent: a second up leaves the running server alone.
    again = cli(stack_env, "dev", "up", "-c", "temporal", "--json")
    assert again.returncode == ExitCode.OK, again.stderr
    second = {c["name"]: c for c in json.loads(again.stdout)["components"]}["temporal"]
    assert (second["pid"], second["started"]) == (pid, False)

    human = cli(stack_env, "dev", "status")
    assert f"UI: http://127.0.0.1:{ui_port}" in human.stdout

    down = cli(stack_env, "dev", "down")
    assert down.returncode == ExitCode.OK, down.stderr
    assert status_json(stack_env)["temporal"]["state"] == "stopped"
    assert not pid_alive(pid)


@pytest.mark.skipif(
    not (PROJECT_ROOT / "sandbox" / "__main__.py").exists()
    or not (PROJECT_ROOT / "worker" / "main.py").exists(),
    reason="sandbox/__main__.py or worker/main.py not written yet: full stack not testable",
)
def test_full_stack_up_status_down(stack_env: dict[str, str]) -> None:
    out = cli(stack_env, "dev", "up")
    assert out.returncode == ExitCode.OK, out.stderr
    comps = status_json(stack_env)
    assert {n: c["state"] for n, c in comps.items()} == {
        "temporal": "running",
        "sandbox": "running",
        "worker": "running",
    }
    state = Path(stack_env["BREAKGLASS_STATE_DIR"])
    assert (state / "sandbox" / "ready.json").exists()
    token = state / "sandbox" / "admin-token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.read_text().strip() not in out.stdout + json.dumps(comps)
    assert cli(stack_env, "dev", "down").returncode == ExitCode.OK
    assert {c["state"] for c in status_json(stack_env).values()} == {"stopped"}


async def test_kill_and_restart_temporal_keeps_workflows(stack_env: dict[str, str]) -> None:
    """The crash-test building blocks: SIGKILL the server, restart it on the same SQLite file."""
    settings = settings_of(stack_env)
    stack = await devstack.up(settings, only=["temporal"])
    assert stack.component("temporal").state is ComponentState.RUNNING
    client = await connect(devstack.dev_client_settings(settings))
    workflow_id = fresh_id("survivor")
    # No worker polls this queue: the workflow just waits, persisted in SQLite.
    await client.start_workflow("Nobody", id=workflow_id, task_queue=fresh_id("tq"))

    assert devstack.kill_component(settings, "temporal", signal.SIGKILL) is not None
    await assert_eventually(
        lambda: devstack.status(settings).component("temporal").state is ComponentState.STOPPED
    )
    restarted = await devstack.restart_component(settings, "temporal")
    assert restarted.state is ComponentState.RUNNING

    client = await connect(devstack.dev_client_settings(settings))
    desc = await client.get_workflow_handle(workflow_id).describe()
    assert desc.status is not None and desc.status.name == "RUNNING"
    await devstack.down(settings)
    assert devstack.status(settings).component("temporal").state is ComponentState.STOPPED


# --------------------------------------------------------------------------- refusals (CliRunner)

runner = CliRunner()


def invoke(env: dict[str, str], *args: str):
    clear = {k: None for k in os.environ if k.startswith("BREAKGLASS_")}
    return runner.invoke(app, list(args), env={**clear, **env})


@pytest.mark.parametrize("var", ["BREAKGLASS_DEV_TEMPORAL_PORT", "BREAKGLASS_DEV_UI_PORT"])
def test_busy_port_refuses_and_starts_nothing(stack_env: dict[str, str], var: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke({**stack_env, var: str(port)}, "dev", "up", "-c", "temporal")
    assert result.exit_code == ExitCode.BAD_INPUT
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert f"port {port}" in err and var in err and "nothing was started" in err
    assert not list(Path(stack_env["BREAKGLASS_STATE_DIR"]).glob("dev/*.pid"))


def test_missing_temporal_binary_is_a_clear_error(stack_env: dict[str, str]) -> None:
    result = invoke({**stack_env, "BREAKGLASS_TEMPORAL_CLI": "/nonexistent/temporal"}, "dev", "up")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "temporal CLI not found at /nonexistent/temporal (BREAKGLASS_TEMPORAL_CLI)" in (
        result.stderr
    )
    assert not list(Path(stack_env["BREAKGLASS_STATE_DIR"]).glob("dev/*.pid"))


def test_invalid_setting_names_the_variable(stack_env: dict[str, str]) -> None:
    result = invoke({**stack_env, "BREAKGLASS_DEV_TEMPORAL_PORT": "seven"}, "dev", "status")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "invalid setting BREAKGLASS_DEV_TEMPORAL_PORT" in result.stderr


def test_unknown_component(stack_env: dict[str, str]) -> None:
    result = invoke(stack_env, "dev", "up", "-c", "nope")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "unknown component 'nope'" in result.stderr


def test_status_of_a_stopped_stack(stack_env: dict[str, str]) -> None:
    result = invoke(stack_env, "dev", "status", "--json")
    assert result.exit_code == ExitCode.OK
    comps = {c["name"]: c for c in json.loads(result.stdout)["components"]}
    assert comps["temporal"]["state"] == "stopped"
    assert comps["temporal"]["log_file"].endswith("dev/temporal.log")


def test_help_documents_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for code in ExitCode:
        assert f"{int(code)} {code.name}" in result.stdout


def test_main_exits_through_os_exit_with_the_code(stack_env: dict[str, str]) -> None:
    out = cli({**stack_env, "BREAKGLASS_DEV_TEMPORAL_PORT": "0"}, "dev", "status")
    assert out.returncode == ExitCode.BAD_INPUT
    assert out.stderr.startswith("error: invalid setting BREAKGLASS_DEV_TEMPORAL_PORT")


# --------------------------------------------------------------------------- what the stack started


def is_below(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def read_pid(path: Path) -> int:
    return int(path.read_text())


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (supervisord's programs)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


async def test_down_stops_the_supervisord_and_strategy_the_stack_started_elsewhere(
    stack_env: dict[str, str], rollback_scenario: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: with a custom BREAKGLASS_STATE_DIR, ``dev down`` left the demo's
    supervisord and its strategy running. The demo's runbook keeps its target outside the
    state dir (``.breakglass/demo/target``, relative to where it runs); what marks that
    supervisord as the stack's is the process that started it (the demo, or the worker), whose
    environment names the state dir."""
    monkeypatch.setenv("BREAKGLASS_STATE_DIR", stack_env["BREAKGLASS_STATE_DIR"])
    async with rollback_scenario(deploy="  shadow_bake_s: 1\n") as s:
        assert not is_below(s.target.state_dir, Path(stack_env["BREAKGLASS_STATE_DIR"]))
        supervisord = read_pid(s.target.state_dir / "supervisord.pid")
        strategies = children_of(supervisord)
        assert pid_alive(supervisord) and strategies, "the scenario's strategy runs"

        down = cli(stack_env, "dev", "down")
        assert down.returncode == ExitCode.OK, down.stderr

        def all_gone() -> None:
            assert [p for p in [supervisord, *strategies] if pid_alive(p)] == []

        await assert_eventually(all_gone, timeout=30)


async def test_up_restarts_a_dead_temporal_under_a_living_worker(
    stack_env: dict[str, str],
) -> None:
    """``dev up`` waited for the living worker to be ready before starting the dead server it
    needs, and gave up. Now the server comes back on the same SQLite file and the worker,
    still the same process, polls it again and runs workflows."""
    settings = settings_of(stack_env)
    first = cli(stack_env, "dev", "up", "-c", "worker", "--json")
    assert first.returncode == ExitCode.OK, first.stderr
    worker_pid = status_json(stack_env)["worker"]["pid"]
    client = await connect(devstack.dev_client_settings(settings))
    survivor = fresh_id("survivor")
    await client.start_workflow("Nobody", id=survivor, task_queue=fresh_id("tq"))

    assert devstack.kill_component(settings, "temporal", signal.SIGKILL) is not None
    await assert_eventually(
        lambda: devstack.status(settings).component("temporal").state is ComponentState.STOPPED
    )
    assert pid_alive(worker_pid)

    started = time.monotonic()
    again = cli(stack_env, "dev", "up", "--json")
    assert again.returncode == ExitCode.OK, again.stderr
    print(f"dev up with a dead server under a living worker: {time.monotonic() - started:.1f}s")
    comps = {c["name"]: c for c in json.loads(again.stdout)["components"]}
    assert comps["temporal"]["state"] == "running" and comps["temporal"]["started"], comps
    assert (comps["worker"]["pid"], comps["worker"]["started"]) == (worker_pid, False), comps

    client = await connect(devstack.dev_client_settings(settings))
    desc = await client.get_workflow_handle(survivor).describe()  # the same SQLite file
    assert desc.status is not None and desc.status.name == "RUNNING"
    # The same worker process serves the restarted server: a rollback of a system nobody
    # knows runs to its end (a safe stop that says it stopped nothing).
    report = await client.execute_workflow(
        RollbackWorkflow.run,
        RollbackInput(
            strategy="nosuch", env=fresh_id("e")[:20].lower().replace("-", ""),
            reason="is the worker back?", requested_by="pytest",
        ),
        id=fresh_id("rollback"),
        task_queue=TASK_QUEUE,
        result_type=RollbackReport,
        execution_timeout=timedelta(seconds=60),
    )  # fmt: skip
    assert report.outcome is RollbackOutcome.SAFE_STOP and report.safe_stop is not None
    assert pid_alive(worker_pid)
