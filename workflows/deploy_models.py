"""Models of deploys and rollbacks shared by workflows, target activities and clients."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StrategyRef(_Frozen):
    """One deployed system: a strategy in an environment (the runbook's business key)."""

    strategy: str
    env: str

    def __str__(self) -> str:
        return f"{self.strategy}/{self.env}"


class ActivateRequest(_Frozen):
    ref: StrategyRef
    version: str
    requested_by: str = "breakglass"
    """Who asked (operator or workflow id); recorded with the activation."""
    reason: str = ""


class ActivationRecord(_Frozen):
    """What one activation did; also the durable record kept in the target's state dir."""

    ref: StrategyRef
    version: str
    previous: str | None = None
    """The version that was current before (what a rollback returns to)."""
    activated_at: datetime
    requested_by: str = "breakglass"
    reason: str = ""
    already_active: bool = False
    """True when the version was already current and running: nothing changed."""
    switch_s: float = 0.0
    """Seconds from stopping the old version to the new one being started by the supervisor."""
    running_versions: list[str] = Field(default_factory=list)


class StopRequest(_Frozen):
    ref: StrategyRef
    requested_by: str = "breakglass"
    reason: str = ""


class StopResult(_Frozen):
    ref: StrategyRef
    stopped_versions: list[str] = Field(default_factory=list)
    """Versions that were running and are stopped now (empty: nothing was running)."""


class HealthRequest(_Frozen):
    ref: StrategyRef
    timeout_s: float = 2.0
    """Per-check HTTP timeout; a strategy that does not answer in time is unhealthy."""


class HealthReport(_Frozen):
    ref: StrategyRef
    healthy: bool
    checked_at: datetime
    version: str | None = None
    """Version the strategy itself reports on /healthz."""
    trading_state: str | None = None
    status_code: int | None = None
    process_state: str | None = None
    """Supervisor's view (RUNNING, BACKOFF, FATAL, STOPPED...) where the target has one."""
    detail: str = ""
    elapsed_s: float = 0.0


class CurrentVersion(_Frozen):
    ref: StrategyRef
    current: str | None = None
    previous: str | None = None
    running: list[str] = Field(default_factory=list)
