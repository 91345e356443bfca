"""The content digest's definition (``breakglass-content-v1``): values pinned from the first
implementation (catalog records taken with it must keep verifying), independence from the
physical order of rows, and the cutting of psql's output into tables under any chunking."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import db_postgres
from activities.snapshot_catalog import SnapshotCatalog
from activities.snapshot_errors import ToolFailed
from activities.snapshots import SnapshotActivities, content_checksum
from tests.helpers import assert_eventually
from workflows.snapshot_models import ChecksumRequest, DatabaseKind, DatabaseRef

# --------------------------------------------------------------------------- PostgreSQL content

ODD = sql.Identifier("Odd schema", 'Odd "name')
"""A table whose schema and name both need quoting."""
PG_SCHEMA = sql.SQL(
    """
CREATE SCHEMA {schema};
CREATE TABLE {odd} (
    k text PRIMARY KEY, v text, i interval, f real, d date, u uuid, n numeric, b bytea);
CREATE TABLE trades (
    venue text, id bigint, px double precision, at timestamptz, meta jsonb, tags text[],
    ok boolean, PRIMARY KEY (venue, id));
CREATE TABLE notes (body text, n int);
CREATE TABLE empty (id int PRIMARY KEY);
"""
).format(schema=sql.Identifier("Odd schema"), odd=ODD)
ODD_ROWS: list[tuple[object, ...]] = [
    ("b", "tab\there", "1 day 02:03:04", "0.1", "2024-02-29", None, "NaN", b"\x00\xff"),
    ("a", "back\\slash\nnew line\r", None, "Infinity", "infinity", None, "-0.000001", b""),
    ("B", "é ✓ 日本", "-3 mons", "-0", "0001-01-01 BC", None, "1e30", None),
    ("\\.", "\\.", "1 year", "1.5e-45", None, None, "0", b"\\."),
    ("", "", "0", "3.4e38", "2000-01-01", "ffffffff-ffff-ffff-ffff-ffffffffffff", "1.5", b"\n"),
]
NOTE_ROWS: list[tuple[object, ...]] = [("x", 1), ("x", 1), (None, 2), ("é", None), ("\\N", 3)]


def trade_rows(count: int) -> list[tuple[object, ...]]:
    venues = ("binance", "Binance", "okx")
    return [
        (
            venues[i % 3],
            i,
            i / 7 if i % 11 else -1e-300,
            f"2024-03-{1 + i % 28:02d} 12:{i % 60:02d}:00.{i:06d}+0{i % 5}:30",
            f'{{"i": {i}, "é": "✓", "nested": {{"q": [1, 2.50, null]}}}}',
            ["a", None, f'q"{i}'] if i % 4 else [],
            None if i % 3 == 0 else i % 2 == 0,
        )
        for i in range(count)
    ]


async def make_pg_content(dsn: str, *, reverse: bool = False, trades: int = 500) -> None:
    """The same logical content whichever order the rows go in (``reverse`` also rewrites some
    rows, so their new tuples land at the end of the heap)."""

    def ordered(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
        return rows[::-1] if reverse else rows

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(PG_SCHEMA)
        cur = conn.cursor()
        insert_odd = sql.SQL(
            "INSERT INTO {} VALUES"
            " (%s, %s, %s::interval, %s::real, %s::date, %s::uuid, %s::numeric, %s)"
        ).format(ODD)
        await cur.executemany(insert_odd, ordered(ODD_ROWS))
        await cur.executemany(
            "INSERT INTO trades VALUES (%s, %s, %s, %s::timestamptz, %s::jsonb, %s, %s)",
            ordered(trade_rows(trades)),
        )
        await cur.executemany("INSERT INTO notes VALUES (%s, %s)", ordered(NOTE_ROWS))
        if reverse:
            await conn.execute("UPDATE trades SET px = px WHERE id % 7 = 0")
            await conn.execute("UPDATE notes SET n = n WHERE body = 'x'")


def pg_ref(dsn: str) -> DatabaseRef:
    params = conninfo_to_dict(dsn)
    params.pop("password", None)  # the password path has its own test in test_snapshots.py
    return DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=make_conninfo(**params))


# --------------------------------------------------------------------------- SQLite content

SQLITE_ODD = '"odd ""name"""'
SQLITE_SCHEMA = f"""
CREATE TABLE fills (id INTEGER PRIMARY KEY, symbol TEXT NOT NULL, qty REAL, raw BLOB, n INTEGER);
CREATE TABLE {SQLITE_ODD} (venue TEXT, client_id TEXT, note TEXT, PRIMARY KEY (venue, client_id));
CREATE TABLE notes (body, n);
CREATE TABLE empty (id INTEGER PRIMARY KEY);
"""
SQLITE_ODD_ROWS: list[tuple[object, ...]] = [
    ("b", "1", "tab\there"),
    ("a", "2", "back\\slash\nnew line\r"),
    ("B", "3", None),
    ("a", "10", "日本"),
]
SQLITE_NOTE_ROWS: list[tuple[object, ...]] = [
    ("x", 1),
    ("x", 1),
    (None, 2),
    (b"\x00", 2.5),
    ("é", None),
    (3, "3"),
]


