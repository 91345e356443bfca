"""What a deploy target must do; workflows only ever see this through TargetActivities."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from workflows.deploy_models import ActivationRecord, HealthReport, StrategyRef


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
    """Runs exactly one version of one strategy at a time."""

    ref: StrategyRef

    async def activate(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> ActivationRecord:
        """Switch to ``version`` atomically (old stopped before new starts); idempotent."""
        ...

    async def current(self) -> str | None: ...

    async def previous(self) -> str | None: ...

    async def stop(self) -> list[str]:
        """Stop whatever runs; returns the versions stopped. Idempotent."""
        ...

    async def start(self) -> list[str]:
        """Start the current version again (after ``stop``); returns what runs."""
        ...

    async def health(self, timeout_s: float = 2.0) -> HealthReport: ...

    async def running_versions(self) -> list[str]: ...
