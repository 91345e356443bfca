"""The snapshot adapters' error vocabulary: what a failed snapshot or restore means for the caller
(retry as is, or stop and tell a human). Messages never contain a password."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError


class SnapshotError(Exception):
    """A snapshot, restore or checksum failed; ``retryable`` says whether trying again can help."""

    retryable = False


class SnapshotNotFound(SnapshotError):
    """No snapshot with this id in the catalog (or its artifact file is gone)."""


class SnapshotMismatch(SnapshotError):
    """The snapshot belongs to another strategy, environment or kind of database."""


class ArtifactCorrupted(SnapshotError):
    """The artifact's sha256 is not the one recorded: it must not be restored."""


class DatabaseMissing(SnapshotError):
    """The database to snapshot does not exist (a wrong path or database name)."""


class DatabaseRefused(SnapshotError):
    """The server refused us for good: bad credentials, missing privilege, missing password env."""


class DatabaseUnavailable(SnapshotError):
    """The server could not be reached or the database was busy: a later attempt may work."""

    retryable = True


class ToolFailed(SnapshotError):
    """``pg_dump``/``pg_restore``/``psql`` exited non-zero; retried (bounded by the policy)."""

    retryable = True


class RestoreNotVerified(SnapshotError):
    """The restore ran but the live content is not the snapshot's: something still writes to
    the database (halt the strategy first), or the restore is incomplete."""


def scrub(message: str, *secrets: str | None) -> str:
    """Replace any secret text in a message; keep it short enough for a history event."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message[:1000]


def as_application_error(error: SnapshotError) -> ApplicationError:
    """Temporal sees the domain class name and whether a retry can help."""
    kind = type(error).__name__
    return ApplicationError(str(error), type=kind, non_retryable=not error.retryable)
