"""State-snapshot activities in Temporal's activity environment against real SQLite files and the
real PostgreSQL server: round trips, snapshots under concurrent writers, retried snapshots, and
refusals that must leave the database untouched."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import db_postgres, db_sqlite, snapshots
from activities.snapshot_catalog import SnapshotCatalog
from activities.snapshots import SnapshotActivities
from tests.fixtures.postgres import pg_database, pg_server  # noqa: F401 - fixtures
from tests.helpers import assert_eventually, fresh_id
from workflows.snapshot_models import (
    ChecksumRequest,
    DatabaseKind,
    DatabaseRef,
    RestoreRequest,
    RestoreResult,
    SnapshotRecord,
    SnapshotRequest,
)

ACCOUNTS = 50
OPENING_BALANCE = 1_000
TOTAL = ACCOUNTS * OPENING_BALANCE
PASSWORD_ENV = "BG_TEST_PG_PASSWORD"


class Beats:
    """Heartbeats the activity environment saw."""

    def __init__(self) -> None:
        self.details: list[object] = []

    def __call__(self, *details: object) -> None:
        self.details.extend(details)


@pytest.fixture
def beats() -> Beats:
    return Beats()


@pytest.fixture
def env(beats: Beats) -> ActivityEnvironment:
    environment = ActivityEnvironment()
    environment.on_heartbeat = beats
    return environment


@pytest.fixture
def acts(tmp_path: Path) -> SnapshotActivities:
    return SnapshotActivities(
        SnapshotCatalog(tmp_path / "state" / "catalog.sqlite"), tmp_path / "store"
    )


def snapshot_request(
    database: DatabaseRef, key: str | None = None, **overrides: str
) -> SnapshotRequest:
    fields: dict[str, object] = {
        "strategy": "mm-btc",
        "env": "staging",
        "version": "1.4.2",
        "database": database,
        "reason": "pre-deploy of 1.5.0",
        "idempotency_key": key or fresh_id("deploy/mm-btc/staging") + "/pre-deploy",
    }
    fields.update(overrides)
    return SnapshotRequest.model_validate(fields)


def restore_request(
    record: SnapshotRecord, database: DatabaseRef, **overrides: str
) -> RestoreRequest:
    fields: dict[str, object] = {
        "snapshot_id": record.id,
        "strategy": record.strategy,
        "env": record.env,
        "database": database,
        "reason": "rollback",
    }
    fields.update(overrides)
    return RestoreRequest.model_validate(fields)


async def checksum(env: ActivityEnvironment, acts: SnapshotActivities, db: DatabaseRef) -> str:
    return (await env.run(acts.checksum, ChecksumRequest(database=db))).content_checksum


# --------------------------------------------------------------------------- SQLite


def make_sqlite(path: Path, *, filler: int = 2_000, journal_mode: str = "wal") -> DatabaseRef:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.executescript(
        """
        CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
        CREATE TABLE ledger (id INTEGER PRIMARY KEY, txn INTEGER, account INTEGER, amount INTEGER);
        CREATE TABLE orders (venue TEXT, client_id TEXT, price REAL, raw BLOB, note TEXT,
                             PRIMARY KEY (venue, client_id));
        CREATE TABLE params (name TEXT, value);
        """
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO accounts VALUES (?, ?)", [(i, OPENING_BALANCE) for i in range(ACCOUNTS)]
    )
    conn.executemany(
        "INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
        [
            ("binance", f"c{i:06d}", i / 7, os.urandom(8), None if i % 3 else "é ✓")
            for i in range(filler)
        ],
    )
    conn.executemany("INSERT INTO params VALUES (?, ?)", [("spread", 0.1), ("max", 5), ("x", None)])
    conn.execute("COMMIT")
    conn.close()
    return DatabaseRef(kind=DatabaseKind.SQLITE, path=path)


def sqlite_transfer(conn: sqlite3.Connection, txn: int, rng: random.Random) -> None:
    """One transaction that keeps the invariants: balances sum to TOTAL, ledger pairs sum to 0."""
    a, b = rng.sample(range(ACCOUNTS), 2)
    amount = rng.randint(1, 50)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, a))
    conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
    conn.execute(
        "INSERT INTO ledger (txn, account, amount) VALUES (?, ?, ?), (?, ?, ?)",
        (txn, a, -amount, txn, b, amount),
    )
    conn.execute("COMMIT")


def assert_sqlite_invariants(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0] == TOTAL
        pairs = conn.execute(
            "SELECT count(*) FROM (SELECT txn FROM ledger GROUP BY txn"
            " HAVING count(*) <> 2 OR sum(amount) <> 0)"
        ).fetchone()[0]
        assert pairs == 0, "a transfer is half in the snapshot"
        return int(conn.execute("SELECT count(DISTINCT txn) FROM ledger").fetchone()[0])
    finally:
        conn.close()


def mutate_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
    conn.execute("DELETE FROM orders WHERE client_id LIKE 'c0000%'")
    conn.execute("CREATE TABLE added_by_new_version (x INTEGER)")
    conn.execute("INSERT INTO added_by_new_version VALUES (1)")
    conn.close()


async def test_sqlite_round_trip_restores_the_snapshot_content(
    env: ActivityEnvironment, acts: SnapshotActivities, tmp_path: Path, beats: Beats
) -> None:
    db = make_sqlite(tmp_path / "state.db")
    original = await checksum(env, acts, db)
    record = await env.run(acts.snapshot, snapshot_request(db))
    assert record.content_checksum == original
    assert record.path.is_file() and record.size_bytes == record.path.stat().st_size
    assert record.tables == ["accounts", "ledger", "orders", "params"]
    assert record.rows == ACCOUNTS + 2_000 + 3
    assert beats.details, "the snapshot heartbeats"

    mutate_sqlite(db.path)  # type: ignore[arg-type]
    assert await checksum(env, acts, db) != original
    result = await env.run(acts.restore, restore_request(record, db))
    assert result.content_checksum == original == result.content_checksum == record.content_checksum
    assert result.changed and result.version == "1.4.2"
    assert await checksum(env, acts, db) == original
    conn = sqlite3.connect(db.path)  # type: ignore[arg-type]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

    again = await env.run(acts.restore, restore_request(record, db))
    assert again.content_checksum == original
    assert again.changed and again.content_checksum_before == ""  # written again, not measured


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
async def test_sqlite_snapshot_under_writers_is_one_consistent_point(
    env: ActivityEnvironment, acts: SnapshotActivities, tmp_path: Path, journal_mode: str
) -> None:
    # Rollback-journal mode makes the backup wait out the writer's locks: keep that one small.
    filler = 60_000 if journal_mode == "wal" else 5_000
    db = make_sqlite(tmp_path / "state.db", filler=filler, journal_mode=journal_mode)
    stop = threading.Event()
    commits = [0]

    def writer() -> None:
        conn = sqlite3.connect(db.path, isolation_level=None, timeout=30)  # type: ignore[arg-type]
        rng = random.Random(7)
        while not stop.is_set():
            sqlite_transfer(conn, commits[0], rng)
            commits[0] += 1
        conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        await assert_eventually(lambda: commits[0] >= 20, interval=0.005)
        before = commits[0]
        record = await env.run(acts.snapshot, snapshot_request(db))
        during = commits[0] - before
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert during > 0, "the writer committed while the snapshot ran"

    result = await env.run(acts.restore, restore_request(record, db))
    assert result.content_checksum == record.content_checksum
    transfers = assert_sqlite_invariants(db.path)  # type: ignore[arg-type]
    assert before <= transfers <= commits[0]


async def test_retried_snapshot_returns_the_same_record_and_redoes_a_corrupted_one(
    env: ActivityEnvironment, acts: SnapshotActivities, tmp_path: Path
) -> None:
    db = make_sqlite(tmp_path / "state.db")
    request = snapshot_request(db, key="deploy/mm-btc/staging/run-1/pre-deploy")
    first = await env.run(acts.snapshot, request)
    mutate_sqlite(db.path)  # a retry later must not capture the newer state
    second = await env.run(acts.snapshot, request)
    assert second.reused and not first.reused
    assert second.model_copy(update={"reused": False}) == first
    assert acts.catalog.list("mm-btc", "staging") == [first]
    assert list(first.path.parent.iterdir()) == [first.path]

    first.path.write_bytes(b"garbage")
    third = await env.run(acts.snapshot, request)
    assert third.id == first.id and not third.reused
    assert third.path != first.path and not first.path.exists()
    assert third.content_checksum != first.content_checksum  # taken again, of today's state
    assert acts.catalog.get(first.id) == third
    other = await env.run(
        acts.snapshot, snapshot_request(db, key=request.idempotency_key, env="prod")
    )
    assert other.id != first.id  # the same key of another system names another snapshot


RefusalCase = Callable[[SnapshotRecord], RestoreRequest]


def _other_strategy(record: SnapshotRecord, db: DatabaseRef) -> RestoreRequest:
    return restore_request(record, db, strategy="arb-eth")


def _other_env(record: SnapshotRecord, db: DatabaseRef) -> RestoreRequest:
    return restore_request(record, db, env="prod")


def _unknown_id(record: SnapshotRecord, db: DatabaseRef) -> RestoreRequest:
    return restore_request(record, db, snapshot_id="snap-" + "0" * 24)


def _corrupted(record: SnapshotRecord, db: DatabaseRef) -> RestoreRequest:
    data = bytearray(record.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    record.path.write_bytes(bytes(data))
    return restore_request(record, db)


REFUSALS = [
    pytest.param(_other_strategy, "SnapshotMismatch", "belongs to mm-btc/staging", id="strategy"),
    pytest.param(_other_env, "SnapshotMismatch", "not mm-btc/prod", id="env"),
    pytest.param(_unknown_id, "SnapshotNotFound", "no snapshot snap-000", id="unknown"),
    pytest.param(_corrupted, "ArtifactCorrupted", "not restoring", id="corrupted"),
]


@pytest.mark.parametrize(("case", "kind", "message"), REFUSALS)
async def test_sqlite_refusals_leave_the_database_untouched(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    tmp_path: Path,
    case: Callable[[SnapshotRecord, DatabaseRef], RestoreRequest],
    kind: str,
    message: str,
) -> None:
    db = make_sqlite(tmp_path / "state.db")
    record = await env.run(acts.snapshot, snapshot_request(db))
    mutate_sqlite(db.path)  # type: ignore[arg-type]
    live = await checksum(env, acts, db)
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.restore, case(record, db))
    assert caught.value.type == kind and caught.value.non_retryable
    assert message in str(caught.value)
    assert await checksum(env, acts, db) == live


async def test_sqlite_snapshot_of_a_missing_file_is_refused(
    env: ActivityEnvironment, acts: SnapshotActivities, tmp_path: Path
) -> None:
    db = DatabaseRef(kind=DatabaseKind.SQLITE, path=tmp_path / "typo.db")
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.snapshot, snapshot_request(db))
    assert caught.value.type == "DatabaseMissing" and caught.value.non_retryable
    assert not (tmp_path / "typo.db").exists()
    assert acts.catalog.list() == []


async def test_restore_writes_even_equal_content_and_digests_only_after(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = make_sqlite(tmp_path / "state.db")
    record = await env.run(acts.snapshot, snapshot_request(db))
    digests: list[DatabaseRef] = []
    writes: list[Path] = []
    real_digest, real_restore = snapshots.content_checksum, db_sqlite.restore

    async def counted_digest(
        database: DatabaseRef, progress: dict[str, object] | None = None
    ) -> tuple[str, list[str], int]:
        digests.append(database)
        return await real_digest(database, progress)

    def counted_restore(artifact: Path, target: Path) -> None:
        writes.append(target)
        real_restore(artifact, target)

    monkeypatch.setattr(snapshots, "content_checksum", counted_digest)
    monkeypatch.setattr(db_sqlite, "restore", counted_restore)
    result = await env.run(acts.restore, restore_request(record, db))  # content already equal
    assert writes == [db.path] and digests == [db]  # restored, then digested once to verify
    assert result.changed and result.content_checksum == record.content_checksum
    assert result.content_checksum_before == ""


async def test_sqlite_restore_is_not_verified_while_a_writer_keeps_writing(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = make_sqlite(tmp_path / "state.db")
    record = await env.run(acts.snapshot, snapshot_request(db))
    mutate_sqlite(db.path)  # type: ignore[arg-type]
    real_restore = db_sqlite.restore

    def restore_then_a_write(artifact: Path, target: Path) -> None:
        real_restore(artifact, target)
        conn = sqlite3.connect(target, isolation_level=None)  # the strategy was not halted
        conn.execute("INSERT INTO ledger (txn, account, amount) VALUES (1, 2, 3)")
        conn.close()

    monkeypatch.setattr(db_sqlite, "restore", restore_then_a_write)
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.restore, restore_request(record, db))
    assert caught.value.type == "RestoreNotVerified" and caught.value.non_retryable
    message = str(caught.value)
    assert f"{db.label} after restoring {record.id}" in message
    assert record.content_checksum[:16] in message and "is something still writing?" in message


def test_restore_results_recorded_before_still_decode() -> None:
    fields: dict[str, object] = {
        "snapshot_id": "snap-" + "0" * 24,
        "strategy": "mm-btc",
        "env": "staging",
        "version": "1.4.2",
        "db_kind": "sqlite",
        "content_checksum": "d" * 64,
        "method": "sqlite-backup-api",
        "restored_at": "2026-01-31T00:00:00Z",
    }
    skipped = RestoreResult.model_validate(
        {**fields, "changed": False, "content_checksum_before": "d" * 64}
    )
    assert not skipped.changed and skipped.content_checksum_before == "d" * 64
    now = RestoreResult.model_validate(fields)
    assert now.changed and now.content_checksum_before == ""


# --------------------------------------------------------------------------- PostgreSQL

PG_SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (id bigserial PRIMARY KEY, txn bigint, account int, amount bigint);
CREATE SCHEMA strat;
CREATE TABLE strat.orders (
    venue text, client_id text, price numeric(20, 8), px double precision, at timestamptz,
    raw bytea, meta jsonb, tags text[], ok boolean, PRIMARY KEY (venue, client_id));
CREATE TABLE params (name text, value text);
CREATE VIEW balances AS SELECT sum(balance) AS total FROM accounts;
"""


