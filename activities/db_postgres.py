"""PostgreSQL state databases: ``pg_dump --format=custom`` from an exported snapshot (the content
digest is read in that same snapshot), restores through ``pg_restore --clean`` piped into one
``psql --single-transaction``, and a canonical digest of the logical content via ``COPY``, read
by ``psql`` in an exported snapshot.

Passwords come from the environment variable the ``DatabaseRef`` names and reach the tools as
``PGPASSWORD``; every message leaving this module is scrubbed of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from activities.snapshot_errors import (
    DatabaseMissing,
    DatabaseRefused,
    DatabaseUnavailable,
    SnapshotError,
    ToolFailed,
    scrub,
)
from workflows.snapshot_models import DatabaseRef

CONNECT_TIMEOUT_S = 10
LOCK_WAIT_TIMEOUT = "60s"
"""pg_dump gives up (and the activity retries) rather than queue behind a migration's lock."""
CANONICAL_SESSION = (
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
)
"""COPY's text output depends on these settings: pin them so a digest means the same anywhere."""
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    oid: int

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def password(ref: DatabaseRef) -> str | None:
    if ref.password_env is None:
        return None
    value = os.environ.get(ref.password_env)
    if value is None:
        raise DatabaseRefused(f"the password variable {ref.password_env} is not set on the worker")
    return value


_MISSING = re.compile(r'database "[^"]*" does not exist')
_REFUSED = re.compile(
    r"authentication failed|permission denied|role \"[^\"]*\" does not exist"
    r"|no password supplied|must be owner|pg_hba\.conf",
    re.IGNORECASE,
)


def _classify(text: str, what: str, secret: str | None) -> SnapshotError:
    """Missing database and refused credentials are final; anything else may pass."""
    message = scrub(f"{what}: {text.strip()}", secret)
    if _MISSING.search(text):
        return DatabaseMissing(message)
    if _REFUSED.search(text):
        return DatabaseRefused(message)
    return DatabaseUnavailable(message)


@contextlib.asynccontextmanager
async def connect(ref: DatabaseRef) -> AsyncIterator[psycopg.AsyncConnection]:
    """An autocommit connection with the canonical output settings."""
    secret = password(ref)
    try:
        conn = await psycopg.AsyncConnection.connect(
            ref.dsn or "",
            password=secret,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="breakglass-snapshots",
            autocommit=True,
        )
    except psycopg.Error as e:
        raise _classify(str(e), f"connect to {ref.label}", secret) from None
    try:
        for statement in CANONICAL_SESSION:
            await conn.execute(sql.SQL(statement))
        yield conn
    except psycopg.Error as e:
        raise _classify(str(e), f"on {ref.label}", secret) from None
    finally:
        await conn.close()


async def user_tables(conn: psycopg.AsyncConnection) -> list[Table]:
    cur = await conn.execute(
        """SELECT n.nspname, c.relname, c.oid::int FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind = 'r' AND n.nspname <> ALL(%s)
             AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%'""",
        (list(_SYSTEM_SCHEMAS),),
    )
    tables = [Table(schema, name, oid) for schema, name, oid in await cur.fetchall()]
    return sorted(tables, key=lambda t: (t.schema.encode(), t.name.encode()))


