"""What a deploy target must do; workflows only ever see this through TargetActivities."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from workflows.deploy_models import (
    ActivationRecord,
    CandidateRecord,
    HealthReport,
    RetireResult,
    StrategyRef,
    TargetView,
)


class TargetError(Exception):
    """A deploy target refused or failed; ``retryable`` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnknownRelease(TargetError):
    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@runtime_checkable
class DeployTarget(Protocol):
    """Runs one version of one strategy (``activate``), or, for a blue/green switch, a candidate
    beside it (``start_candidate`` → ``promote`` → ``retire`` the old one): never more than two.
    Which of two running versions may send orders is the trading lease's business, not the
    target's."""

    ref: StrategyRef

    async def activate(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> ActivationRecord:
        """Switch to ``version`` atomically (every other version stopped before it starts; one
        that already runs is kept as it runs); idempotent."""
        ...

    async def current(self) -> str | None: ...

    async def previous(self) -> str | None: ...

    async def stop(self) -> list[str]:
        """Stop whatever runs; returns the versions stopped. Idempotent."""
        ...

    async def start(self) -> list[str]:
        """Start the current version again (after ``stop``); returns what runs."""
        ...

    async def health(self, timeout_s: float = 2.0, version: str | None = None) -> HealthReport:
        """One look at ``version``'s health endpoint (default: the current version's)."""
        ...

    async def running_versions(self) -> list[str]: ...

    async def start_candidate(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> CandidateRecord:
        """Start ``version`` beside the current one, on its own health port; ``current`` stays.
        Idempotent. Refuses (not retryable) the current version, an unknown release
        (``UnknownRelease``) and a second version beside the current one."""
        ...

    async def promote(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> ActivationRecord:
        """Make a running version current atomically, recording the old current as previous,
        without stopping it (it stays warm for a route-back). Idempotent. Refuses a version
        that is not running."""
        ...

    async def retire(
        self,
        version: str,
        *,
        requested_by: str = "breakglass",
        reason: str = "",
        force: bool = False,
    ) -> RetireResult:
        """Stop ``version`` and remove it from the target. Idempotent. Refuses the current
        version unless ``force``."""
        ...

    async def versions(self) -> TargetView:
        """Current, previous, candidate and every program with its process state."""
        ...
