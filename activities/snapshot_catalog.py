"""The durable snapshot catalog: one SQLite file under the state dir recording every snapshot
(id, strategy, env, version, kind, size, checksums, time, artifact path). Blocking: use a thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from workflows.snapshot_models import SnapshotRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    env TEXT NOT NULL,
    version TEXT NOT NULL,
    db_kind TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    content_checksum TEXT NOT NULL,
    created_at TEXT NOT NULL,
    path TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_system ON snapshots (strategy, env, created_at);
"""


class SnapshotCatalog:
    """Each call opens its own connection, so any thread may use one instance."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0)
        conn.execute("PRAGMA synchronous=FULL")  # a recorded snapshot survives a power cut
        return conn

    def get(self, snapshot_id: str) -> SnapshotRecord | None:
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT record FROM snapshots WHERE id = ?", (snapshot_id,)
            ).fetchone()
        finally:
            conn.close()
        return SnapshotRecord.model_validate_json(row[0]) if row else None

    def add(self, record: SnapshotRecord) -> SnapshotRecord:
        """Record ``record`` unless its id is already there; returns the stored record (the
        first attempt wins when two attempts of one activity race)."""
        stored = record.model_copy(update={"reused": False})
        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "INSERT OR IGNORE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        stored.id,
                        stored.strategy,
                        stored.env,
                        stored.version,
                        stored.db_kind.value,
                        stored.size_bytes,
                        stored.checksum,
                        stored.content_checksum,
                        stored.created_at.isoformat(),
                        str(stored.path),
                        stored.model_dump_json(),
                    ),
                )
            row = conn.execute("SELECT record FROM snapshots WHERE id = ?", (stored.id,)).fetchone()
        finally:
            conn.close()
        return SnapshotRecord.model_validate_json(row[0])

    def remove(self, snapshot_id: str, path: Path) -> bool:
        """Forget a snapshot whose artifact is ``path`` (not one a racing attempt re-recorded)."""
        conn = self._connect()
        try:
            with conn:
                cur = conn.execute(
                    "DELETE FROM snapshots WHERE id = ? AND path = ?", (snapshot_id, str(path))
                )
        finally:
            conn.close()
        return cur.rowcount > 0

    def list(self, strategy: str | None = None, env: str | None = None) -> list[SnapshotRecord]:
        """Snapshots, newest first, optionally of one strategy and/or environment."""
        query = "SELECT record FROM snapshots WHERE (? IS NULL OR strategy = ?)"
        query += " AND (? IS NULL OR env = ?) ORDER BY created_at DESC, id"
        conn = self._connect()
        try:
            rows = conn.execute(query, (strategy, strategy, env, env)).fetchall()
        finally:
            conn.close()
        return [SnapshotRecord.model_validate_json(r[0]) for r in rows]