def fill_rows(count: int) -> list[tuple[object, ...]]:
    return [
        (
            i,
            ("BTCUSDT", "ETHUSDT", "é ✓")[i % 3],
            (i / 7, -0.0, 1e308, 0.1, -5e-324)[i % 5],
            hashlib.md5(str(i).encode()).digest()[: i % 9],
            (None, 2**63 - 1, -(2**63), i)[i % 4],
        )
        for i in range(count)
    ]


def make_sqlite_content(path: Path, *, reverse: bool = False, fills: int = 500) -> DatabaseRef:
    def ordered(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
        return rows[::-1] if reverse else rows

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=wal")
        conn.executescript(SQLITE_SCHEMA)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO fills VALUES (?, ?, ?, ?, ?)", ordered(fill_rows(fills)))
        conn.executemany(f"INSERT INTO {SQLITE_ODD} VALUES (?, ?, ?)", ordered(SQLITE_ODD_ROWS))
        conn.executemany("INSERT INTO notes VALUES (?, ?)", ordered(SQLITE_NOTE_ROWS))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return DatabaseRef(kind=DatabaseKind.SQLITE, path=path)


# --------------------------------------------------------------------------- pinned values

PG_V1 = "9c1bb9772fc6f0da267c6abf2d4c3f0931e2e22aa2e35450e66a4cf2dfe221a8"
"""``breakglass-content-v1`` of ``make_pg_content``, as the first implementation (rows read one
at a time through psycopg) computed it on PostgreSQL 15."""
SQLITE_V1 = "13d78f1271bd35128244cd56df0942b75360d905f46237c55391bb9653d2f574"
"""``breakglass-content-v1`` of ``make_sqlite_content``, as the first implementation (one
``repr`` and one hash update per row) computed it."""


async def test_pg_digest_keeps_the_v1_definition(pg_database: str) -> None:
    await make_pg_content(pg_database)
    digest, tables, rows = await content_checksum(pg_ref(pg_database))
    assert tables == ['Odd schema.Odd "name', "public.empty", "public.notes", "public.trades"]
    assert rows == len(ODD_ROWS) + len(NOTE_ROWS) + 500
    assert digest == PG_V1


async def test_sqlite_digest_keeps_the_v1_definition(tmp_path: Path) -> None:
    digest, tables, rows = await content_checksum(make_sqlite_content(tmp_path / "state.db"))
    assert tables == ["empty", "fills", "notes", 'odd "name"']
    assert rows == 500 + len(SQLITE_ODD_ROWS) + len(SQLITE_NOTE_ROWS)
    assert digest == SQLITE_V1


async def test_pg_digest_ignores_physical_row_order(pg_database: str) -> None:
    await make_pg_content(pg_database, reverse=True)
    async with await psycopg.AsyncConnection.connect(pg_database) as conn:
        cur = await conn.execute("SELECT id FROM trades ORDER BY ctid LIMIT 1")
        assert (await cur.fetchone()) != (0,)  # the heap is not in key order
    digest, _, _ = await content_checksum(pg_ref(pg_database))
    assert digest == PG_V1


async def test_sqlite_digest_ignores_physical_row_order(tmp_path: Path) -> None:
    db = make_sqlite_content(tmp_path / "state.db", reverse=True)
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("SELECT body FROM notes ORDER BY rowid LIMIT 1").fetchone() == (3,)
    conn.close()
    digest, _, _ = await content_checksum(db)
    assert digest == SQLITE_V1


# --------------------------------------------------------------------------- the first reader


async def v1_by_psycopg(dsn: str) -> str:
    """The first implementation's reader, kept as the reference: the same plan, every COPY
    row read through one psycopg session with the canonical settings."""
    digest = hashlib.sha256(db_postgres.DIGEST_PREFIX)
    async with db_postgres.connect(pg_ref(dsn)) as conn:
        await conn.set_autocommit(False)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        async with conn.transaction():
            for table in await db_postgres.user_tables(conn):
                columns, query = await db_postgres._table_query(conn, table)
                header = {"table": table.qualified, "columns": columns}
                digest.update(json.dumps(header).encode() + b"\n")
                async with conn.cursor().copy(query) as copy:
                    async for row in copy:
                        digest.update(bytes(row))
    return digest.hexdigest()


@contextlib.asynccontextmanager
async def latin1_database(server: str) -> AsyncIterator[str]:
    name = f"bg_test_{uuid.uuid4().hex[:12]}"
    create = "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
        await admin.execute(sql.SQL(create).format(sql.Identifier(name)))
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            await admin.execute(drop.format(sql.Identifier(name)))


async def test_pg_digest_reads_the_bytes_a_psycopg_session_reads(pg_server: str) -> None:
    """psql takes the client encoding of the session that planned the digest: on a LATIN1
    database the rows are hashed as LATIN1, as the first implementation hashed them."""
    async with latin1_database(pg_server) as dsn:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("CREATE TABLE t (k text PRIMARY KEY, v text)")
            await conn.execute("INSERT INTO t VALUES ('é', 'ÿ ü'), ('e', NULL)")
        digest, _, rows = await content_checksum(pg_ref(dsn))
        assert rows == 2 and digest == await v1_by_psycopg(dsn)


# --------------------------------------------------------------------------- psql's output

_COPY_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def copy_line(values: list[str | None]) -> bytes:
    """One row as COPY's text format writes it."""
    fields = ["\\N" if v is None else v.translate(_COPY_ESCAPES) for v in values]
    return ("\t".join(fields) + "\n").encode()


values = st.one_of(st.none(), st.text(alphabet=st.sampled_from("\\.\nNt\té"), max_size=6))
tables = st.lists(st.lists(st.lists(values, min_size=1, max_size=3), max_size=5), max_size=4)


def digest_in_chunks(headers: list[bytes], output: bytes, edges: list[int]) -> tuple[str, int]:
    stream = db_postgres.DigestStream(headers)
    for start, end in itertools.pairwise(sorted({0, len(output), *edges})):
        stream.feed(output[start:end])
    return stream.hexdigest(), stream.rows


@given(tables=tables, data=st.data())
def test_psql_output_digests_the_same_in_any_chunks(
    tables: list[list[list[str | None]]], data: st.DataObject
) -> None:
    headers = [json.dumps({"table": f"public.t{i}"}).encode() + b"\n" for i in range(len(tables))]
    rows = [b"".join(copy_line(row) for row in table) for table in tables]
    output = b"".join(table_rows + b"\\.\n" for table_rows in rows)
    expected = hashlib.sha256(db_postgres.DIGEST_PREFIX)
    for header, table_rows in zip(headers, rows, strict=True):
        expected.update(header + table_rows)
    want = (expected.hexdigest(), sum(len(table) for table in tables))

    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(output)), max_size=12))
    assert digest_in_chunks(headers, output, cuts) == want
    assert digest_in_chunks(headers, output, list(range(len(output)))) == want  # byte by byte


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (b"1\tx\n\\.\n2\ty\n", "stopped after 1 of 2 tables"),
        (b"1\tx\n\\.\n2\ty\n\\.", "stopped after 1 of 2 tables"),
        (b"\\.\n\\.\nNOTICE\n", "after the rows of the last table"),
        (b"\\.\n\\.\n\\.\n", "more end-of-table lines than there are tables"),
    ],
)
def test_psql_output_that_is_not_every_table_is_refused(output: bytes, message: str) -> None:
    stream = db_postgres.DigestStream([b"a\n", b"b\n"])
    with pytest.raises(ToolFailed, match=message):
        stream.feed(output)
        stream.hexdigest()