async def _table_query(
    conn: psycopg.AsyncConnection, table: Table
) -> tuple[list[str], sql.Composed]:
    cur = await conn.execute(
        """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
           WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
        (table.oid,),
    )
    columns = [f"{name} {kind}" for name, kind in await cur.fetchall()]
    cur = await conn.execute(
        """SELECT a.attname, a.attcollation <> 0 FROM pg_index i
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord""",
        (table.oid,),
    )
    pk = await cur.fetchall()
    if pk:
        # Byte order for text keys: the same on a server with another default collation.
        order = sql.SQL(", ").join(
            sql.SQL('t.{} COLLATE "C"' if collatable else "t.{}").format(sql.Identifier(name))
            for name, collatable in pk
        )
    else:
        order = sql.Composed([sql.SQL('t::text COLLATE "C"')])
    query = sql.SQL("COPY (SELECT t.* FROM {}.{} AS t ORDER BY {}) TO STDOUT").format(
        sql.Identifier(table.schema), sql.Identifier(table.name), order
    )
    return columns, query


DIGEST_PREFIX = b"breakglass-content-v1 postgres\n"
_END_LINE = b"\n\\.\n"
"""A line end, then the end-of-table line (backslash-period) psql echoes after each table's rows.
COPY's text format writes a backslash in the data as two, so no row line can be that line."""
_ECHO_END = "\\qecho '\\\\.'"
_READ_CHUNK = 1 << 20


class DigestStream:
    """The content digest fed with psql's output as it arrives, in chunks of any size: each
    table's header goes in front of its rows and the end-of-table lines are cut out, so the
    bytes hashed are exactly the definition's (prefix, then per table: header, COPY rows)."""

    def __init__(self, headers: list[bytes]) -> None:
        self.rows = 0
        self._sha = hashlib.sha256(DIGEST_PREFIX)
        self._headers = headers
        self._ended = 0
        self._held = b""
        """The last bytes read, kept back while they may still begin an end-of-table line."""
        self._after_newline = True
        if headers:
            self._sha.update(headers[0])

    def feed(self, chunk: bytes) -> None:
        # A leading newline stands for "at the start of a line": one search then also finds an
        # end-of-table line at the very start of the output or of a chunk.
        view = (b"\n" if self._after_newline else b"-") + self._held + chunk
        pos = 1
        while (found := view.find(_END_LINE, pos - 1)) != -1:
            self._rows(view[pos : found + 1])
            self._end_table()
            pos = found + len(_END_LINE)
        keep = max(pos, len(view) - len(_END_LINE) + 1)
        self._rows(view[pos:keep])
        self._held = view[keep:]
        self._after_newline = view[keep - 1 : keep] == b"\n"

    def hexdigest(self) -> str:
        if self._held or self._ended != len(self._headers):
            raise ToolFailed(
                f"psql's output stopped after {self._ended} of {len(self._headers)} tables"
            )
        return self._sha.hexdigest()

    def _rows(self, data: bytes) -> None:
        if not data:
            return
        if self._ended == len(self._headers):
            raise ToolFailed("psql printed something after the rows of the last table")
        self.rows += data.count(b"\n")
        self._sha.update(data)

    def _end_table(self) -> None:
        if self._ended == len(self._headers):
            raise ToolFailed("psql printed more end-of-table lines than there are tables")
        self._ended += 1
        if self._ended < len(self._headers):
            self._sha.update(self._headers[self._ended])


@dataclass(frozen=True)
class DigestPlan:
    """What the digest reads, decided in the exporting transaction: the tables, each one's
    header, and the psql script that prints their rows in that transaction's snapshot."""

    tables: list[str]
    headers: list[bytes]
    script: bytes
    client_encoding: str


async def _export_snapshot(conn: psycopg.AsyncConnection) -> str:
    cur = await conn.execute("SELECT pg_export_snapshot()")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def digest_plan(conn: psycopg.AsyncConnection, snapshot: str) -> DigestPlan:
    """The digest of the content ``conn``'s transaction sees (it exported ``snapshot`` and
    stays open until the digest has been read)."""
    tables = await user_tables(conn)
    headers: list[bytes] = []
    lines = [f"{statement};" for statement in CANONICAL_SESSION]
    lines.append("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;")
    use_snapshot = sql.SQL("SET TRANSACTION SNAPSHOT {};").format(sql.Literal(snapshot))
    lines.append(use_snapshot.as_string(conn))
    for table in tables:
        columns, query = await _table_query(conn, table)
        header = {"table": table.qualified, "columns": columns}
        headers.append(json.dumps(header).encode() + b"\n")
        lines += [query.as_string(conn) + ";", _ECHO_END]
    lines.append("COMMIT;")
    encoding = conn.info.parameter_status("client_encoding") or "UTF8"
    script = ("\n".join(lines) + "\n").encode()
    return DigestPlan([t.qualified for t in tables], headers, script, encoding)


async def read_digest(
    ref: DatabaseRef, plan: DigestPlan, progress: dict[str, object] | None = None
) -> tuple[str, list[str], int]:
    """sha256 over every user table (by schema and name) and its rows (by primary key) in COPY
    text form, read by one ``psql`` in the plan's snapshot.

    psql copies the rows out in C and we hash its output in 1 MiB reads: reading the same COPY
    through psycopg costs one Python round per row (3x slower at a million rows). The session
    gets the canonical settings and the client encoding of the session that planned it, so the
    bytes are the ones a psycopg session reads.
    """
    secret = password(ref)
    psql = _tool("psql")
    env = _tool_env(secret)
    env["PGCLIENTENCODING"] = plan.client_encoding
    proc = await asyncio.create_subprocess_exec(
        psql,
        "-X",
        "-q",
        "--no-password",
        "-v",
        "ON_ERROR_STOP=1",
        "-f",
        "-",
        f"--dbname={ref.dsn}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        limit=_READ_CHUNK,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(plan.script)  # buffered by the transport; psql reads it as it goes
    proc.stdin.close()
    errors = asyncio.ensure_future(proc.stderr.read())
    stream = DigestStream(plan.headers)
    try:
        while chunk := await proc.stdout.read(_READ_CHUNK):
            stream.feed(chunk)
            if progress is not None:
                progress["rows_read"] = stream.rows
        await proc.wait()
        err = await errors
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        errors.cancel()
        raise
    if proc.returncode != 0:
        raise _tool_error(proc.returncode, err, "psql (content digest)", secret)
    return stream.hexdigest(), plan.tables, stream.rows


async def live_digest(
    ref: DatabaseRef, progress: dict[str, object] | None = None
) -> tuple[str, list[str], int]:
    """The content digest of the live database, at one consistent point."""
    async with connect(ref) as conn:
        await conn.set_autocommit(False)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        async with conn.transaction():
            plan = await digest_plan(conn, await _export_snapshot(conn))
            return await read_digest(ref, plan, progress)


async def live_tables(ref: DatabaseRef) -> list[str]:
    """The user tables (``schema.table``) the database has now: a catalog read, no rows."""
    async with connect(ref) as conn:
        return [t.qualified for t in await user_tables(conn)]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolFailed(f"{name} not found on the worker's PATH (install the PostgreSQL client)")
    return path


def _tool_env(secret: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    env["PGAPPNAME"] = "breakglass-snapshots"
    if secret is not None:
        env["PGPASSWORD"] = secret
    return env


async def _wait(proc: asyncio.subprocess.Process, what: str, secret: str | None) -> None:
    """Wait for a tool; a cancelled activity kills it (the server rolls back its transaction)."""
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise _tool_error(proc.returncode, err, what, secret)


def _tool_error(
    returncode: int | None, err: bytes | None, what: str, secret: str | None
) -> SnapshotError:
    """A tool's failure from its stderr: a missing database or refused credentials are final,
    anything else is retried (bounded by the activity's policy)."""
    text = (err or b"").decode(errors="replace")[-2000:]
    error = _classify(text, f"{what} exited {returncode}", secret)
    return ToolFailed(str(error)) if isinstance(error, DatabaseUnavailable) else error


async def dump(
    ref: DatabaseRef, target: Path, progress: dict[str, object]
) -> tuple[str, list[str], int]:
    """``pg_dump --format=custom`` of one exported snapshot into ``target``; the content digest
    is read in that same snapshot while the dump runs, so both describe one consistent point."""
    secret = password(ref)
    pg_dump = _tool("pg_dump")
    async with connect(ref) as conn:
        await conn.set_autocommit(False)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        async with conn.transaction():
            snapshot = await _export_snapshot(conn)
            plan = await digest_plan(conn, snapshot)
            proc = await asyncio.create_subprocess_exec(
                pg_dump,
                "--format=custom",
                "--no-password",
                f"--snapshot={snapshot}",
                f"--lock-wait-timeout={LOCK_WAIT_TIMEOUT}",
                f"--file={target}",
                f"--dbname={ref.dsn}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=_tool_env(secret),
            )
            progress["phase"] = "pg_dump"
            waiting = asyncio.ensure_future(_wait(proc, "pg_dump", secret))
            try:
                # The exporting transaction stays open until pg_dump and psql have finished.
                result = await read_digest(ref, plan, progress)
                await waiting
            finally:
                if not waiting.done():
                    waiting.cancel()
                    with contextlib.suppress(BaseException):
                        await waiting
    return result


async def restore(ref: DatabaseRef, artifact: Path, drop: list[str]) -> None:
    """``pg_restore --clean --if-exists`` piped into ``psql --single-transaction``: the database
    keeps its identity (grants, settings, open sessions); others see the old or the new state.

    ``drop`` names tables created after the snapshot (``schema.table``): they are dropped in the
    same transaction, so the restored state is the snapshot's and nothing more.
    """
    secret = password(ref)
    pg_restore, psql = _tool("pg_restore"), _tool("psql")
    with tempfile.TemporaryDirectory(prefix="bg-restore-") as scratch:
        prelude = Path(scratch) / "prelude.sql"
        statements = []
        for qualified in drop:
            schema, _, name = qualified.partition(".")
            ident = '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
            statements.append(f"DROP TABLE IF EXISTS {ident} CASCADE;\n")
        prelude.write_text("".join(statements) or "SELECT 1;\n")
        read_end, write_end = os.pipe()
        try:
            producer = await asyncio.create_subprocess_exec(
                pg_restore,
                "--clean",
                "--if-exists",
                "--exit-on-error",
                "--file=-",
                str(artifact),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_end,
                stderr=asyncio.subprocess.PIPE,
            )
            consumer = await asyncio.create_subprocess_exec(
                psql,
                "-X",
                "-q",
                "--no-password",
                "-v",
                "ON_ERROR_STOP=1",
                "--single-transaction",
                "-f",
                str(prelude),
                "-f",
                "-",
                f"--dbname={ref.dsn}",
                stdin=read_end,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=_tool_env(secret),
            )
        finally:
            os.close(read_end)
            os.close(write_end)
        await asyncio.gather(
            _wait(consumer, "psql (restore)", secret), _wait(producer, "pg_restore", secret)
        )
