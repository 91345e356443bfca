"""The decision log: what each version decided, sent or not (shadow mode sends nothing).

Part of the strategy-database contract: on every loop each running version records its
decisions — ``(version, at, symbol, side, price, qty, sent)`` — so a deployment can compare a
shadow version's decisions with the live one's over the same minutes (:func:`agreement`).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from sandbox.strategy.state import Database, DbRef, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id {serial}, version TEXT NOT NULL, at TEXT NOT NULL, symbol TEXT NOT NULL,
    side TEXT NOT NULL, price TEXT NOT NULL, qty TEXT NOT NULL, sent INTEGER NOT NULL
)
"""


def _db(db: DbRef | Database) -> Database:
    return db if isinstance(db, Database) else Database(db)


def init_decisions(db: DbRef | Database) -> None:
    database = _db(db)
    serial = "BIGSERIAL PRIMARY KEY" if database.is_postgres else "INTEGER PRIMARY KEY"
    with database.transaction() as cur:
        cur.execute(SCHEMA.format(serial=serial))


def record_decisions(
    db: DbRef | Database,
    version: str,
    decisions: list[tuple[str, str, Decimal, Decimal]],
    *,
    sent: bool,
) -> None:
    """One loop's decisions: (symbol, side, price, qty) each."""
    if not decisions:
        return
    now = utcnow().isoformat()
    with _db(db).transaction() as cur:
        for symbol, side, price, qty in decisions:
            cur.execute(
                "INSERT INTO decisions (version, at, symbol, side, price, qty, sent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (version, now, symbol, side, str(price), str(qty), int(sent)),
            )


def agreement(
    db: DbRef | Database, live: str, shadow: str, since: datetime, bucket_s: float = 2.0
) -> tuple[int, float]:
    """(``live``'s decisions since ``since``, counted once per symbol, side and ``bucket_s``
    window; the share of them ``shadow`` also made in that window or a neighbouring one)."""
    init_decisions(db)
    with _db(db).transaction() as cur:
        rows = cur.execute(
            "SELECT version, at, symbol, side FROM decisions "
            "WHERE version IN (?, ?) AND at >= ? ORDER BY id",
            (live, shadow, since.isoformat()),
        ).fetchall()
    start = since.timestamp()
    made: dict[str, set[tuple[int, str, str]]] = defaultdict(set)
    for version, at, symbol, side in rows:
        bucket = int((datetime.fromisoformat(at).timestamp() - start) // bucket_s)
        made[version].add((bucket, symbol, side))
    theirs = made[live]
    if not theirs:
        return 0, 0.0
    ours = made[shadow]
    same = sum(
        1
        for b, s, d in theirs
        if (b, s, d) in ours or (b + 1, s, d) in ours or (b - 1, s, d) in ours
    )
    return len(theirs), same / len(theirs)
