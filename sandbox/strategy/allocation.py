"""Capital allocation per version: the share of its notional and position caps a version trades.

Part of the strategy-database contract (like ``state.py`` and ``lease.py``): a canary step
writes ``allocation(version, capital)``; the strategy multiplies its quote size and position cap
by it on every loop. No row: the full capital (1.0).
"""

from __future__ import annotations

from sandbox.strategy.state import Database, DbRef, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS allocation (
    version TEXT PRIMARY KEY, capital TEXT NOT NULL, set_at TEXT NOT NULL,
    set_by TEXT NOT NULL, reason TEXT NOT NULL
)
"""


def _db(db: DbRef | Database) -> Database:
    return db if isinstance(db, Database) else Database(db)


def _init(database: Database) -> None:
    with database.transaction() as cur:
        cur.execute(SCHEMA)


def capital_of(db: DbRef | Database, version: str) -> float:
    """The share of capital ``version`` trades (1.0 when none was ever set)."""
    database = _db(db)
    _init(database)
    with database.transaction() as cur:
        row = cur.execute("SELECT capital FROM allocation WHERE version = ?", (version,)).fetchone()
    return float(row[0]) if row is not None else 1.0


def set_capital(db: DbRef | Database, version: str, capital: float, who: str, why: str) -> None:
    if not 0 < capital <= 1:
        raise ValueError(f"capital share must be in (0, 1], not {capital}")
    database = _db(db)
    _init(database)
    with database.transaction() as cur:
        cur.execute(
            "INSERT INTO allocation (version, capital, set_at, set_by, reason) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (version) DO UPDATE SET capital = "
            "excluded.capital, set_at = excluded.set_at, set_by = excluded.set_by, "
            "reason = excluded.reason",
            (version, repr(capital), utcnow().isoformat(), who, why),
        )
