"""Typed messages of the state-snapshot activities (snapshot, restore, checksum of a strategy's
state database), shared by workflows, activities and clients. No DB driver is imported here.

Every model is frozen; new fields must get defaults so that old histories still decode.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator, model_validator

from workflows.shared import Model

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""Strategy and environment names: they become folder names in the snapshot store."""
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,400}$"
ENV_VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
SNAPSHOT_ID_PATTERN = r"^snap-[0-9a-f]{24}$"

# key=value conninfo: `password = 'x'`, `password=x` (any case, any spacing).
_KV_PASSWORD = re.compile(r"(^|\s)password\s*=", re.IGNORECASE)


class DatabaseKind(StrEnum):
    SQLITE = "sqlite"
    """The embedded default: one file, snapshotted with SQLite's online backup API."""
    POSTGRES = "postgres"
    """A PostgreSQL database, snapshotted with ``pg_dump --format=custom``."""


class DatabaseRef(Model):
    """Where a strategy's state database lives. Never carries a password."""

    kind: DatabaseKind = DatabaseKind.SQLITE
    path: Path | None = None
    """SQLite: the database file (required for ``sqlite``)."""
    dsn: str | None = None
    """PostgreSQL: a libpq connection string or URI naming the database, without a password
    (required for ``postgres``), e.g. ``postgresql://strategy@db:5432/state``."""
    password_env: str | None = Field(default=None, pattern=ENV_VAR_PATTERN)
    """PostgreSQL: name of the environment variable (on the worker) holding the password;
    None: no password (trust, peer, certificate auth or ``~/.pgpass``)."""

    @field_validator("dsn")
    @classmethod
    def _dsn_has_no_password(cls, dsn: str | None) -> str | None:
        if dsn is None:
            return None
        if "://" in dsn:
            parts = urlsplit(dsn)
            query = {k.lower() for k in parse_qs(parts.query)}
            if parts.password is not None or "password" in query:
                raise ValueError("the DSN carries a password: name an env var in password_env")
        elif _KV_PASSWORD.search(dsn):
            raise ValueError("the DSN carries a password: name an env var in password_env")
        return dsn

    @model_validator(mode="after")
    def _fits_kind(self) -> DatabaseRef:
        if self.kind is DatabaseKind.SQLITE:
            if self.path is None or self.dsn is not None or self.password_env is not None:
                raise ValueError("a sqlite database is given by path only")
        elif self.dsn is None or self.path is not None:
            raise ValueError("a postgres database is given by dsn (and password_env) only")
        return self

    @property
    def label(self) -> str:
        """A printable name of the database (no password: there is none in the model)."""
        return str(self.path) if self.kind is DatabaseKind.SQLITE else str(self.dsn)


class SnapshotRequest(Model):
    strategy: str = Field(pattern=NAME_PATTERN)
    env: str = Field(pattern=NAME_PATTERN)
    version: str = Field(min_length=1, max_length=200)
    """The deployed version whose state this is (e.g. the version about to be replaced)."""
    database: DatabaseRef
    reason: str = Field(default="", max_length=500)
    idempotency_key: str = Field(pattern=IDEMPOTENCY_KEY_PATTERN)
    """Stable across retries of one step, e.g. ``<workflow id>/pre-deploy``: the same key gives
    the same snapshot id, so a retried activity returns the snapshot already taken."""


class SnapshotRecord(Model):
    """One snapshot in the catalog (and the snapshot activity's result)."""

    id: str = Field(pattern=SNAPSHOT_ID_PATTERN)
    strategy: str
    env: str
    version: str
    db_kind: DatabaseKind
    size_bytes: int
    checksum: str
    """sha256 of the artifact file; verified before every restore."""
    content_checksum: str
    """Digest of the logical content (every user table, rows in primary-key order, canonical
    values) at the snapshot's consistent point; ``state_db_checksum`` of the live database
    equals it right after a restore."""
    created_at: datetime
    path: Path
    """The artifact: a SQLite database file or a ``pg_dump`` custom-format archive."""
    reason: str = ""
    idempotency_key: str = ""
    database: DatabaseRef | None = None
    """The database the snapshot was taken from."""
    tables: list[str] = Field(default_factory=list)
    """User tables in the snapshot (``schema.table`` for PostgreSQL)."""
    rows: int = 0
    elapsed_s: float = 0.0
    reused: bool = False
    """Set on the activity's result only: the snapshot for this idempotency key already existed
    and its artifact verified, so nothing was taken again (a retried activity)."""


def snapshot_id(strategy: str, env: str, idempotency_key: str) -> str:
    """The snapshot id for a caller's idempotency key: the same step always names the same
    snapshot, and two strategies can never share one."""
    digest = hashlib.sha256(f"{strategy}\n{env}\n{idempotency_key}".encode()).hexdigest()
    return f"snap-{digest[:24]}"


class RestoreRequest(Model):
    snapshot_id: str = Field(pattern=SNAPSHOT_ID_PATTERN)
    strategy: str = Field(pattern=NAME_PATTERN)
    """Must be the snapshot's strategy: restoring another system's state is refused."""
    env: str = Field(pattern=NAME_PATTERN)
    """Must be the snapshot's environment (no prod snapshot into staging and vice versa)."""
    database: DatabaseRef
    reason: str = Field(default="", max_length=500)


class RestoreResult(Model):
    snapshot_id: str
    strategy: str
    env: str
    version: str
    """The version the restored state belongs to."""
    db_kind: DatabaseKind
    content_checksum: str
    """Of the live database after the restore: equal to the snapshot's (else the restore fails)."""
    content_checksum_before: str = ""
    """Empty: not measured. Restores no longer digest the database before writing it (a second
    full read on the rollback's path); results recorded before that carry the digest of what
    was replaced."""
    changed: bool = True
    """True: the snapshot's content was written. Every restore writes it, even over equal
    content (restoring is idempotent); False only in results recorded before that, when the
    database already held the snapshot's content and the restore was skipped."""
    method: str
    """How the content was put back, e.g. ``sqlite-backup-api`` or ``pg_restore-single-txn``."""
    dropped_tables: list[str] = Field(default_factory=list)
    """Tables created after the snapshot, dropped so the state equals the snapshot."""
    restored_at: datetime
    elapsed_s: float = 0.0


class ChecksumRequest(Model):
    database: DatabaseRef


class ContentChecksum(Model):
    db_kind: DatabaseKind
    content_checksum: str
    tables: list[str] = Field(default_factory=list)
    rows: int = 0
