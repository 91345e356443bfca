"""The reconcile activity against the sandbox venue (unmodified ccxt) and a real strategy database
(SQLite file and PostgreSQL): the database is made to say what the venue says — positions and open
orders — the venue is read again to check, and a second run finds nothing to correct."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.reconcile import ReconcileActivities
from sandbox.admin_models import PositionSet, SeedOrder
from sandbox.prices import to_tick
from sandbox.strategy.state import Database, utcnow
from tests.fixtures.venues import MARKET_BY_SYMBOL, MakeRig
from workflows.rollback_models import ReconcileRequest
from workflows.snapshot_models import DatabaseKind, DatabaseRef

STALE_CID = "s1-restored-open"
"""Open in the restored database; long gone from the venue."""
LIVE_CID = "s1-live-on-venue"
"""Open on the venue; the restored database never heard of it."""


def restored_database(db: Database) -> None:
    """A database as a restore leaves it: the snapshot's positions and open orders."""
    db.init_schema()
    now = utcnow().isoformat()
    with db.transaction() as cur:
        for symbol, qty in (("BTCUSDT", "0.004"), ("ETHUSDT", "-1.5"), ("SOLUSDT", "0")):
            cur.execute(
                "INSERT INTO positions (symbol, qty, entry_price, mark_price, updated_at) "
                "VALUES (?, ?, '1', '1', ?)",
                (symbol, qty, now),
            )
        for cid, status in ((STALE_CID, "NEW"), ("s1-filled-long-ago", "FILLED")):
            cur.execute(
                "INSERT INTO orders (client_order_id, order_id, symbol, side, qty, price, "
                "reduce_only, status, filled, version, created_at, updated_at) "
                "VALUES (?, '1', 'BTCUSDT', 'buy', '0.001', '100', 0, ?, '0', '1.0.0', ?, ?)",
                (cid, status, now, now),
            )


def rows(db: Database) -> tuple[dict[str, Decimal], dict[str, str]]:
    with db.transaction() as cur:
        positions = {
            s: Decimal(q) for s, q in cur.execute("SELECT symbol, qty FROM positions").fetchall()
        }
        orders = {
            c: s for c, s in cur.execute("SELECT client_order_id, status FROM orders").fetchall()
        }
    return positions, orders


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.servers)])
def strategy_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[DatabaseRef, Database]:
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite"
        return DatabaseRef(kind=DatabaseKind.SQLITE, path=path), Database(path)
    dsn: str = request.getfixturevalue("pg_database")
    return DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=dsn), Database(dsn)


async def test_reconcile_makes_the_database_say_what_the_venue_says(
    make_rig: MakeRig, strategy_db: tuple[DatabaseRef, Database]
) -> None:
    ref, db = strategy_db
    restored_database(db)
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    # The venue: BTC flattened since the snapshot, a short ETH reduced, a SOL long opened, one
    # order resting that the restored database does not know.
    await rig.admin.set_positions(
        account.api_key,
        [
            PositionSet(symbol="ETHUSDT", qty=Decimal("-0.5")),
            PositionSet(symbol="SOLUSDT", qty=Decimal("12")),
        ],
    )
    price = (await rig.admin.prices()).prices["BTCUSDT"]
    await rig.admin.seed_orders(
        account.api_key,
        [
            SeedOrder(
                symbol="BTCUSDT",
                side="BUY",
                qty=Decimal("0.002"),
                price=to_tick(price * Decimal("0.9"), MARKET_BY_SYMBOL["BTCUSDT"].tick),
                client_order_id=LIVE_CID,
            )
        ],
    )
    acts = ReconcileActivities(rig.gateway())
    request = ReconcileRequest(
        database=ref, accounts=[account.futures], who="pytest", why="after restore"
    )
    try:
        result = await ActivityEnvironment().run(acts.reconcile, request)
        positions, orders = rows(db)
        assert positions == {
            "BTCUSDT": Decimal(0),
            "ETHUSDT": Decimal("-0.5"),
            "SOLUSDT": Decimal(12),
        }
        assert orders[STALE_CID] == "CANCELED"
        assert orders[LIVE_CID] == "NEW"
        assert orders["s1-filled-long-ago"] == "FILLED"  # history is left alone
        assert result.agreed, result.disagreements
        assert result.positions == {"ETHUSDT": "-0.5", "SOLUSDT": "12"}
        assert result.open_orders == [LIVE_CID]
        corrected = {(c.table, c.key): (c.database, c.venue) for c in result.corrections}
        assert corrected == {
            ("positions", "BTCUSDT"): ("0.004", "0"),
            ("positions", "ETHUSDT"): ("-1.5", "-0.5"),
            ("positions", "SOLUSDT"): ("0", "12"),
            ("orders", STALE_CID): ("NEW", "not open"),
            ("orders", LIVE_CID): ("unknown", "open"),
        }
        again = await ActivityEnvironment().run(acts.reconcile, request)
        assert again.corrections == [] and again.agreed
        # The venue was only read: nothing was sent to it.
        state = await rig.admin.state(account.api_key)
        assert [o.client_order_id for o in state.open_orders] == [LIVE_CID]
    finally:
        await acts.gateway.close()


async def test_what_still_differs_after_correcting_is_reported(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    """A fill racing the reconcile (the position moves between the correction and the second
    look) is reported as a disagreement, not papered over."""
    path = tmp_path / "state.sqlite"
    restored_database(Database(path))
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    acts = ReconcileActivities(rig.gateway())
    moved = False
    real_read = acts._read_venue

    async def read_then_fill(accounts: list[str]):  # type: ignore[no-untyped-def]
        nonlocal moved
        view = await real_read(accounts)
        if not moved:  # after the first look, before the check: a fill lands
            moved = True
            await rig.admin.set_positions(
                account.api_key, [PositionSet(symbol="BTCUSDT", qty=Decimal("0.001"))]
            )
        return view

    acts._read_venue = read_then_fill  # type: ignore[method-assign]
    try:
        result = await ActivityEnvironment().run(
            acts.reconcile,
            ReconcileRequest(
                database=DatabaseRef(kind=DatabaseKind.SQLITE, path=path),
                accounts=[account.futures],
                who="pytest",
                why="race",
            ),
        )
    finally:
        await acts.gateway.close()
    assert not result.agreed
    assert result.disagreements == ["position BTCUSDT: database 0, venue 0.001"]


async def test_a_database_without_the_strategy_tables_is_refused_for_good(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).close()
    rig = await make_rig(n=1, create=True)
    acts = ReconcileActivities(rig.gateway())
    try:
        with pytest.raises(ApplicationError) as refused:
            await ActivityEnvironment().run(
                acts.reconcile,
                ReconcileRequest(
                    database=DatabaseRef(kind=DatabaseKind.SQLITE, path=path),
                    accounts=[rig.accounts[0].futures],
                    who="pytest",
                    why="wrong runbook",
                ),
            )
    finally:
        await acts.gateway.close()
    assert refused.value.type == "BadDatabase" and refused.value.non_retryable
    assert "no positions/orders tables" in refused.value.message
