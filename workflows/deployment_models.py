"""Typed messages of the deployment workflow (issue 4), shared by the workflow, its activities
and clients. Target-level messages (activate, candidate, health) live in ``deploy_models``.

Frozen models; new fields get defaults so that old histories still decode.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from workflows.analysis_models import AnalysisPolicy, AnalysisResult, MetricSeries, Verdict
from workflows.deploy_models import StrategyRef
from workflows.rollback_models import NAME_PATTERN, ApprovalDecision, StepTimeouts
from workflows.shared import Model, StepState
from workflows.snapshot_models import DatabaseRef

__all__ = ["ApprovalDecision"]  # the promotion approval is the same decision as the flatten's


def deploy_workflow_id(strategy: str, env: str) -> str:
    """One deployment per system at a time: the id carries the business key."""
    return f"deploy/{strategy}/{env}"


class DeployInput(Model):
    strategy: str = Field(pattern=NAME_PATTERN)
    env: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
    """A release name: what the deploy target's release folder is called."""
    reason: str = Field(min_length=3, max_length=500)
    requested_by: str = Field(min_length=1, max_length=100)


class CanaryStep(Model):
    """One canary step: the new version trades this share of the capital (notional and position
    caps) for ``bake_s``, then its trading metrics are judged against the running version's."""

    capital: float = Field(gt=0, le=1)
    bake_s: float = Field(gt=0, le=86_400)


class DeployPlan(Model):
    """Read once from the runbook and the deploy target, kept in history."""

    ref: StrategyRef
    staging: StrategyRef | None
    """Where the release is validated first (None: the runbook names no staging env)."""
    accounts: list[str]
    database: DatabaseRef
    version_from: str | None
    version_to: str
    checks: list[str] = Field(default_factory=list)
    """Staging checks, in order (each one activity run, pass/fail with measurements)."""
    shadow_bake_s: float = Field(default=30.0, ge=0)
    min_shadow_agreement: float = Field(default=0.9, ge=0, le=1)
    canary: list[CanaryStep] = Field(default_factory=list)
    analysis: AnalysisPolicy | None = None
    pause_timeout_s: float = Field(default=1800.0, gt=0)
    """How long an inconclusive analysis waits for a human before the deployment aborts."""
    approvers: list[str] = Field(default_factory=list)
    quorum: int = Field(default=1, ge=1)
    approval_timeout_s: float = Field(default=3600.0, gt=0)
    monitor_s: float = Field(default=60.0, ge=0)
    """Post-promotion monitoring: health and hard gates on the new version alone."""
    monitor_window_s: float = Field(default=10.0, gt=0)
    """Monitoring judges the hard gates once per window this long (``monitor_s`` is split into
    equal windows no longer than this): a fault that starts late is caught within a window."""
    retire_delay_s: float = Field(default=300.0, ge=0)
    """The old version stays warm this long after the handover (route-back is instant)."""
    health_timeout_s: float = Field(default=60.0, gt=0)
    timeouts: StepTimeouts = Field(default_factory=StepTimeouts)

    def monitor_policy(self) -> AnalysisPolicy | None:
        """The analysis policy's hard gates alone, for post-promotion monitoring: the old version
        no longer trades, so there is no baseline to compare with and no trade minimum. None: the
        runbook has no gates (monitoring checks health only)."""
        if self.analysis is None or not self.analysis.gates:
            return None
        return AnalysisPolicy(gates=self.analysis.gates, min_trades=0)


class Stage(StrEnum):
    PLAN = "plan"
    VALIDATE = "validate"
    SNAPSHOT = "snapshot"
    SHADOW = "shadow"
    HANDOVER = "handover"
    """The trading lease moves to the new version (at the first canary step, else after the
    approval): the first switch."""
    CANARY = "canary"
    APPROVAL = "approval"
    PROMOTE = "promote"
    MONITOR = "monitor"
    RETIRE = "retire"
    ROLLBACK = "rollback"
    NOTIFY = "notify"


