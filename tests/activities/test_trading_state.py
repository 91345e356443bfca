"""Freezing a strategy through its database, on real SQLite and PostgreSQL databases."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.trading_state import TradingStateActivities
from sandbox.strategy.state import get_trading_state, state_history
from workflows.rollback_models import TradingState, TradingStateRequest
from workflows.snapshot_models import DatabaseKind, DatabaseRef


async def freeze(database: DatabaseRef, state: TradingState, why: str = "rollback test"):
    request = TradingStateRequest(database=database, state=state, who="alice", why=why)
    return await ActivityEnvironment().run(TradingStateActivities().set_state, request)


async def test_sqlite_freeze_records_who_and_why_and_repeats_are_no_ops(tmp_path: Path) -> None:
    database = DatabaseRef(kind=DatabaseKind.SQLITE, path=tmp_path / "state.sqlite")
    first = await freeze(database, TradingState.REDUCING)
    second = await freeze(database, TradingState.HALTED)
    again = await freeze(database, TradingState.HALTED)
    assert first.changed and second.changed and not again.changed
    assert "already HALTED" in again.message
    record = get_trading_state(str(database.path))
    assert record.state == "HALTED" and record.changed_by == "alice"
    assert [(h[1], h[2]) for h in state_history(str(database.path))][-2:] == [
        ("ACTIVE", "REDUCING"),
        ("REDUCING", "HALTED"),
    ]


async def test_postgres_freeze(pg_database: str) -> None:
    database = DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=pg_database)
    change = await freeze(database, TradingState.HALTED)
    assert change.changed
    with psycopg.connect(pg_database) as conn:  # in that database, not a file named like it
        row = conn.execute("SELECT state, changed_by FROM trading_state").fetchone()
    assert row == ("HALTED", "alice")


async def test_missing_password_variable_is_a_clear_non_retryable_error() -> None:
    database = DatabaseRef(
        kind=DatabaseKind.POSTGRES,
        dsn="postgresql://strategy@127.0.0.1:5432/state",
        password_env="BG_TEST_SURELY_UNSET_PASSWORD",
    )
    with pytest.raises(ApplicationError, match="BG_TEST_SURELY_UNSET_PASSWORD is not set") as e:
        await freeze(database, TradingState.HALTED)
    assert e.value.non_retryable