def pg_ref(dsn: str, monkeypatch: pytest.MonkeyPatch) -> DatabaseRef:
    """A ref without the password (testcontainers sets one): it travels in an env var."""
    params = conninfo_to_dict(dsn)
    secret = params.pop("password", None)
    if secret is not None:
        monkeypatch.setenv(PASSWORD_ENV, str(secret))
        return DatabaseRef(
            kind=DatabaseKind.POSTGRES, dsn=make_conninfo(**params), password_env=PASSWORD_ENV
        )
    return DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=make_conninfo(**params))


async def make_pg(dsn: str, *, filler: int = 2_000) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(PG_SCHEMA)
        await conn.execute(
            "INSERT INTO accounts SELECT i, %s FROM generate_series(0, %s) i",
            (OPENING_BALANCE, ACCOUNTS - 1),
        )
        await conn.execute(
            """INSERT INTO strat.orders SELECT 'binance', 'c' || lpad(i::text, 6, '0'),
                   i / 7.0, i / 7.0, '2024-01-01T00:00:00Z'::timestamptz + i * interval '1 min',
                   decode(md5(i::text), 'hex'), jsonb_build_object('i', i, 'é', '✓'),
                   ARRAY['a', i::text], i %% 2 = 0
               FROM generate_series(1, %s) i""",
            (filler,),
        )
        await conn.execute("INSERT INTO params VALUES ('spread', '0.1'), ('max', NULL)")