class StageNode(Model):
    """One node of the status tree (``breakglass status`` draws it like Argo Rollouts)."""

    name: str
    state: StepState = StepState.PENDING
    detail: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    children: list[StageNode] = Field(default_factory=list)


class CheckRequest(Model):
    """One staging check of the release (``staging_check`` activity)."""

    ref: StrategyRef
    version: str
    check: str


class CheckResult(Model):
    check: str
    passed: bool
    detail: str = ""
    measurements: dict[str, float] = Field(default_factory=dict)


class CandidateBake(Model):
    """Shadow or canary bake of the candidate against the running version."""

    ref: StrategyRef
    baseline: str | None
    candidate: str
    capital: float = 0.0
    """0: shadow (decides, sends nothing); >0: share of capital the candidate trades."""
    bake_s: float
    database: DatabaseRef | None = None
    """The strategy's database, where both versions log their decisions."""


class SampleRequest(Model):
    """Scrape one version's /metrics every ``interval_s`` for ``bake_s``: its trading series."""

    ref: StrategyRef
    version: str
    bake_s: float = Field(gt=0)
    interval_s: float = Field(default=2.0, gt=0)


class JudgeRequest(Model):
    policy: AnalysisPolicy
    baseline: MetricSeries
    canary: MetricSeries


class AllocationRequest(Model):
    """The share of capital (notional and position caps) ``version`` trades from now on."""

    database: DatabaseRef
    version: str
    capital: float = Field(gt=0, le=1)
    who: str
    why: str


class ShadowReport(Model):
    decisions_compared: int
    agreement: float
    """Share of the live version's decisions the candidate made too (same side, same symbol)."""
    detail: str = ""


class AnalysisRequest(Model):
    bake: CandidateBake
    policy: AnalysisPolicy


class HandoverRequest(Model):
    """Move the single trading lease of every account from one version to another (fenced)."""

    ref: StrategyRef
    database: DatabaseRef
    accounts: list[str]
    from_version: str | None
    to_version: str
    reason: str


class HandoverResult(Model):
    epoch: int
    holder: str
    orders_cancelled: int = 0
    handover_s: float = 0.0


class PauseDecision(Model):
    """Update ``resume``: a human's answer to a paused (inconclusive) canary step."""

    by: str = Field(min_length=1, max_length=100)
    proceed: bool
    note: str = ""


class DeployOutcome(StrEnum):
    PROMOTED = "promoted"
    """The new version holds the lease and runs; the old one was retired after the delay."""
    REJECTED = "rejected"
    """Stopped before anything reached production (staging, shadow); nothing changed there."""
    ROLLED_BACK = "rolled-back"
    """Failed after the first switch: the rollback saga brought the previous version back."""
    ROLLBACK_FAILED = "rollback-failed"
    """The rollback saga itself stopped safely (HALTED, nothing open): a human takes over."""


class DeployReport(Model):
    workflow_id: str
    strategy: str
    env: str
    version_from: str | None = None
    version_to: str
    requested_by: str
    reason: str
    outcome: DeployOutcome
    failed_stage: Stage | None = None
    error: str = ""
    checks: list[CheckResult] = Field(default_factory=list)
    snapshot_id: str | None = None
    shadow: ShadowReport | None = None
    analyses: list[AnalysisResult] = Field(default_factory=list)
    """The canary steps' analyses, in order."""
    monitoring: list[AnalysisResult] = Field(default_factory=list)
    """The hard gates judged on the promoted version, one per monitoring window."""
    approvals: list[str] = Field(default_factory=list)
    handover: HandoverResult | None = None
    rollback_workflow_id: str | None = None
    """The rollback saga this deployment started (``breakglass status`` follows it)."""
    tree: list[StageNode] = Field(default_factory=list)


class DeployStatus(Model):
    workflow_id: str
    stage: Stage | None
    paused: str | None = None
    """Why the deployment waits for a human (inconclusive analysis), if it does."""
    awaiting_approval: bool = False
    approvals: list[str] = Field(default_factory=list)
    last_verdict: Verdict | None = None
    tree: list[StageNode] = Field(default_factory=list)
    report: DeployReport | None = None
