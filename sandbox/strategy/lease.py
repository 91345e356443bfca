"""The single trading lease: which version may send orders for an account, fenced by an epoch.

The reference implementation of the contract a managed strategy and breakglass share through the
strategy's own database (like the trading state in ``state.py``):

- ``trading_lease``: one row per account — ``epoch``, ``holder`` (the version allowed to send;
  NULL while fenced: nobody) and ``mode`` (ACTIVE, or REDUCING: only orders that shrink a
  position);
- ``lease_acks``: each running version writes the epoch it has seen, per account, once it has
  no order in flight under an older epoch;
- ``lease_changes``: every change, with who and why.

A strategy process asks :func:`may_send` before deciding, and records each order intent with
:func:`record_intent` *before* sending it: the insert happens only while the process still holds
the epoch it read, in the same transaction, so after a fence no new intent can be recorded and
therefore nothing new is sent. It then acknowledges the epoch (:func:`acknowledge`).

breakglass hands the lease over with :func:`reduce`, :func:`fence`, (wait for the old holder's
ack, cancel its orders on the venue) and :func:`grant`; each step is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sandbox.strategy.state import Database, DbRef, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS trading_lease (
    account TEXT PRIMARY KEY, epoch BIGINT NOT NULL, holder TEXT, mode TEXT NOT NULL,
    granted_at TEXT NOT NULL, granted_by TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_acks (
    version TEXT NOT NULL, account TEXT NOT NULL, epoch_seen BIGINT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (version, account)
);
CREATE TABLE IF NOT EXISTS lease_changes (
    id {serial}, at TEXT NOT NULL, account TEXT NOT NULL, from_epoch BIGINT,
    to_epoch BIGINT NOT NULL, from_holder TEXT, to_holder TEXT, mode TEXT NOT NULL,
    who TEXT NOT NULL, why TEXT NOT NULL
);
"""


class LeaseMode(StrEnum):
    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"


@dataclass(frozen=True)
class Lease:
    account: str
    epoch: int
    holder: str | None
    mode: LeaseMode
    granted_at: datetime
    granted_by: str
    reason: str

    def allows(self, version: str) -> bool:
        return self.holder == version


def _db(db: DbRef | Database) -> Database:
    return db if isinstance(db, Database) else Database(db)


def init_lease_schema(db: DbRef | Database) -> None:
    database = _db(db)
    serial = "BIGSERIAL PRIMARY KEY" if database.is_postgres else "INTEGER PRIMARY KEY"
    with database.transaction() as cur:
        for statement in SCHEMA.format(serial=serial).split(";"):
            if statement.strip():
                cur.execute(statement)


def read_lease(db: DbRef | Database, account: str) -> Lease | None:
    """The account's lease, or None when no lease was ever granted (a single version runs)."""
    init_lease_schema(db)
    with _db(db).transaction() as cur:
        row = cur.execute(
            "SELECT account, epoch, holder, mode, granted_at, granted_by, reason "
            "FROM trading_lease WHERE account = ?",
            (account,),
        ).fetchone()
    return _lease(row) if row is not None else None


def _lease(row: tuple[object, ...]) -> Lease:
    return Lease(
        account=str(row[0]),
        epoch=int(str(row[1])),
        holder=None if row[2] is None else str(row[2]),
        mode=LeaseMode(str(row[3])),
        granted_at=datetime.fromisoformat(str(row[4])),
        granted_by=str(row[5]),
        reason=str(row[6]),
    )


def may_send(db: DbRef | Database, account: str, version: str) -> Lease | None:
    """The lease this version trades under, or None when it must not send anything.

    No lease row at all means no deployment ever handed one out: the only version running may
    trade (``Lease`` with epoch 0 is returned so intents can still be fenced later).
    """
    lease = read_lease(db, account)
    if lease is None:
        return Lease(account, 0, version, LeaseMode.ACTIVE, utcnow(), "nobody", "no lease yet")
    return lease if lease.allows(version) else None


def record_intent(
    db: DbRef | Database, lease: Lease, insert_sql: str, params: tuple[object, ...]
) -> bool:
    """Run ``insert_sql`` (an order intent ``INSERT … SELECT …`` written so that ``params``
    fill it) only while ``lease`` still holds, in one transaction. False: fenced, do not send.
    """
    database = _db(db)
    with database.transaction() as cur:
        row = cur.execute(
            "SELECT epoch, holder FROM trading_lease WHERE account = ?", (lease.account,)
        ).fetchone()
        if row is None:
            holds = lease.epoch == 0  # still no lease: the single version trades
        else:
            holds = int(row[0]) == lease.epoch and row[1] == lease.holder
        if not holds:
            return False
        cur.execute(insert_sql, params)
    return True


