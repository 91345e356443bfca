"""The strategy's database and its trading state (ACTIVE / REDUCING / HALTED).

The strategy re-reads the state from here every loop, so an operator or an activity freezes it by
writing the database: ``set_trading_state(db, TradingState.HALTED, who, why)``. ``db`` is a SQLite
path or a ``postgresql://`` DSN (psycopg 3). Every change records who, when and why; setting the
current state again changes nothing and says so.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class TradingState(StrEnum):
    ACTIVE = "ACTIVE"
    """Quote both sides within the position caps."""
    REDUCING = "REDUCING"
    """Only reduce-only orders; resting entry orders are cancelled."""
    HALTED = "HALTED"
    """No orders at all; resting orders are cancelled."""


class TradingStateRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    state: TradingState
    changed_by: str
    changed_at: datetime
    reason: str


class StateChange(BaseModel):
    """Answer of :func:`set_trading_state`: ``changed=False`` when the state already held."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    changed: bool
    previous: TradingStateRecord
    current: TradingStateRecord
    message: str


DbRef = str | os.PathLike[str]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS trading_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL, changed_by TEXT NOT NULL, changed_at TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trading_state_changes (
    id {serial}, at TEXT NOT NULL, from_state TEXT, to_state TEXT NOT NULL,
    who TEXT NOT NULL, why TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    client_order_id TEXT PRIMARY KEY, order_id TEXT, symbol TEXT NOT NULL, side TEXT NOT NULL,
    qty TEXT NOT NULL, price TEXT, reduce_only INTEGER NOT NULL, status TEXT NOT NULL,
    filled TEXT NOT NULL, version TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_open ON orders (status)
    WHERE status IN ('NEW', 'PARTIALLY_FILLED');
CREATE TABLE IF NOT EXISTS fills (
    id {serial}, client_order_id TEXT NOT NULL, symbol TEXT NOT NULL, side TEXT NOT NULL,
    qty TEXT NOT NULL, price TEXT NOT NULL, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    symbol TEXT PRIMARY KEY, qty TEXT NOT NULL, entry_price TEXT NOT NULL, mark_price TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pnl (
    id INTEGER PRIMARY KEY CHECK (id = 1), total TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pnl_cash (
    id INTEGER PRIMARY KEY CHECK (id = 1), cash TEXT NOT NULL, fills_through BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id {serial}, version TEXT NOT NULL, pid INTEGER NOT NULL, started_at TEXT NOT NULL
);
"""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Database:
    """One SQLite file or PostgreSQL database; a fresh connection per transaction.

    A connection per transaction keeps "DB reachable" honest for the health check and lets the
    database restart under a running strategy. SQL is written with ``?`` placeholders.
    """

    def __init__(self, ref: DbRef) -> None:
        text = os.fspath(ref)
        # A URI or a libpq key=value conninfo ("host=… dbname=…"): never mistake one for a path.
        self.is_postgres = text.startswith(("postgresql://", "postgres://")) or (
            "=" in text and any(k in text for k in ("dbname=", "host=", "user="))
        )
        self.ref = text

    def __repr__(self) -> str:
        # A DSN may carry a password: show only the backend.
        return f"Database({'postgresql' if self.is_postgres else self.ref!r})"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        if self.is_postgres:
            import psycopg  # only the PostgreSQL path needs the driver

            with psycopg.connect(self.ref, connect_timeout=3) as conn, conn.cursor() as cur:
                yield _Cursor(cur, postgres=True)
            return
        Path(self.ref).parent.mkdir(parents=True, exist_ok=True)
        lite = sqlite3.connect(self.ref, timeout=5, isolation_level=None)
        try:
            lite.execute("PRAGMA journal_mode=WAL")
            lite.execute("BEGIN IMMEDIATE")
            try:
                yield _Cursor(lite.cursor(), postgres=False)
            except BaseException:
                lite.execute("ROLLBACK")
                raise
            lite.execute("COMMIT")
        finally:
            lite.close()

    def init_schema(self) -> None:
        serial = "BIGSERIAL PRIMARY KEY" if self.is_postgres else "INTEGER PRIMARY KEY"
        with self.transaction() as cur:
            for statement in _SCHEMA.format(serial=serial).split(";"):
                if statement.strip():
                    cur.execute(statement)
            now = utcnow().isoformat()
            cur.execute(
                "INSERT INTO trading_state (id, state, changed_by, changed_at, reason) "
                "VALUES (1, ?, 'strategy', ?, 'initial state') ON CONFLICT (id) DO NOTHING",
                (TradingState.ACTIVE.value, now),
            )


class _Cursor:
    """The little both drivers share, with ``?`` placeholders for both."""

    def __init__(self, cur: Any, *, postgres: bool) -> None:
        self._cur = cur
        self._postgres = postgres

    def execute(self, sql: str, params: Sequence[object] = ()) -> _Cursor:
        if self._postgres:
            sql = sql.replace("?", "%s")
        self._cur.execute(sql, tuple(params))
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cur.fetchone()
        return tuple(row) if row is not None else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._cur.fetchall()]

    @property
    def postgres(self) -> bool:
        return self._postgres


def is_db_error(e: BaseException) -> bool:
    """An error of the database driver (SQLite or psycopg), not of the caller."""
    return isinstance(e, sqlite3.Error) or type(e).__module__.startswith("psycopg")


def missing_table(e: BaseException) -> bool:
    """A statement failed on a table that does not exist (a database from before it)."""
    if isinstance(e, sqlite3.OperationalError):
        return "no such table" in str(e)
    return getattr(e, "sqlstate", None) == "42P01"  # PostgreSQL undefined_table


def fold_cash(cur: _Cursor) -> Decimal:
    """The cash of every fill (sells add qty x price, buys subtract it), inside the caller's
    transaction: ``pnl_cash`` plus the fills inserted since, which are folded into it.

    Call it in the transaction that inserts fills: the row then always matches the fills of the
    database it is in, so a restored snapshot brings its own cash along. A database without the
    row (older than the table, or restored from a snapshot that was) or with fills rewound below
    it is summed from every fill, once. Only the strategy inserts fills, one transaction at a
    time, so ids above ``fills_through`` are exactly the fills not yet counted.
    """
    row = cur.execute("SELECT cash, fills_through FROM pnl_cash WHERE id = 1").fetchone()
    top_row = cur.execute("SELECT MAX(id) FROM fills").fetchone()
    top = int(top_row[0]) if top_row is not None and top_row[0] is not None else 0
    if row is None or int(row[1]) > top:
        cash, through = Decimal(0), 0
    else:
        cash, through = Decimal(row[0]), int(row[1])
    if row is not None and through == top:
        return cash
    cash += _cash_of_fills(cur, through, top)
    cur.execute(
        "INSERT INTO pnl_cash (id, cash, fills_through, updated_at) VALUES (1, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET cash = excluded.cash, "
        "fills_through = excluded.fills_through, updated_at = excluded.updated_at",
        (str(cash), top, utcnow().isoformat()),
    )
    return cash


def _cash_of_fills(cur: _Cursor, after: int, upto: int) -> Decimal:
    if cur.postgres:
        # numeric arithmetic is exact, like Decimal, and a first sum over 1M rows stays in the
        # server (a fraction of a second instead of seconds of Python).
        row = cur.execute(
            "SELECT COALESCE(SUM(CASE WHEN side = 'buy' THEN -1 ELSE 1 END "
            "* CAST(qty AS NUMERIC) * CAST(price AS NUMERIC)), 0) "
            "FROM fills WHERE id > ? AND id <= ?",
            (after, upto),
        ).fetchone()
        return Decimal(row[0]) if row is not None else Decimal(0)
    cash = Decimal(0)
    rows = cur.execute(
        "SELECT side, qty, price FROM fills WHERE id > ? AND id <= ?", (after, upto)
    ).fetchall()
    for side, qty, price in rows:
        value = Decimal(qty) * Decimal(price)
        cash += -value if side == "buy" else value
    return cash


def _as_db(db: DbRef | Database) -> Database:
    return db if isinstance(db, Database) else Database(db)


def _read(cur: _Cursor, lock: bool) -> TradingStateRecord:
    sql = "SELECT state, changed_by, changed_at, reason FROM trading_state WHERE id = 1"
    row = cur.execute(sql + (" FOR UPDATE" if lock and cur._postgres else "")).fetchone()
    if row is None:
        raise LookupError("trading_state has no row: the schema was never initialised")
    return TradingStateRecord(
        state=TradingState(row[0]),
        changed_by=row[1],
        changed_at=datetime.fromisoformat(row[2]),
        reason=row[3],
    )


def get_trading_state(db: DbRef | Database) -> TradingStateRecord:
    """The state the strategy obeys on its next loop (creates the schema if missing)."""
    db = _as_db(db)
    try:
        with db.transaction() as cur:
            return _read(cur, lock=False)
    except (sqlite3.OperationalError, LookupError):
        if db.is_postgres:
            raise
        db.init_schema()
        with db.transaction() as cur:
            return _read(cur, lock=False)


def set_trading_state(
    db: DbRef | Database, state: TradingState | str, who: str, why: str
) -> StateChange:
    """Set the state; a no-op (``changed=False``, saying so) when it already holds."""
    if not who.strip() or not why.strip():
        raise ValueError("a trading state change needs who and why")
    db = _as_db(db)
    target = TradingState(state)
    try:
        get_trading_state(db)
    except Exception:
        db.init_schema()
    with db.transaction() as cur:
        before = _read(cur, lock=True)
        if before.state == target:
            return StateChange(
                changed=False,
                previous=before,
                current=before,
                message=(
                    f"already {target.value} (set by {before.changed_by} at "
                    f"{before.changed_at.isoformat()}: {before.reason}); nothing changed"
                ),
            )
        after = TradingStateRecord(state=target, changed_by=who, changed_at=utcnow(), reason=why)
        cur.execute(
            "UPDATE trading_state SET state = ?, changed_by = ?, changed_at = ?, reason = ? "
            "WHERE id = 1",
            (target.value, who, after.changed_at.isoformat(), why),
        )
        cur.execute(
            "INSERT INTO trading_state_changes (at, from_state, to_state, who, why) "
            "VALUES (?, ?, ?, ?, ?)",
            (after.changed_at.isoformat(), before.state.value, target.value, who, why),
        )
    return StateChange(
        changed=True,
        previous=before,
        current=after,
        message=f"{before.state.value} -> {target.value} by {who}: {why}",
    )


def state_history(db: DbRef | Database) -> list[tuple[str, str | None, str, str, str]]:
    """Every recorded change, oldest first: (at, from, to, who, why)."""
    with _as_db(db).transaction() as cur:
        rows = cur.execute(
            "SELECT at, from_state, to_state, who, why FROM trading_state_changes ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
