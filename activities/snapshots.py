"""State-snapshot activities: snapshot a strategy's state database before a deployment, restore
it on rollback, and digest its logical content so "restored equals snapshot" can be checked.

A snapshot is named by the caller's idempotency key, so a retried activity finds the snapshot it
already took; a restore verifies the artifact's sha256 first and the live content afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity

from activities import db_postgres, db_sqlite
from activities.heartbeat import heartbeating
from activities.snapshot_catalog import SnapshotCatalog
from activities.snapshot_errors import (
    ArtifactCorrupted,
    RestoreNotVerified,
    SnapshotError,
    SnapshotMismatch,
    SnapshotNotFound,
    as_application_error,
)
from workflows.snapshot_models import (
    ChecksumRequest,
    ContentChecksum,
    DatabaseKind,
    DatabaseRef,
    RestoreRequest,
    RestoreResult,
    SnapshotRecord,
    SnapshotRequest,
    snapshot_id,
)

log = logging.getLogger(__name__)

ARTIFACT_SUFFIX = {DatabaseKind.SQLITE: ".sqlite", DatabaseKind.POSTGRES: ".pgdump"}
RESTORE_METHOD = {
    DatabaseKind.SQLITE: "sqlite-backup-api",
    DatabaseKind.POSTGRES: "pg_restore-clean-single-txn",
}
_CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 and size (blocking)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_and_publish(tmp: Path, final: Path) -> None:
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _as_activity_errors() -> Iterator[None]:
    """Domain errors leave as ApplicationErrors that name the class and say if retrying helps."""
    try:
        yield
    except SnapshotError as e:
        raise as_application_error(e) from None


async def content_checksum(
    database: DatabaseRef, progress: dict[str, object] | None = None
) -> tuple[str, list[str], int]:
    """Digest of the live database's logical content, read at one consistent point; ``progress``
    gets the rows read so far (PostgreSQL)."""
    if database.kind is DatabaseKind.SQLITE:
        assert database.path is not None
        return await asyncio.to_thread(db_sqlite.content_digest, database.path)
    return await db_postgres.live_digest(database, progress)


class SnapshotActivities:
    """Snapshots of strategy state databases; the worker wires one instance with the catalog and
    the folder artifacts are written to (``<store_dir>/<strategy>/<env>/``)."""

    def __init__(self, catalog: SnapshotCatalog, store_dir: Path) -> None:
        self.catalog = catalog
        self.store_dir = store_dir

    # ------------------------------------------------------------------ snapshot

    @activity.defn(name="snapshot_state_db")
    async def snapshot(self, request: SnapshotRequest) -> SnapshotRecord:
        """Take a consistent snapshot of the state database (or return the one this idempotency
        key already took, if its artifact still verifies)."""
        sid = snapshot_id(request.strategy, request.env, request.idempotency_key)
        progress: dict[str, object] = {"snapshot_id": sid, "phase": "catalog"}
        with _as_activity_errors():
            async with heartbeating(progress):
                existing = await asyncio.to_thread(self.catalog.get, sid)
                if existing is not None:
                    if await self._artifact_verifies(existing):
                        log.info("snapshot %s already taken for this key: reusing it", sid)
                        return existing.model_copy(update={"reused": True})
                    log.warning("snapshot %s: artifact missing or corrupted, taking it again", sid)
                    await asyncio.to_thread(self.catalog.remove, sid, existing.path)
                    existing.path.unlink(missing_ok=True)
                return await self._take(sid, request, progress)

    async def _take(
        self, sid: str, request: SnapshotRequest, progress: dict[str, object]
    ) -> SnapshotRecord:
        started = time.monotonic()
        database = request.database
        folder = self.store_dir / request.strategy / request.env
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        # One file per attempt: two racing attempts never write the same file.
        final = folder / f"{sid}-{uuid.uuid4().hex[:8]}{ARTIFACT_SUFFIX[database.kind]}"
        tmp = final.with_name(final.name + ".part")
        try:
            if database.kind is DatabaseKind.SQLITE:
                assert database.path is not None
                progress["phase"] = "sqlite-backup"
                await asyncio.to_thread(db_sqlite.backup, database.path, tmp)
                progress["phase"] = "checksum"
                content, tables, rows = await asyncio.to_thread(db_sqlite.content_digest, tmp)
            else:
                content, tables, rows = await db_postgres.dump(database, tmp, progress)
            progress["phase"] = "sha256"
            checksum, size = await asyncio.to_thread(sha256_file, tmp)
            await asyncio.to_thread(_fsync_and_publish, tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        record = SnapshotRecord(
            id=sid,
            strategy=request.strategy,
            env=request.env,
            version=request.version,
            db_kind=database.kind,
            size_bytes=size,
            checksum=checksum,
            content_checksum=content,
            created_at=datetime.now(UTC),
            path=final,
            reason=request.reason,
            idempotency_key=request.idempotency_key,
            database=database,
            tables=tables,
            rows=rows,
            elapsed_s=round(time.monotonic() - started, 4),
        )
        stored = await asyncio.to_thread(self.catalog.add, record)
        if stored.path != final:
            final.unlink(missing_ok=True)  # a racing attempt recorded its artifact first
            return stored.model_copy(update={"reused": True})
        log.info(
            "snapshot %s of %s/%s (%s, %s): %d tables, %d rows, %d bytes in %.2fs",
            sid,
            request.strategy,
            request.env,
            database.kind.value,
            database.label,
            len(tables),
            rows,
            size,
            record.elapsed_s,
        )
        return stored

    async def _artifact_verifies(self, record: SnapshotRecord) -> bool:
        if not record.path.is_file():
            return False
        checksum, size = await asyncio.to_thread(sha256_file, record.path)
        return checksum == record.checksum and size == record.size_bytes

    # ------------------------------------------------------------------ restore

    @activity.defn(name="restore_state_db")
    async def restore(self, request: RestoreRequest) -> RestoreResult:
        """Put the snapshot's content back into the state database, after checking that the
        snapshot is this system's and its artifact is intact; verified by content checksum.

        Idempotent: restoring the same snapshot again leaves the same content (and writes it
        again: the result's ``changed`` is always True). Halt the strategy first: a writer that
        keeps going makes the verification fail.
        """
        started = time.monotonic()
        progress: dict[str, object] = {"snapshot_id": request.snapshot_id, "phase": "verify"}
        with _as_activity_errors():
            async with heartbeating(progress):
                record = await self._restorable(request)
                database = request.database
                # No digest before: restoring is idempotent, so it always runs and the digest
                # after it is the proof. One before would only tell whether the write was
                # needed, for a second full read of the database on the rollback's path.
                progress["phase"] = "restore"
                dropped: list[str] = []
                if database.kind is DatabaseKind.SQLITE:
                    assert database.path is not None
                    await asyncio.to_thread(db_sqlite.restore, record.path, database.path)
                else:
                    live_tables = await db_postgres.live_tables(database)
                    dropped = sorted(set(live_tables) - set(record.tables))
                    await db_postgres.restore(database, record.path, dropped)
                progress["phase"] = "checksum-after"
                after, _, _ = await content_checksum(database, progress)
                if after != record.content_checksum:
                    raise RestoreNotVerified(
                        f"{database.label} after restoring {record.id}: content {after[:16]}…, "
                        f"snapshot {record.content_checksum[:16]}… (is something still writing?)"
                    )
        result = RestoreResult(
            snapshot_id=record.id,
            strategy=record.strategy,
            env=record.env,
            version=record.version,
            db_kind=record.db_kind,
            content_checksum=after,
            method=RESTORE_METHOD[record.db_kind],
            dropped_tables=dropped,
            restored_at=datetime.now(UTC),
            elapsed_s=round(time.monotonic() - started, 4),
        )
        log.warning(
            "restored %s/%s %s to snapshot %s (version %s)%s in %.2fs",
            record.strategy,
            record.env,
            database.label,
            record.id,
            record.version,
            f", dropped {', '.join(dropped)}" if dropped else "",
            result.elapsed_s,
        )
        return result

    async def _restorable(self, request: RestoreRequest) -> SnapshotRecord:
        """The snapshot, if it may be restored here: every refusal happens before any write."""
        record = await asyncio.to_thread(self.catalog.get, request.snapshot_id)
        if record is None:
            raise SnapshotNotFound(f"no snapshot {request.snapshot_id} in the catalog")
        if (record.strategy, record.env) != (request.strategy, request.env):
            raise SnapshotMismatch(
                f"snapshot {record.id} belongs to {record.strategy}/{record.env}, "
                f"not {request.strategy}/{request.env}"
            )
        if record.db_kind is not request.database.kind:
            raise SnapshotMismatch(
                f"snapshot {record.id} is of a {record.db_kind.value} database, "
                f"not {request.database.kind.value}"
            )
        if not record.path.is_file():
            raise SnapshotNotFound(f"the artifact of snapshot {record.id} is gone: {record.path}")
        checksum, size = await asyncio.to_thread(sha256_file, record.path)
        if checksum != record.checksum:
            raise ArtifactCorrupted(
                f"snapshot {record.id}: artifact sha256 {checksum[:16]}… ({size} bytes), "
                f"recorded {record.checksum[:16]}… ({record.size_bytes} bytes); not restoring"
            )
        return record

    # ------------------------------------------------------------------ checksum

    @activity.defn(name="state_db_checksum")
    async def checksum(self, request: ChecksumRequest) -> ContentChecksum:
        """Digest of the live database's logical content (comparable with a snapshot's)."""
        with _as_activity_errors():
            progress: dict[str, object] = {"phase": "checksum"}
            async with heartbeating(progress):
                digest, tables, rows = await content_checksum(request.database, progress)
        return ContentChecksum(
            db_kind=request.database.kind, content_checksum=digest, tables=tables, rows=rows
        )