async def mutate_pg(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        await conn.execute("DELETE FROM strat.orders WHERE client_id LIKE 'c0000%'")
        await conn.execute("ALTER TABLE params ADD COLUMN note text DEFAULT 'new'")
        await conn.execute("CREATE TABLE added_by_new_version (x int)")
        await conn.execute("CREATE VIEW added_view AS SELECT x FROM added_by_new_version")
        await conn.execute("INSERT INTO added_by_new_version VALUES (1)")


async def test_pg_round_trip_restores_the_snapshot_content(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    pg_database: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    beats: Beats,
) -> None:
    await make_pg(pg_database)
    db = pg_ref(pg_database, monkeypatch)
    original = await checksum(env, acts, db)
    record = await env.run(acts.snapshot, snapshot_request(db))
    assert record.content_checksum == original and record.db_kind is DatabaseKind.POSTGRES
    assert record.tables == ["public.accounts", "public.ledger", "public.params", "strat.orders"]
    assert record.rows == ACCOUNTS + 2_000 + 2
    assert record.path.read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format
    assert beats.details

    await mutate_pg(pg_database)
    assert await checksum(env, acts, db) != original
    result = await env.run(acts.restore, restore_request(record, db))
    assert result.content_checksum == original and result.changed
    assert result.dropped_tables == ["public.added_by_new_version"]
    assert await checksum(env, acts, db) == original
    async with await psycopg.AsyncConnection.connect(pg_database) as conn:
        cur = await conn.execute("SELECT total FROM balances")  # the view came back too
        assert (await cur.fetchone()) == (TOTAL,)

    again = await env.run(acts.restore, restore_request(record, db))
    assert again.content_checksum == original
    assert again.changed and again.content_checksum_before == ""  # written again, not measured


async def test_pg_snapshot_under_writers_is_one_consistent_point(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    pg_database: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_pg(pg_database, filler=60_000)
    db = pg_ref(pg_database, monkeypatch)
    stop = asyncio.Event()
    commits = [0]

    async def writer() -> None:
        rng = random.Random(11)
        async with await psycopg.AsyncConnection.connect(pg_database) as conn:
            while not stop.is_set():
                a, b = rng.sample(range(ACCOUNTS), 2)
                amount = rng.randint(1, 50)
                async with conn.transaction():
                    await conn.execute(
                        "UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a)
                    )
                    await conn.execute(
                        "UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b)
                    )
                    await conn.execute(
                        "INSERT INTO ledger (txn, account, amount)"
                        " VALUES (%s, %s, %s), (%s, %s, %s)",
                        (commits[0], a, -amount, commits[0], b, amount),
                    )
                commits[0] += 1

    task = asyncio.create_task(writer())
    try:
        await assert_eventually(lambda: commits[0] >= 20, interval=0.005)
        before = commits[0]
        record = await env.run(acts.snapshot, snapshot_request(db))
        during = commits[0] - before
    finally:
        stop.set()
        await task
    assert during > 0, "the writer committed while the snapshot ran"

    result = await env.run(acts.restore, restore_request(record, db))
    assert result.content_checksum == record.content_checksum
    async with await psycopg.AsyncConnection.connect(pg_database) as conn:
        cur = await conn.execute("SELECT sum(balance) FROM accounts")
        assert (await cur.fetchone()) == (TOTAL,)
        cur = await conn.execute(
            "SELECT count(*) FROM (SELECT txn FROM ledger GROUP BY txn"
            " HAVING count(*) <> 2 OR sum(amount) <> 0) broken"
        )
        assert (await cur.fetchone()) == (0,), "a transfer is half in the snapshot"
        cur = await conn.execute("SELECT count(DISTINCT txn) FROM ledger")
        row = await cur.fetchone()
        assert row is not None and before <= row[0] <= commits[0]


async def test_pg_restore_is_not_verified_while_a_writer_keeps_writing(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    pg_database: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_pg(pg_database)
    db = pg_ref(pg_database, monkeypatch)
    record = await env.run(acts.snapshot, snapshot_request(db))
    await mutate_pg(pg_database)
    real_restore = db_postgres.restore

    async def restore_then_a_write(ref: DatabaseRef, artifact: Path, drop: list[str]) -> None:
        await real_restore(ref, artifact, drop)
        async with await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as conn:
            await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 0")

    monkeypatch.setattr(db_postgres, "restore", restore_then_a_write)
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.restore, restore_request(record, db))
    assert caught.value.type == "RestoreNotVerified" and caught.value.non_retryable
    message = str(caught.value)
    assert f"after restoring {record.id}" in message and "is something still writing?" in message
    async with await psycopg.AsyncConnection.connect(pg_database) as conn:
        added = "SELECT to_regclass('added_by_new_version'), sum(balance) FROM accounts"
        cur = await conn.execute(added)
        assert (await cur.fetchone()) == (None, TOTAL + 1)  # restored, then written to


@pytest.mark.parametrize(("case", "kind", "message"), [REFUSALS[0], REFUSALS[1], REFUSALS[3]])
async def test_pg_refusals_leave_the_database_untouched(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    pg_database: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    case: Callable[[SnapshotRecord, DatabaseRef], RestoreRequest],
    kind: str,
    message: str,
) -> None:
    await make_pg(pg_database)
    db = pg_ref(pg_database, monkeypatch)
    record = await env.run(acts.snapshot, snapshot_request(db))
    await mutate_pg(pg_database)
    live = await checksum(env, acts, db)
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.restore, case(record, db))
    assert caught.value.type == kind and caught.value.non_retryable
    assert message in str(caught.value)
    assert await checksum(env, acts, db) == live


async def test_pg_password_never_leaves_the_worker(
    env: ActivityEnvironment,
    acts: SnapshotActivities,
    pg_database: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    beats: Beats,
) -> None:
    secret = "s3cret-" + fresh_id("pw")
    params = {k: v for k, v in conninfo_to_dict(pg_database).items() if k != "password"}
    monkeypatch.setenv(PASSWORD_ENV, conninfo_to_dict(pg_database).get("password") or secret)
    if "password" not in conninfo_to_dict(pg_database):
        secret = os.environ[PASSWORD_ENV]  # trust auth: any password is accepted
    db = DatabaseRef(
        kind=DatabaseKind.POSTGRES, dsn=make_conninfo(**params), password_env=PASSWORD_ENV
    )
    await make_pg(pg_database, filler=10)
    record = await env.run(acts.snapshot, snapshot_request(db))
    missing = db.model_copy(update={"dsn": make_conninfo(**{**params, "dbname": "bg_no_such_db"})})
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.snapshot, snapshot_request(missing))
    assert caught.value.type == "DatabaseMissing" and caught.value.non_retryable
    seen = " ".join([record.model_dump_json(), str(caught.value), repr(beats.details)])
    assert secret not in seen
    assert secret not in acts.catalog.path.read_bytes().decode(errors="replace")

    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ApplicationError) as unset:
        await env.run(acts.checksum, ChecksumRequest(database=db))
    assert unset.value.type == "DatabaseRefused" and PASSWORD_ENV in str(unset.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://bot:hunter2@db:5432/state",
        "postgresql://bot@db/state?password=hunter2",
        "host=db dbname=state user=bot password=hunter2",
        "host=db dbname=state PASSWORD = 'hunter2'",
    ],
)
def test_a_password_in_the_dsn_is_rejected(dsn: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=dsn)
    assert "password_env" in str(caught.value)