async def test_a_failing_psql_fails_the_digest_with_its_message(pg_database: str) -> None:
    ref = pg_ref(pg_database)
    async with db_postgres.connect(ref) as conn:
        plan = await db_postgres.digest_plan(conn, "00000003-00000002-1")  # exported by no one
    with pytest.raises(ToolFailed, match=r"psql \(content digest\) exited 3: .*snapshot"):
        await db_postgres.read_digest(ref, plan)


async def test_a_worker_without_psql_is_told_so(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acts = SnapshotActivities(SnapshotCatalog(tmp_path / "catalog.sqlite"), tmp_path / "store")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            acts.checksum, ChecksumRequest(database=pg_ref(pg_database))
        )
    assert caught.value.type == "ToolFailed" and "psql not found" in str(caught.value)


async def test_a_cancelled_digest_leaves_no_psql_behind(pg_database: str) -> None:
    await make_pg_content(pg_database, trades=10)
    ours = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'breakglass-snapshots'"
    )

    async def sessions(conn: psycopg.AsyncConnection, where: str = "") -> int:
        cur = await conn.execute(ours + where)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    connect = psycopg.AsyncConnection.connect
    async with (
        await connect(pg_database) as locker,
        await connect(pg_database, autocommit=True) as watcher,
    ):
        await locker.execute("LOCK TABLE trades IN ACCESS EXCLUSIVE MODE")  # psql's COPY waits
        digest = asyncio.create_task(db_postgres.live_digest(pg_ref(pg_database)))
        await assert_eventually(
            lambda: sessions(watcher, " AND wait_event_type = 'Lock'"), interval=0.01
        )
        digest.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(120):  # a hang detector: a psql left running holds it
                await digest
        await locker.commit()  # a killed psql's backend notices once it may go on

        async def all_gone() -> bool:
            return await sessions(watcher) == 0

        await assert_eventually(all_gone)
