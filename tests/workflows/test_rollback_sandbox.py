"""The rollback saga end to end through the real parts: the Temporal dev server, an in-process
worker wired like ``worker.main``, supervisord running the sample strategy, its state database
(a SQLite file, or a fresh PostgreSQL database) and the sandbox exchange. The parts' own views
judge the result: the sandbox's admin state, supervisord, the strategy's /healthz and its
database."""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.helpers import fresh_id
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import RollbackInput, RollbackOutcome, RollbackStep
from workflows.shared import KillOutcome, KillScope, StepState
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
        await healthy(target, GOOD)

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
