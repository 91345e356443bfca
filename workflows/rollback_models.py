"""Typed messages of the rollback saga, shared by the workflow, its activities and clients.

Frozen models; new fields get defaults so that old histories still decode.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from workflows.deploy_models import StrategyRef
from workflows.shared import KillReport, Model, StepState
from workflows.snapshot_models import DatabaseRef, SnapshotRecord

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


def rollback_workflow_id(strategy: str, env: str) -> str:
    """One rollback per system at a time: the id carries the business key."""
    return f"rollback/{strategy}/{env}"


class FlattenMode(StrEnum):
    """The runbook's flatten policy (``flatten.mode``)."""

    AUTO = "auto"
    """Flatten positions right after cancelling orders, without asking."""
    APPROVE = "approve"
    """Ask the approvers; on timeout do what ``on_timeout`` says (the default)."""
    HOLD = "hold"
    """Never flatten: keep positions (orders are still cancelled)."""


class TradingState(StrEnum):
    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


class StepTimeouts(Model):
    """Start-to-close timeout of each saga step, in seconds (each bounded to 1 s … 2 h), and how
    soon a worker that died inside a step is noticed."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    snapshot_s: int = Field(default=600, ge=1, le=7200)
    """Taking a snapshot of the state database (default 600)."""
    restore_s: int = Field(default=900, ge=1, le=7200)
    """Restoring a snapshot (default 900)."""
    activate_s: int = Field(default=300, ge=1, le=7200)
    """Switching the target to a version and starting it (default 300)."""
    stop_s: int = Field(default=120, ge=1, le=7200)
    """Stopping the running version (default 120)."""
    cancel_s: int = Field(default=300, ge=1, le=7200)
    """Cancelling every open order (default 300)."""
    flatten_s: int = Field(default=600, ge=1, le=7200)
    """Flattening positions, once decided (default 600)."""
    heartbeat_s: int = Field(default=10, ge=1, le=300)
    """Every step heartbeats each second; after this long without one, the worker running it is
    taken for dead and the step is retried on another (default 10)."""


class RollbackInput(Model):
    strategy: str = Field(pattern=NAME_PATTERN)
    env: str = Field(pattern=NAME_PATTERN)
    target_version: str | None = None
    """Version to bring back; default: the deploy target's recorded previous version."""
    snapshot_id: str | None = None
    """Snapshot to restore; default: the newest snapshot taken of the target version."""
    reason: str = Field(min_length=3, max_length=500)
    requested_by: str = Field(min_length=1, max_length=100)


class RollbackPlan(Model):
    """Everything the saga needs, read once (from the runbook, the target and the catalog) at the
    start and kept in history, so a runbook edited mid-run cannot change a running rollback."""

    ref: StrategyRef
    accounts: list[str]
    database: DatabaseRef
    version_from: str | None
    version_to: str
    snapshot: SnapshotRecord
    flatten: FlattenMode = FlattenMode.AUTO
    approval_timeout_s: float = Field(default=900.0, gt=0)
    on_timeout: Literal["flatten", "hold"] = "flatten"
    approvers: list[str] = Field(default_factory=list)
    quorum: int = Field(default=1, ge=1)
    health_timeout_s: float = Field(default=60.0, gt=0)
    health_interval_s: float = Field(default=1.0, gt=0)
    timeouts: StepTimeouts = Field(default_factory=StepTimeouts)
    """The runbook's step timeouts (plans recorded before they existed decode to the defaults)."""


class SystemLocation(Model):
    """What a rollback finds from the runbook alone when it has no plan (the plan failed):
    enough to halt, stop and cancel the system."""

    ref: StrategyRef
    accounts: list[str]
    database: DatabaseRef
    timeouts: StepTimeouts = Field(default_factory=StepTimeouts)