def acknowledge(db: DbRef | Database, account: str, version: str, epoch: int) -> None:
    """This version has seen ``epoch`` and has nothing in flight under an older one."""
    now = utcnow().isoformat()
    with _db(db).transaction() as cur:
        cur.execute(
            "INSERT INTO lease_acks (version, account, epoch_seen, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (version, account) DO UPDATE SET epoch_seen = excluded.epoch_seen, "
            "at = excluded.at",
            (version, account, epoch, now),
        )


def acknowledged(db: DbRef | Database, account: str, version: str) -> int | None:
    """The newest epoch ``version`` acknowledged on ``account`` (None: never)."""
    init_lease_schema(db)
    with _db(db).transaction() as cur:
        row = cur.execute(
            "SELECT epoch_seen FROM lease_acks WHERE version = ? AND account = ?",
            (version, account),
        ).fetchone()
    return int(row[0]) if row is not None else None


def _change(
    db: DbRef | Database,
    account: str,
    *,
    bump: bool,
    holder: str | None,
    mode: LeaseMode,
    who: str,
    why: str,
) -> Lease:
    """One lease change in one transaction (row created at epoch 1 on first use)."""
    database = _db(db)
    init_lease_schema(database)
    now = utcnow().isoformat()
    with database.transaction() as cur:
        lock = " FOR UPDATE" if database.is_postgres else ""
        row = cur.execute(
            f"SELECT epoch, holder FROM trading_lease WHERE account = ?{lock}", (account,)
        ).fetchone()
        before_epoch = int(row[0]) if row is not None else None
        before_holder = row[1] if row is not None else None
        epoch = (before_epoch or 0) + 1 if (bump or row is None) else int(before_epoch or 0)
        cur.execute(
            "INSERT INTO trading_lease (account, epoch, holder, mode, granted_at, granted_by, "
            "reason) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET "
            "epoch = excluded.epoch, holder = excluded.holder, mode = excluded.mode, "
            "granted_at = excluded.granted_at, granted_by = excluded.granted_by, "
            "reason = excluded.reason",
            (account, epoch, holder, mode.value, now, who, why),
        )
        cur.execute(
            "INSERT INTO lease_changes (at, account, from_epoch, to_epoch, from_holder, "
            "to_holder, mode, who, why) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now, account, before_epoch, epoch, before_holder, holder, mode.value, who, why),
        )
    lease = read_lease(database, account)
    assert lease is not None
    return lease


def grant(db: DbRef | Database, account: str, version: str, who: str, why: str) -> Lease:
    """A new epoch, held by ``version`` (ACTIVE). Idempotent when it already holds it."""
    lease = read_lease(db, account)
    if lease is not None and lease.holder == version and lease.mode is LeaseMode.ACTIVE:
        return lease
    return _change(db, account, bump=True, holder=version, mode=LeaseMode.ACTIVE, who=who, why=why)


def reduce(db: DbRef | Database, account: str, version: str, who: str, why: str) -> Lease:
    """The holder keeps its epoch but may only shrink positions (the soft half of a handover).
    A lease that ``version`` does not hold is left as it is."""
    lease = read_lease(db, account)
    if lease is None:
        return _change(
            db, account, bump=True, holder=version, mode=LeaseMode.REDUCING, who=who, why=why
        )
    if lease.holder != version or lease.mode is LeaseMode.REDUCING:
        return lease
    return _change(
        db, account, bump=False, holder=version, mode=LeaseMode.REDUCING, who=who, why=why
    )


def fence(db: DbRef | Database, account: str, who: str, why: str) -> Lease:
    """A new epoch held by nobody: no intent under an older epoch can be recorded any more.
    Idempotent: an already fenced lease is left as it is."""
    lease = read_lease(db, account)
    if lease is not None and lease.holder is None:
        return lease
    return _change(db, account, bump=True, holder=None, mode=LeaseMode.ACTIVE, who=who, why=why)


def changes(db: DbRef | Database, account: str) -> list[tuple[int | None, int, str | None]]:
    """(from_epoch, to_epoch, to_holder) of every change on ``account``, oldest first."""
    init_lease_schema(db)
    with _db(db).transaction() as cur:
        rows = cur.execute(
            "SELECT from_epoch, to_epoch, to_holder FROM lease_changes WHERE account = ? "
            "ORDER BY id",
            (account,),
        ).fetchall()
    return [(None if r[0] is None else int(r[0]), int(r[1]), r[2]) for r in rows]
