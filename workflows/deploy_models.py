"""Models of deploys and rollbacks shared by workflows, target activities and clients."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

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
    action: Literal["activate", "promote"] = "activate"
    """``activate`` stopped every other version; ``promote`` made a running version current and
    left the others running (the old one stays warm for a route-back)."""


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
    version: str | None = None
    """The running version to probe (e.g. a candidate); None (default): the current one."""


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
    url: str | None = None
    """Where /healthz was asked (each running version answers on its own port)."""


class CurrentVersion(_Frozen):
    ref: StrategyRef
    current: str | None = None
    previous: str | None = None
    running: list[str] = Field(default_factory=list)


class CandidateRequest(_Frozen):
    """Start ``version`` beside the current one (blue/green); same fields as ActivateRequest."""

    ref: StrategyRef
    version: str
    requested_by: str = "breakglass"
    reason: str = ""


class CandidateRecord(_Frozen):
    """What starting a candidate did; ``current`` is unchanged by it."""

    ref: StrategyRef
    version: str
    current: str | None = None
    """The current version it runs beside (unchanged)."""
    started_at: datetime
    requested_by: str = "breakglass"
    reason: str = ""
    already_running: bool = False
    """True when the version was already running beside the current one: nothing changed."""
    process_state: str | None = None
    """Supervisor's view right after the start (STARTING until it has stayed up a while)."""
    port_file: str | None = None
    """Where the candidate writes its HTTP port (every side-by-side version has its own)."""
    running_versions: list[str] = Field(default_factory=list)


class RetireRequest(_Frozen):
    """Stop one version and remove it from the target (the warm old one, or a candidate)."""

    ref: StrategyRef
    version: str
    requested_by: str = "breakglass"
    reason: str = ""
    force: bool = False
    """Allow retiring the current version (default no: that is ``stop_strategy``'s job)."""


class RetireResult(_Frozen):
    ref: StrategyRef
    version: str
    stopped_versions: list[str] = Field(default_factory=list)
    """``[version]`` when it was running; empty when it was not."""
    already_retired: bool = False
    """True when the target had nothing of the version: nothing changed."""
    running_versions: list[str] = Field(default_factory=list)
    """What still runs afterwards."""


class VersionProcess(_Frozen):
    """One version's program under the target's process supervisor."""

    version: str
    state: str
    """Supervisor's state name: STARTING, RUNNING, BACKOFF, STOPPING, STOPPED, EXITED, FATAL."""
    pid: int | None = None
    port_file: str | None = None
    """Its own port file (versions started side by side); None: the target's configured port."""


class TargetView(_Frozen):
    """Everything a deploy target runs or remembers for one system."""

    ref: StrategyRef
    current: str | None = None
    previous: str | None = None
    candidate: str | None = None
    """Started beside the current one and neither promoted nor retired since."""
    running: list[str] = Field(default_factory=list)
    """Versions with a live (or starting, or stopping) process, sorted."""
    processes: list[VersionProcess] = Field(default_factory=list)
    """Every program of the system with its supervisor state, sorted by version."""
