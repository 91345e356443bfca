"""SQLite state databases: consistent snapshots with the online backup API, restores through the
same API, and a canonical digest of the logical content. Blocking: run these in a thread."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from urllib.parse import quote

from activities.snapshot_errors import DatabaseMissing, DatabaseUnavailable, SnapshotError

BUSY_TIMEOUT_S = 30.0
"""How long a snapshot or restore waits for a writer's lock before giving up (and retrying)."""
_BATCH_ROWS = 10_000


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise DatabaseMissing(f"no SQLite database at {path}")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _mapped(error: sqlite3.Error, what: str) -> SnapshotError:
    text = str(error)
    if isinstance(error, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return DatabaseUnavailable(f"{what}: {text}")
    if isinstance(error, sqlite3.DatabaseError) and "not a database" in text:
        return DatabaseMissing(f"{what}: {text}")
    return DatabaseUnavailable(f"{what}: {type(error).__name__}: {text}")


def backup(source: Path, target: Path) -> None:
    """Copy ``source`` into a new file ``target`` at one consistent point.

    One backup step copies every page under a single read transaction: writers keep going in WAL
    mode (and wait at most the busy timeout otherwise). A stepped backup would restart each time
    a writer commits and may never finish under load, so the caller heartbeats instead.
    """
    try:
        src = _open_read_only(source)
        try:
            dst = sqlite3.connect(target, isolation_level=None)
            try:
                src.backup(dst, pages=-1)
                # A self-contained artifact: no -wal/-shm files appear next to it when read.
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise _mapped(e, f"snapshot of {source}") from e


def restore(artifact: Path, target: Path) -> None:
    """Replace the whole content of ``target`` with ``artifact`` in one write transaction.

    Other connections see the old or the new database, never a mix; tables created after the
    snapshot disappear with the rest of the old pages. A WAL database stays in WAL mode.
    """
    if not target.parent.is_dir():
        raise DatabaseMissing(f"no folder {target.parent} for the SQLite database {target.name}")
    try:
        src = _open_read_only(artifact)
        try:
            dst = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                src.backup(dst, pages=-1)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise _mapped(e, f"restore into {target}") from e


def _table_rows(conn: sqlite3.Connection, table: str) -> tuple[list[str], sqlite3.Cursor]:
    info = conn.execute(f"PRAGMA table_info({_quote(table)})").fetchall()
    columns = [str(row[1]) for row in info]
    pk = [str(row[1]) for row in sorted((r for r in info if r[5]), key=lambda r: r[5])]
    order = pk or columns  # without a primary key: every column, in declaration order
    select = ", ".join(_quote(c) for c in columns)
    by = ", ".join(_quote(c) for c in order)
    return columns, conn.execute(f"SELECT {select} FROM {_quote(table)} ORDER BY {by}")


def content_digest(path: Path) -> tuple[str, list[str], int]:
    """sha256 over every user table (by name) and its rows (by primary key), read in one
    transaction; returns the digest, the table names and the row count."""
    digest = hashlib.sha256(b"breakglass-content-v1 sqlite\n")
    rows = 0
    try:
        conn = _open_read_only(path)
        try:
            conn.execute("BEGIN")
            tables = [
                str(r[0])
                for r in conn.execute(
                    "SELECT name FROM sqlite_schema WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
                )
            ]
            for table in tables:
                columns, cursor = _table_rows(conn, table)
                digest.update(json.dumps({"table": table, "columns": columns}).encode() + b"\n")
                # One line per row: repr tells int, float (shortest exact form), text, blob and
                # NULL apart. Hashed a batch at a time: the same bytes, fewer Python rounds.
                while batch := cursor.fetchmany(_BATCH_ROWS):
                    rows += len(batch)
                    lines = "\n".join(map(repr, batch)) + "\n"
                    digest.update(lines.encode("utf-8", "surrogatepass"))
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise _mapped(e, f"checksum of {path}") from e
    return digest.hexdigest(), tables, rows
