"""The rollback saga end to end through the real parts: the Temporal dev server, an in-process
worker wired like ``worker.main``, supervisord running the sample strategy, its state database
(a SQLite file, or a fresh PostgreSQL database) and the sandbox exchange. The parts' own views
judge the result: the sandbox's admin state, supervisord, the strategy's /healthz and its
database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator

import psycopg
import pytest
from temporalio.client import Client

from sandbox.admin_client import SandboxAdmin
from tests.fixtures.rollback import (
    FAULTY,
    GOOD,
    HELD,
    HELD_QTY,
    RollbackScenario,
    Scenarios,
    activity_results,
    healthy,
)
from tests.fixtures.venues import assert_no_order_sent_twice
from tests.helpers import assert_eventually, fresh_id
from tests.worker.test_cli_kill import breakglass
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    RollbackInput,
    RollbackOutcome,
    RollbackReport,
    RollbackStep,
    rollback_workflow_id,
)
from workflows.shared import DeadManState, ExitCode, KillOutcome, KillScope, StepState
from workflows.snapshot_models import DatabaseKind, RestoreResult

pytestmark = pytest.mark.timeout(90)

Change = tuple[str, str | None, str, str, str]
PG_PASSWORD = "s3 cr'et&x%"
"""Quoting-hostile: a space, a quote and URI metacharacters."""
WATCH_INTERVAL_S = 0.05
"""The restore replaces the trading-state history with the snapshot's: the freeze's rows are only
seen by reading the database while the saga runs (stop, cancel and flatten take seconds)."""


@contextlib.asynccontextmanager
async def watching_state_changes(s: RollbackScenario) -> AsyncIterator[list[Change]]:
    """Every trading-state change the database held at some point during the block, in the
    order first seen (read-only polling: it never holds a lock a writer waits on for long)."""
    seen: dict[Change, None] = {}
    stop = asyncio.Event()

    async def watch() -> None:
        while True:
            # A read blocked by the restore's transaction, or a database being replaced: next.
            with contextlib.suppress(sqlite3.Error, psycopg.Error):
                seen.update(dict.fromkeys(await asyncio.to_thread(s.state_changes)))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL_S)

    changes: list[Change] = []
    task = asyncio.create_task(watch())
    try:
        yield changes
    finally:
        stop.set()
        await task
        changes.extend(seen)


@pytest.mark.parametrize(
    ("kind", "password"),
    [
        pytest.param(DatabaseKind.SQLITE, None, id="sqlite"),
        pytest.param(DatabaseKind.POSTGRES, None, id="postgres"),
        # The server trusts 127.0.0.1 and ignores it, but every part must carry it intact.
        pytest.param(DatabaseKind.POSTGRES, PG_PASSWORD, id="postgres-password-env"),
    ],
)
async def test_rollback_brings_back_the_previous_version_end_to_end(
    client: Client,
    sandbox_admin: SandboxAdmin,
    rollback_scenario: Scenarios,
    request: pytest.FixtureRequest,
    kind: DatabaseKind,
    password: str | None,
) -> None:
    pg_dsn = request.getfixturevalue("pg_database") if kind is DatabaseKind.POSTGRES else None
    async with rollback_scenario(pg_dsn=pg_dsn, pg_password=password) as s:
        assert s.snapshot is not None
        snapshot, target = s.snapshot, s.target
        assert snapshot.db_kind is kind
        # What 1.1.0 wrote while it ran: its run and its (rejected) orders.
        faulty_rows = await asyncio.to_thread(s.rows_of, FAULTY)
        assert faulty_rows["runs"] == 1 and faulty_rows["orders"] > 0, faulty_rows

        # ---- the rollback saga on an in-process worker
        async with watching_state_changes(s) as seen, s.worker(client) as worker:
            handle = await client.start_workflow(
                RollbackWorkflow.run,
                RollbackInput(
                    strategy="sample", env=s.env, reason="reject storm", requested_by="pytest"
                ),
                id=fresh_id("rollback"),
                task_queue=worker.task_queue,
            )
            report = await handle.result()

        timeline = "\n".join(f"{e.step.value} {e.state.value} {e.detail}" for e in report.timeline)
        assert report.outcome is RollbackOutcome.ROLLED_BACK, f"{report.error}\n{timeline}"
        assert password is None or password not in report.model_dump_json()
        assert (report.version_from, report.version_to) == (FAULTY, GOOD)
        assert report.snapshot_id == snapshot.id
        assert report.flatten == "flattened"

        # Supervisord and the strategy: only the previous version runs, and it is healthy.
        assert await target.running_versions() == [GOOD]
        assert await target.current() == GOOD
        await assert_eventually(lambda: healthy(target, GOOD), timeout=120)

        # The venue: every order alive before the rollback is gone, the position is closed
        # without ever changing sign; the flatten kill (policy auto: it cancels first, so one kill
        # does both) verified it on the venue.
        assert [(k.scope, k.outcome) for k in report.kills] == [
            (KillScope.FLATTEN, KillOutcome.VERIFIED)
        ]
        after = await sandbox_admin.state(s.api_key)
        assert [o for o in after.open_orders if o.order_id in s.orders_before] == []
        assert after.open_conditional_orders == []
        (held,) = [p for p in after.positions if p.symbol == HELD]
        assert held.qty == 0 and not held.flipped, held
        assert_no_order_sent_twice([after], prefix="bg")
        flattened = report.kills[-1].accounts[0]
        unified = "BTC/USDT:USDT"  # ccxt's name of HELD
        assert any(
            p.symbol == unified and p.quantity == HELD_QTY for p in flattened.positions_before
        ), flattened
        assert all(p.symbol != unified for p in flattened.positions_after), flattened
        # The strategy was stopped before the unwind: no dead-man countdowns to arm (or forget).
        assert flattened.dead_man is not None and flattened.dead_man.state is DeadManState.OFF
        # Before ACTIVE, database and venue were reconciled (the venue won) and agreed.
        assert report.reconcile is not None and report.reconcile.agreed, report.reconcile
        assert HELD not in report.reconcile.positions

        # The database: restored to the snapshot's content (the RESTORE step says so, and the
        # restore activity's result in history carries the whole checksum it verified).
        (restored,) = [
            e
            for e in report.timeline
            if e.step is RollbackStep.RESTORE and e.state is StepState.DONE
        ]
        assert restored.detail == f"content {snapshot.content_checksum[:12]} (restored)", timeline
        (restore,) = await activity_results(client, handle, "restore_state_db", RestoreResult)
        assert restore.content_checksum == snapshot.content_checksum, restore
        assert restore.changed and restore.content_checksum_before != snapshot.content_checksum
        # Nothing 1.1.0 wrote survived; 1.0.0 ran again on the restored state.
        assert await asyncio.to_thread(s.rows_of, FAULTY) == {"orders": 0, "runs": 0}
        runs = await asyncio.to_thread(s.query, "SELECT version FROM runs ORDER BY id")
        assert runs == [(GOOD,), (GOOD,)], runs

        # Trading state: REDUCING then HALTED before the stop, HALTED again after the restore
        # (which replaced that history with the snapshot's), ACTIVE once healthy. The timeline
        # and the database's own rows, as they were seen during the rollback and as they are.
        why = f"rollback {report.workflow_id}: reject storm"
        freezes = [
            e.detail
            for e in report.timeline
            if e.step is RollbackStep.FREEZE and e.state is StepState.DONE
        ]
        assert freezes == [
            f"ACTIVE -> REDUCING by pytest: {why}",
            f"REDUCING -> HALTED by pytest: {why}",
            f"ACTIVE -> HALTED by pytest: {why}",
            f"HALTED -> ACTIVE by pytest: {why}",
        ], timeline
        assert [c[1:] for c in seen if c[3] == "pytest"] == [
            ("ACTIVE", "REDUCING", "pytest", why),
            ("REDUCING", "HALTED", "pytest", why),
            ("ACTIVE", "HALTED", "pytest", why),
            ("HALTED", "ACTIVE", "pytest", why),
        ], seen
        history = [c[1:] for c in await asyncio.to_thread(s.state_changes)]
        assert history[-2:] == [
            ("ACTIVE", "HALTED", "pytest", why),
            ("HALTED", "ACTIVE", "pytest", why),
        ], history
        assert ("REDUCING", "HALTED", "pytest", why) not in history  # the snapshot's history
        print(timeline)


async def test_a_rollback_whose_plan_fails_still_halts_stops_and_cancels(
    client: Client, sandbox_admin: SandboxAdmin, rollback_scenario: Scenarios
) -> None:
    """The issue's case: the plan failed ("no snapshot of sample/demo at version 1.2.0"), the
    CLI printed ``safe-stop: None -> None`` and the worker logged STOPPED SAFELY while the
    strategy stayed ACTIVE with its version running. Without a plan, the runbook still names
    the system: its database is HALTED, its target stopped, its orders cancelled, and the
    report and the CLI say so; a system nobody can find is said to be stopped by nobody."""
    async with rollback_scenario() as s, s.worker(client) as worker:
        env = {
            **os.environ,
            "BREAKGLASS_TEMPORAL_ADDRESS": client.service_client.config.target_host,
            "BREAKGLASS_TASK_QUEUE": worker.task_queue,
            "BREAKGLASS_RUNBOOKS_DIR": str(s.runbooks),
            "COLUMNS": "200",
        }
        run = await breakglass(
            "rollback", "sample", "--env", s.env, "--to", "1.2.0", "--reason", "reject storm",
            "--yes", "--as", "pytest", env=env,
        )  # fmt: skip
        handle = client.get_workflow_handle(
            rollback_workflow_id("sample", s.env), result_type=RollbackReport
        )
        report = await handle.result()
        assert report.outcome is RollbackOutcome.SAFE_STOP, report
        assert report.failed_step is RollbackStep.PLAN
        assert f"no snapshot of sample/{s.env} at version 1.2.0" in report.error

        # The parts' own views: HALTED in its database, nothing running, no order left.
        (state,) = await asyncio.to_thread(s.query, "SELECT state FROM trading_state")
        assert state == ("HALTED",)
        assert await s.target.running_versions() == []
        after = await sandbox_admin.state(s.api_key)
        assert [o for o in after.open_orders if o.order_id in s.orders_before] == []

        # What the report and the operator are told.
        stop = report.safe_stop
        assert stop is not None and stop.found, report
        assert stop.halted is not None and stop.halted.endswith("-> HALTED"), stop
        assert stop.stopped_versions == [FAULTY], stop
        assert stop.orders_cancelled is not None, stop
        (cancel,) = [a for k in report.kills for a in k.accounts]
        assert cancel.dead_man is not None and cancel.dead_man.state is DeadManState.OFF, cancel
        assert run.code == ExitCode.UNVERIFIED, run.err
        assert "None" not in run.out, run.out
        last = run.out.strip().splitlines()[-1]
        assert last.startswith("safe-stop at plan:"), run.out
        assert f"stopped {FAULTY}" in last and "HALTED" in last, last

        # Nothing to find (started directly: the CLI refuses an unknown system up front).
        nobody = rollback_workflow_id("nosuch", s.env)
        await client.execute_workflow(
            RollbackWorkflow.run,
            RollbackInput(strategy="nosuch", env=s.env, reason="who?", requested_by="pytest"),
            id=nobody,
            task_queue=worker.task_queue,
        )
        status = await breakglass("status", nobody, env=env)
        assert "stopped nothing" in status.out and "None" not in status.out, status.out
        empty = await client.get_workflow_handle(nobody, result_type=RollbackReport).result()
        assert empty.safe_stop is not None and not empty.safe_stop.found, empty