class SafeStopReport(Model):
    """What a safe stop did, part by part (None: not done, or it failed: see ``failures``)."""

    found: bool = True
    """False: the system could not be found (no runbook); nothing was stopped."""
    halted: str | None = None
    """The trading-state change written to the strategy's database, e.g. ``ACTIVE -> HALTED``."""
    stopped_versions: list[str] | None = None
    """Versions the deploy target stopped ([]: none was running)."""
    orders_cancelled: int | None = None
    """Orders the cancel-all kill cancelled and verified gone (None: unknown)."""
    failures: list[str] = Field(default_factory=list)

    @property
    def stopped_nothing(self) -> bool:
        return self.halted is None and not self.stopped_versions and not self.orders_cancelled

    def summary(self) -> str:
        """One line for the operator: what was stopped, and what was not (why: the report's
        ``error``, which carries ``failures``)."""
        if not self.found:
            return "stopped nothing: the system could not be found"
        parts = [
            f"halted ({self.halted})" if self.halted is not None else "NOT halted",
            (
                f"stopped {', '.join(self.stopped_versions)}"
                if self.stopped_versions
                else "no version was running"
                if self.stopped_versions is not None
                else "NOT stopped"
            ),
            (
                f"{self.orders_cancelled} order(s) cancelled"
                if self.orders_cancelled is not None
                else "orders NOT verified cancelled"
            ),
        ]
        return ("stopped nothing: " if self.stopped_nothing else "") + ", ".join(parts)


class TradingStateRequest(Model):
    database: DatabaseRef
    state: TradingState
    who: str
    why: str


class TradingStateChange(Model):
    state: TradingState
    changed: bool
    message: str


class ApprovalDecision(Model):
    """Update ``approve_flatten``: one approver's decision (Slack or CLI)."""

    approver: str = Field(min_length=1, max_length=100)
    approve: bool = True
    note: str = ""

    @field_validator("approver")
    @classmethod
    def _strip(cls, approver: str) -> str:
        return approver.strip()


class ApprovalState(Model):
    approvals: list[str] = Field(default_factory=list)
    rejected_by: str | None = None
    decided: bool = False


class RollbackStep(StrEnum):
    PLAN = "plan"
    FREEZE = "freeze"
    STOP = "stop"
    CANCEL_ALL = "cancel_all"
    FLATTEN = "flatten"
    RESTORE = "restore"
    ACTIVATE = "activate"
    HEALTH = "health"
    RECONCILE = "reconcile"
    NOTIFY = "notify"


class ReconcileRequest(Model):
    """Make the strategy's database agree with the venue (the venue wins), then check it does."""

    database: DatabaseRef
    accounts: list[str]
    who: str
    why: str


class Correction(Model):
    """One row the reconcile changed: what the database said, what the venue said."""

    table: Literal["positions", "orders"]
    key: str
    """Exchange symbol (positions) or client order id (orders)."""
    database: str
    venue: str


class ReconcileResult(Model):
    corrections: list[Correction] = Field(default_factory=list)
    positions: dict[str, str] = Field(default_factory=dict)
    """Net position per exchange symbol, as both sides now agree (flat ones left out)."""
    open_orders: list[str] = Field(default_factory=list)
    """Client ids of orders open on the venue and in the database after the reconcile."""
    disagreements: list[str] = Field(default_factory=list)
    """What still differs after the corrections (empty: they agree)."""

    @property
    def agreed(self) -> bool:
        return not self.disagreements


class TimelineEntry(Model):
    step: RollbackStep
    state: StepState
    at: datetime
    detail: str = ""


class RollbackOutcome(StrEnum):
    ROLLED_BACK = "rolled-back"
    """The previous version runs, healthy, on the restored database."""
    SAFE_STOP = "safe-stop"
    """A step failed for good: trading HALTED, orders cancelled; the report says where."""


class RollbackReport(Model):
    workflow_id: str
    strategy: str
    env: str
    reason: str
    requested_by: str
    outcome: RollbackOutcome
    version_from: str | None = None
    version_to: str | None = None
    snapshot_id: str | None = None
    flatten: str = ""
    """What happened to positions: flattened, held (policy), held (rejected), held (timeout)..."""
    approvals: list[str] = Field(default_factory=list)
    kills: list[KillReport] = Field(default_factory=list)
    reconcile: ReconcileResult | None = None
    failed_step: RollbackStep | None = None
    error: str = ""
    safe_stop: SafeStopReport | None = None
    """What a safe stop halted, stopped and cancelled (None: no safe stop, or recorded before
    this field existed)."""
    timeline: list[TimelineEntry] = Field(default_factory=list)


class RollbackStatus(Model):
    workflow_id: str
    current: RollbackStep | None
    awaiting_approval: bool
    approvals: list[str]
    timeline: list[TimelineEntry]
    report: RollbackReport | None = None
