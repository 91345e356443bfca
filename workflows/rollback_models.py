"""Typed messages of the rollback saga, shared by the workflow, its activities and clients.

Frozen models; new fields get defaults so that old histories still decode.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator

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
    NOTIFY = "notify"


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
    failed_step: RollbackStep | None = None
    error: str = ""
    timeline: list[TimelineEntry] = Field(default_factory=list)


class RollbackStatus(Model):
    workflow_id: str
    current: RollbackStep | None
    awaiting_approval: bool
    approvals: list[str]
    timeline: list[TimelineEntry]
    report: RollbackReport | None = None
