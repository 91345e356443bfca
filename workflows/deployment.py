"""The deployment workflow: staging validation → snapshot → shadow → capital canary judged on
trading metrics → promotion approval → fenced handover → monitoring → retire the old version.

It either fully succeeds (the new version holds the trading lease, the old one is retired after
the runbook's delay) or fully fails: before the first switch nothing in production changed (the
candidate is retired); after it, the rollback saga runs as a child and brings the previous version
back. The first switch is the first moment the candidate may send an order (the first canary
step, or the handover when the runbook has no canary).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from workflows.analysis_models import AnalysisPolicy, AnalysisResult, MetricSeries, Verdict
    from workflows.deploy_models import (
        ActivateRequest,
        ActivationRecord,
        CandidateRecord,
        CandidateRequest,
        HealthReport,
        HealthRequest,
        RetireRequest,
        RetireResult,
    )
    from workflows.deployment_models import (
        AllocationRequest,
        CandidateBake,
        CheckRequest,
        CheckResult,
        DeployInput,
        DeployOutcome,
        DeployPlan,
        DeployReport,
        DeployStatus,
        HandoverRequest,
        HandoverResult,
        JudgeRequest,
        PauseDecision,
        SampleRequest,
        ShadowReport,
        Stage,
        StageNode,
    )
    from workflows.failures import failure_message
    from workflows.rollback import RollbackWorkflow
    from workflows.rollback_models import (
        ApprovalDecision,
        ApprovalState,
        RollbackInput,
        RollbackOutcome,
        RollbackReport,
        rollback_workflow_id,
    )
    from workflows.shared import NotifyRequest, StepState
    from workflows.snapshot_models import SnapshotRecord, SnapshotRequest

STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=15),
    maximum_attempts=10,
)
CHECK_RETRY = RetryPolicy(maximum_attempts=2)
"""A staging check is a measurement: retried once for a lost worker, not until it passes."""
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=5))
SHORT_STEP = timedelta(seconds=30)
HEALTH_POLL = timedelta(seconds=1)
TRY_CANCEL = workflow.ActivityCancellationType.TRY_CANCEL
SNAPSHOT_PER_RUN_PATCH = "pre-deploy-snapshot-per-run"
"""Runs recorded before keyed their pre-deploy snapshot on the workflow id alone, which every
deploy of a system shares: every deploy after the first reused the first snapshot."""


class DeployFailed(Exception):
    """A stage failed for good, or a human said stop (workflow-internal)."""

    def __init__(self, stage: Stage, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@workflow.defn(name="Deploy")
class DeployWorkflow:
    def __init__(self) -> None:
        self._input: DeployInput | None = None
        self._plan: DeployPlan | None = None
        self._stage: Stage | None = None
        self._tree: dict[Stage, StageNode] = {s: StageNode(name=s.value) for s in Stage}
        self._switched = False
        self._handed_over = False
        self._baseline: MetricSeries | None = None
        self._candidate_started = False
        self._awaiting_approval = False
        self._approval = ApprovalState()
        self._paused: str | None = None
        self._pause_decision: PauseDecision | None = None
        self._last_verdict: Verdict | None = None
        self._report: DeployReport | None = None
        self._told: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ messages

    @workflow.query(name="status")
    def status(self) -> DeployStatus:
        return DeployStatus(
            workflow_id=workflow.info().workflow_id,
            stage=self._stage,
            paused=self._paused,
            awaiting_approval=self._awaiting_approval,
            approvals=self._approval.approvals,
            last_verdict=self._last_verdict,
            tree=list(self._tree.values()),
            report=self._report,
        )

    @workflow.update(name="approve_promotion")
    async def approve_promotion(self, decision: ApprovalDecision) -> ApprovalState:
        if decision.approve:
            approvals = [*self._approval.approvals, decision.approver]
            plan = self._plan
            decided = plan is not None and len(set(approvals)) >= plan.quorum
            self._approval = ApprovalState(approvals=approvals, decided=decided)
        else:
            self._approval = ApprovalState(
                approvals=self._approval.approvals, rejected_by=decision.approver, decided=True
            )
        return self._approval

    @approve_promotion.validator
    def _validate_approval(self, decision: ApprovalDecision) -> None:
        """Refused here, a request never enters history (four eyes, runbook approvers only)."""
        if self._plan is None or self._input is None or not self._awaiting_approval:
            raise ApplicationError("no promotion approval is pending", type="NotPending")
        self._check_approver(decision.approver, "approve their own deployment")
        if decision.approver in self._approval.approvals:
            raise ApplicationError(f"{decision.approver!r} already approved", type="Duplicate")

    @workflow.update(name="resume")
    async def resume(self, decision: PauseDecision) -> str:
        self._pause_decision = decision
        return "proceeding" if decision.proceed else "aborting"

    @resume.validator
    def _validate_resume(self, decision: PauseDecision) -> None:
        if self._paused is None or self._pause_decision is not None:
            raise ApplicationError("the deployment is not paused", type="NotPending")
        if decision.proceed:  # going on needs four eyes; stopping is everyone's right
            self._check_approver(decision.by, "overrule the analysis of their own deployment")

    def _check_approver(self, who: str, what: str) -> None:
        plan, request = self._plan, self._input
        assert plan is not None and request is not None
        if who == request.requested_by:
            raise ApplicationError(f"the requester cannot {what}", type="Unauthorized")
        if who not in plan.approvers:
            raise ApplicationError(f"{who!r} is not an approver of {plan.ref}", type="Unauthorized")

    # ------------------------------------------------------------------ the deployment

    @workflow.run
    async def run(self, request: DeployInput) -> DeployReport:
        self._input = request
        self._draft = DeployReport(
            workflow_id=workflow.info().workflow_id,
            strategy=request.strategy,
            env=request.env,
            version_to=request.version,
            requested_by=request.requested_by,
            reason=request.reason,
            outcome=DeployOutcome.PROMOTED,
        )
        try:
            await self._deploy(request)
        except DeployFailed as failure:
            await self._fail(request, failure)
        report = self._draft.model_copy(update={"tree": list(self._tree.values())})
        self._report = report
        await self._notify_end(report)
        await asyncio.gather(*self._told, return_exceptions=True)
        self._report = report.model_copy(update={"tree": list(self._tree.values())})
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._report

    def _record(self, **fields: Any) -> None:
        self._draft = self._draft.model_copy(update=fields)

    async def _deploy(self, request: DeployInput) -> None:
        plan: DeployPlan = await self._stage_run(
            Stage.PLAN,
            workflow.execute_activity(
                "plan_deploy",
                request,
                result_type=DeployPlan,
                start_to_close_timeout=SHORT_STEP,
                retry_policy=RetryPolicy(maximum_attempts=3),
            ),
            lambda p: f"{p.version_from} -> {p.version_to}",
        )
        self._plan = plan
        self._record(version_from=plan.version_from)
        await self._validate(plan)
        info = workflow.info()
        # One snapshot per deploy: the run id tells this deploy from the earlier ones under the
        # same workflow id, and stays the same across the activity's retries.
        key = (
            f"{info.workflow_id}/{info.run_id}/pre-deploy"
            if workflow.patched(SNAPSHOT_PER_RUN_PATCH)
            else f"{info.workflow_id}/pre-deploy"
        )
        snapshot: SnapshotRecord = await self._stage_run(
            Stage.SNAPSHOT,
            self._activity(
                "snapshot_state_db",
                SnapshotRequest(
                    strategy=plan.ref.strategy,
                    env=plan.ref.env,
                    version=plan.version_from or "none",
                    database=plan.database,
                    reason=f"before deploying {plan.version_to}",
                    idempotency_key=key,
                ),
                SnapshotRecord,
                timeout=timedelta(seconds=plan.timeouts.snapshot_s),
            ),
            lambda r: f"{r.id} ({r.size_bytes} bytes)",
        )
        self._record(snapshot_id=snapshot.id)
        await self._shadow(plan)
        for number, step in enumerate(plan.canary, start=1):
            await self._canary_step(plan, number, step.capital, step.bake_s)
        await self._approval_gate(plan)
        await self._promote(plan)
        await self._monitor(plan)
        await self._retire_old(plan)

    # ------------------------------------------------------------------ stages

    async def _validate(self, plan: DeployPlan) -> None:
        if plan.staging is None or not plan.checks:
            self._mark(Stage.VALIDATE, StepState.SKIPPED, "no staging checks in the runbook")
            return
        self._mark(Stage.VALIDATE, StepState.RUNNING, f"in {plan.staging}")
        results: list[CheckResult] = []
        for check in plan.checks:
            self._child(Stage.VALIDATE, check, StepState.RUNNING)
            try:
                result: CheckResult = await workflow.execute_activity(
                    "staging_check",
                    CheckRequest(ref=plan.staging, version=plan.version_to, check=check),
                    result_type=CheckResult,
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=timedelta(seconds=plan.timeouts.heartbeat_s),
                    retry_policy=CHECK_RETRY,
                )
            except (ActivityError, ApplicationError) as e:
                result = CheckResult(check=check, passed=False, detail=failure_message(e))
            results.append(result)
            self._record(checks=results)
            state = StepState.DONE if result.passed else StepState.FAILED
            self._child(Stage.VALIDATE, check, state, result.detail)
            if not result.passed:
                self._mark(Stage.VALIDATE, StepState.FAILED, f"{check}: {result.detail}")
                raise DeployFailed(Stage.VALIDATE, f"staging check {check} failed: {result.detail}")
        self._mark(Stage.VALIDATE, StepState.DONE, f"{len(results)} checks passed")

    async def _shadow(self, plan: DeployPlan) -> None:
        self._mark(Stage.SHADOW, StepState.RUNNING, f"starting {plan.version_to} beside")
        if plan.version_from is not None:
            # No lease row means "the single running version sends": before a second version
            # runs beside it, the live one must hold the lease by name (fenced like any grant;
            # a no-op once it holds it). The candidate then only shadows.
            await self._activity(
                "handover_lease",
                HandoverRequest(
                    ref=plan.ref,
                    database=plan.database,
                    accounts=plan.accounts,
                    from_version=None,
                    to_version=plan.version_from,
                    reason=f"deploy {workflow.info().workflow_id}: {plan.version_from} holds "
                    f"the lease while {plan.version_to} shadows",
                ),
                HandoverResult,
                timeout=timedelta(seconds=plan.timeouts.cancel_s),
                stage=Stage.SHADOW,
            )
        await self._activity(
            "start_candidate",
            CandidateRequest(
                ref=plan.ref,
                version=plan.version_to,
                requested_by=workflow.info().workflow_id,
                reason="shadow",
            ),
            CandidateRecord,
            timeout=timedelta(seconds=plan.timeouts.activate_s),
            stage=Stage.SHADOW,
        )
        self._candidate_started = True
        await self._wait_healthy(plan, plan.version_to, Stage.SHADOW)
        shadow = self._activity(
            "bake_shadow",
            CandidateBake(
                ref=plan.ref,
                baseline=plan.version_from,
                candidate=plan.version_to,
                bake_s=plan.shadow_bake_s,
                database=plan.database,
            ),
            ShadowReport,
            timeout=timedelta(seconds=plan.shadow_bake_s + 120),
            stage=Stage.SHADOW,
        )
        if plan.canary and plan.version_from is not None and plan.shadow_bake_s > 0:
            # The live version's trading series of the same minutes: the canary's baseline.
            report, self._baseline = await asyncio.gather(
                shadow, self._sample(plan, plan.version_from, plan.shadow_bake_s, Stage.SHADOW)
            )
        else:
            report = await shadow
        self._record(shadow=report)
        detail = f"{report.agreement:.0%} agreement over {report.decisions_compared} decisions"
        if report.agreement < plan.min_shadow_agreement:
            self._mark(Stage.SHADOW, StepState.FAILED, detail)
            raise DeployFailed(
                Stage.SHADOW,
                f"shadow decisions agree {detail}, below the runbook's "
                f"{plan.min_shadow_agreement:.0%}",
            )
        self._mark(Stage.SHADOW, StepState.DONE, detail)

    async def _canary_step(
        self, plan: DeployPlan, number: int, capital: float, bake_s: float
    ) -> None:
        name = f"step {number}: {capital:.0%} of capital"
        self._mark(Stage.CANARY, StepState.RUNNING, name)
        self._child(Stage.CANARY, name, StepState.RUNNING, f"baking {bake_s:.0f}s")
        assert plan.analysis is not None, "a runbook with canary steps has an analysis policy"
        await self._allocate(plan, capital, f"canary {name}")
        if not self._handed_over:
            await self._handover(plan)  # from here on the candidate trades: failing rolls back
        canary = await self._sample(plan, plan.version_to, bake_s, Stage.CANARY)
        baseline = self._baseline or MetricSeries(version=plan.version_from or "none")
        result: AnalysisResult = await self._activity(
            "judge_canary",
            JudgeRequest(policy=plan.analysis, baseline=baseline, canary=canary),
            AnalysisResult,
            stage=Stage.CANARY,
        )
        self._record(analyses=[*self._draft.analyses, result])
        self._last_verdict = result.verdict
        if result.verdict is Verdict.PASS:
            self._child(Stage.CANARY, name, StepState.DONE, result.summary)
            if number == len(plan.canary):
                self._mark(Stage.CANARY, StepState.DONE, f"{number} steps passed")
            return
        if result.verdict is Verdict.FAIL:
            self._child(Stage.CANARY, name, StepState.FAILED, result.summary)
            self._mark(Stage.CANARY, StepState.FAILED, result.summary)
            raise DeployFailed(Stage.CANARY, f"canary {name}: {result.summary}")
        # INCONCLUSIVE or NODATA: a human decides, within the runbook's pause timeout.
        self._child(Stage.CANARY, name, StepState.RUNNING, f"paused: {result.summary}")
        decision = await self._pause(
            plan, f"canary {name} {result.verdict.value}: {result.summary}"
        )
        self._child(
            Stage.CANARY, name, StepState.DONE, f"{result.summary}; continued by {decision.by}"
        )

    async def _pause(self, plan: DeployPlan, why: str) -> PauseDecision:
        self._stage = Stage.CANARY  # a handover inside the step may have been the last to start
        self._paused = why
        self._pause_decision = None
        self._tell(f"PAUSED — {why}. `breakglass promote|abort {workflow.info().workflow_id}`")
        try:
            await workflow.wait_condition(
                lambda: self._pause_decision is not None,
                timeout=timedelta(seconds=plan.pause_timeout_s),
            )
        except TimeoutError:
            self._paused = None
            raise DeployFailed(Stage.CANARY, f"{why}; nobody decided in time") from None
        self._paused = None
        decision = self._pause_decision
        assert decision is not None
        if not decision.proceed:
            raise DeployFailed(Stage.CANARY, f"aborted by {decision.by}: {decision.note or why}")
        return decision

    async def _approval_gate(self, plan: DeployPlan) -> None:
        self._awaiting_approval = True
        self._mark(
            Stage.APPROVAL,
            StepState.RUNNING,
            f"awaiting {plan.quorum} approval(s) from {', '.join(plan.approvers)}",
        )
        try:
            await workflow.wait_condition(
                lambda: self._approval.decided,
                timeout=timedelta(seconds=plan.approval_timeout_s),
            )
        except TimeoutError:
            self._awaiting_approval = False
            self._mark(Stage.APPROVAL, StepState.FAILED, "timed out: denied")
            raise DeployFailed(Stage.APPROVAL, "promotion approval timed out (denied)") from None
        self._awaiting_approval = False
        self._record(approvals=self._approval.approvals)
        if self._approval.rejected_by is not None:
            self._mark(
                Stage.APPROVAL, StepState.FAILED, f"rejected by {self._approval.rejected_by}"
            )
            raise DeployFailed(
                Stage.APPROVAL, f"promotion rejected by {self._approval.rejected_by}"
            )
        self._mark(Stage.APPROVAL, StepState.DONE, ", ".join(self._approval.approvals))

    async def _handover(self, plan: DeployPlan) -> None:
        """The first switch: the lease moves, fenced, from the live version to the new one."""
        self._switched = True
        result: HandoverResult = await self._stage_run(
            Stage.HANDOVER,
            self._activity(
                "handover_lease",
                HandoverRequest(
                    ref=plan.ref,
                    database=plan.database,
                    accounts=plan.accounts,
                    from_version=plan.version_from,
                    to_version=plan.version_to,
                    reason=f"deploy {workflow.info().workflow_id}",
                ),
                HandoverResult,
                timeout=timedelta(seconds=plan.timeouts.cancel_s),
            ),
            lambda r: f"epoch {r.epoch} to {r.holder} in {r.handover_s:.2f}s",
        )
        self._handed_over = True
        self._record(handover=result)

    async def _promote(self, plan: DeployPlan) -> None:
        if not self._handed_over:
            await self._handover(plan)
        await self._allocate(plan, 1.0, "promoted")
        await self._stage_run(
            Stage.PROMOTE,
            self._activity(
                "promote_version",
                ActivateRequest(
                    ref=plan.ref,
                    version=plan.version_to,
                    requested_by=workflow.info().workflow_id,
                    reason="promoted",
                ),
                ActivationRecord,
            ),
            lambda r: f"{r.version} is current; {r.previous or plan.version_from} stays warm",
        )

    async def _allocate(self, plan: DeployPlan, capital: float, why: str) -> None:
        await self._activity(
            "set_allocation",
            AllocationRequest(
                database=plan.database,
                version=plan.version_to,
                capital=capital,
                who=workflow.info().workflow_id,
                why=why,
            ),
            float,
            stage=Stage.CANARY if capital < 1 else Stage.PROMOTE,
        )

    async def _sample(
        self,
        plan: DeployPlan,
        version: str,
        bake_s: float,
        stage: Stage,
        cancellation: workflow.ActivityCancellationType = TRY_CANCEL,
    ) -> MetricSeries:
        series: MetricSeries = await self._activity(
            "sample_metrics",
            SampleRequest(ref=plan.ref, version=version, bake_s=bake_s),
            MetricSeries,
            timeout=timedelta(seconds=bake_s + 120),
            stage=stage,
            cancellation=cancellation,
        )
        return series

    async def _monitor(self, plan: DeployPlan) -> None:
        """The promoted version alone, window by window: its health every second and the
        runbook's hard gates on each window's trading series. A release that behaved while it
        was judged against the old one and fails later is caught here, while the old version
        is still warm: the failure path rolls back to it."""
        policy = plan.monitor_policy()
        count = math.ceil(plan.monitor_s / plan.monitor_window_s)
        gates = f"{len(policy.gates)} gate(s)" if policy else "no gates in the runbook"
        self._mark(
            Stage.MONITOR,
            StepState.RUNNING,
            f"{plan.version_to} alone for {plan.monitor_s:.0f}s: health, {gates}",
        )
        for number in range(1, count + 1):
            window_s = plan.monitor_s / count
            name = f"window {number}/{count}: {window_s:.0f}s"
            self._child(Stage.MONITOR, name, StepState.RUNNING, "sampling")
            try:
                series = await self._watch(plan, window_s)
                detail = await self._judge_window(policy, series)
            except DeployFailed as failure:
                self._child(Stage.MONITOR, name, StepState.FAILED, str(failure))
                raise DeployFailed(
                    Stage.MONITOR, f"{plan.version_to} after promotion, {name}: {failure}"
                ) from None
            self._child(Stage.MONITOR, name, StepState.DONE, detail)
        try:
            await self._healthy_after_promotion(plan)
        except DeployFailed as failure:
            raise DeployFailed(
                Stage.MONITOR, f"{plan.version_to} after promotion, at the end: {failure}"
            ) from None
        self._mark(Stage.MONITOR, StepState.DONE, f"{plan.version_to} healthy, no gate violated")

    async def _watch(self, plan: DeployPlan, window_s: float) -> MetricSeries:
        """One window's trading series of the promoted version, its health polled meanwhile (a
        crash is noticed within a second, not at the end of the window)."""
        # Abandoned, not cancelled, when health fails first: a read-only scrape may run out on
        # its own, and a cancel racing its completion is refused by the time-skipping test
        # server (ACTIVITY_UNKNOWN), which then never completes the workflow task.
        sampling = asyncio.ensure_future(
            self._sample(
                plan,
                plan.version_to,
                window_s,
                Stage.MONITOR,
                workflow.ActivityCancellationType.ABANDON,
            )
        )
        try:
            while True:
                await self._healthy_after_promotion(plan)
                try:
                    await workflow.wait_condition(sampling.done, timeout=HEALTH_POLL)
                except TimeoutError:
                    continue
                series: MetricSeries = await sampling
                return series
        finally:
            sampling.cancel()  # a no-op once it finished; else the scrape is abandoned

    async def _judge_window(self, policy: AnalysisPolicy | None, series: MetricSeries) -> str:
        if policy is None:
            return f"{series.trades} fills; no gates to judge"
        # The canary's judge on a gates-only policy: only hard gates count, nothing compares.
        result: AnalysisResult = await self._activity(
            "judge_canary",
            JudgeRequest(policy=policy, baseline=MetricSeries(), canary=series),
            AnalysisResult,
            stage=Stage.MONITOR,
        )
        self._record(monitoring=[*self._draft.monitoring, result])
        if result.verdict is Verdict.FAIL:
            violated = "; ".join(g.reason for g in result.gates if g.verdict is Verdict.FAIL)
            raise DeployFailed(Stage.MONITOR, violated)
        # NODATA or a gate without samples (nothing sent in the window) is no failure here.
        return f"{series.trades} fills; {result.summary}"

    async def _healthy_after_promotion(self, plan: DeployPlan) -> None:
        health: HealthReport = await self._activity(
            "check_health", HealthRequest(ref=plan.ref), HealthReport, stage=Stage.MONITOR
        )
        if not (health.healthy and health.version == plan.version_to):
            running = "" if health.version == plan.version_to else f" ({health.version} answers)"
            raise DeployFailed(Stage.MONITOR, f"unhealthy{running}: {health.detail}")

    async def _retire_old(self, plan: DeployPlan) -> None:
        if plan.version_from is None:
            self._mark(Stage.RETIRE, StepState.SKIPPED, "nothing ran before")
            return
        self._mark(
            Stage.RETIRE, StepState.RUNNING, f"{plan.version_from} warm for {plan.retire_delay_s}s"
        )
        await workflow.sleep(timedelta(seconds=plan.retire_delay_s))
        await self._stage_run(
            Stage.RETIRE,
            self._activity(
                "retire_version",
                RetireRequest(
                    ref=plan.ref,
                    version=plan.version_from,
                    requested_by=workflow.info().workflow_id,
                    reason="retired after the warm delay",
                ),
                RetireResult,
                stage=Stage.RETIRE,
            ),
            lambda r: f"stopped {', '.join(r.stopped_versions) or 'nothing'}",
        )

    async def _wait_healthy(self, plan: DeployPlan, version: str, stage: Stage) -> None:
        deadline = workflow.now() + timedelta(seconds=plan.health_timeout_s)
        last: HealthReport | None = None
        while workflow.now() < deadline:
            last = await self._activity(
                "check_health",
                HealthRequest(ref=plan.ref, version=version),
                HealthReport,
                stage=stage,
            )
            if last.healthy:
                return
            await workflow.sleep(HEALTH_POLL)
        raise DeployFailed(stage, f"{version} not healthy: {last.detail if last else 'no answer'}")

    # ------------------------------------------------------------------ failure

    async def _fail(self, request: DeployInput, failure: DeployFailed) -> None:
        self._mark(failure.stage, StepState.FAILED, str(failure))
        plan = self._plan
        if not self._switched or plan is None:
            # Nothing in production traded on the new version: retire the candidate and stop.
            if self._candidate_started and plan is not None:
                try:
                    await self._activity(
                        "retire_version",
                        RetireRequest(
                            ref=plan.ref,
                            version=plan.version_to,
                            requested_by=workflow.info().workflow_id,
                            reason=f"rejected: {failure}"[:200],
                        ),
                        RetireResult,
                        stage=Stage.RETIRE,
                    )
                except DeployFailed as e:
                    failure = DeployFailed(failure.stage, f"{failure} | retire failed: {e}")
            self._record(
                outcome=DeployOutcome.REJECTED, failed_stage=failure.stage, error=str(failure)
            )
            return
        rollback_id = rollback_workflow_id(plan.ref.strategy, plan.ref.env)
        self._record(rollback_workflow_id=rollback_id)
        self._mark(Stage.ROLLBACK, StepState.RUNNING, rollback_id)
        try:
            rolled: RollbackReport = await workflow.execute_child_workflow(
                RollbackWorkflow.run,
                RollbackInput(
                    strategy=plan.ref.strategy,
                    env=plan.ref.env,
                    target_version=plan.version_from,
                    snapshot_id=self._draft.snapshot_id,
                    reason=f"deploy of {plan.version_to} failed at {failure.stage.value}: "
                    f"{failure}"[:500],
                    requested_by=request.requested_by,
                ),
                id=rollback_id,
                execution_timeout=timedelta(hours=6),
            )
        except ChildWorkflowError as e:
            self._mark(Stage.ROLLBACK, StepState.FAILED, failure_message(e))
            self._record(
                outcome=DeployOutcome.ROLLBACK_FAILED,
                failed_stage=failure.stage,
                error=f"{failure} | rollback failed: {failure_message(e)}",
            )
            return
        ok = rolled.outcome is RollbackOutcome.ROLLED_BACK
        self._mark(
            Stage.ROLLBACK,
            StepState.DONE if ok else StepState.FAILED,
            f"{rolled.outcome.value}: {rolled.version_from} -> {rolled.version_to}",
        )
        self._record(
            outcome=DeployOutcome.ROLLED_BACK if ok else DeployOutcome.ROLLBACK_FAILED,
            failed_stage=failure.stage,
            error=str(failure) + ("" if ok else f" | rollback: {rolled.error}"),
        )

    # ------------------------------------------------------------------ plumbing

    def _activity(
        self,
        name: str,
        arg: Any,
        result_type: type,
        timeout: timedelta = SHORT_STEP,
        stage: Stage | None = None,
        cancellation: workflow.ActivityCancellationType = TRY_CANCEL,
    ) -> Awaitable[Any]:
        """One activity, heartbeating (a dead worker is noticed within the runbook's
        ``heartbeat_s``); a failure after its retries fails ``stage``."""
        plan = self._plan
        heartbeat = timedelta(seconds=plan.timeouts.heartbeat_s if plan else 10)
        call = workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=timeout,
            heartbeat_timeout=heartbeat,
            retry_policy=STEP_RETRY,
            cancellation_type=cancellation,
        )
        if stage is None:
            return call

        async def failing_as_stage() -> Any:
            try:
                return await call
            except (ActivityError, ApplicationError) as e:
                raise DeployFailed(stage, f"{name}: {failure_message(e)}") from None

        return failing_as_stage()

    async def _stage_run(
        self, stage: Stage, call: Awaitable[Any], describe: Callable[[Any], str]
    ) -> Any:
        self._mark(stage, StepState.RUNNING)
        try:
            result = await call
        except (ActivityError, ApplicationError) as e:
            raise DeployFailed(stage, failure_message(e)) from None
        self._mark(stage, StepState.DONE, describe(result))
        return result

    def _mark(self, stage: Stage, state: StepState, detail: str = "") -> None:
        node = self._tree[stage]
        now = workflow.now()
        self._tree[stage] = node.model_copy(
            update={
                "state": state,
                "detail": detail,
                "started_at": node.started_at or now,
                "finished_at": None if state is StepState.RUNNING else now,
            }
        )
        if state is StepState.RUNNING:
            self._stage = stage
        if state is not StepState.RUNNING or stage is Stage.APPROVAL:
            self._tell(f"{stage.value}: {state.value}" + (f" — {detail}" if detail else ""))

    def _child(self, stage: Stage, name: str, state: StepState, detail: str = "") -> None:
        node = self._tree[stage]
        now = workflow.now()
        children = [c for c in node.children if c.name != name]
        before = next((c for c in node.children if c.name == name), None)
        child = StageNode(
            name=name,
            state=state,
            detail=detail,
            started_at=before.started_at if before else now,
            finished_at=None if state is StepState.RUNNING else now,
        )
        index = next((i for i, c in enumerate(node.children) if c.name == name), len(children))
        children.insert(index, child)
        self._tree[stage] = node.model_copy(update={"children": children})

    def _tell(self, text: str) -> None:
        """Tell people without waiting on the channel; collected before the workflow ends."""
        request = self._input
        title = f"Deploy {request.strategy}/{request.env}" if request else "Deploy"
        self._told.append(
            asyncio.ensure_future(
                workflow.execute_activity(
                    "notify",
                    NotifyRequest(title=title, text=text),
                    result_type=int,
                    start_to_close_timeout=SHORT_STEP,
                    retry_policy=NOTIFY_RETRY,
                )
            )
        )

    async def _notify_end(self, report: DeployReport) -> None:
        severity = {
            DeployOutcome.PROMOTED: "info",
            DeployOutcome.REJECTED: "warning",
            DeployOutcome.ROLLED_BACK: "warning",
            DeployOutcome.ROLLBACK_FAILED: "critical",
        }[report.outcome]
        text = f"{report.version_from} -> {report.version_to}: {report.outcome.value}"
        if report.error:
            text += f"; {report.error}"
        if report.rollback_workflow_id:
            text += f"; rollback {report.rollback_workflow_id}"
        try:
            await workflow.execute_activity(
                "notify",
                NotifyRequest(
                    title=f"Deploy {report.outcome.value}: {report.strategy}/{report.env}",
                    text=text,
                    severity=severity,
                ),
                result_type=int,
                start_to_close_timeout=SHORT_STEP,
                retry_policy=NOTIFY_RETRY,
            )
            self._mark(Stage.NOTIFY, StepState.DONE)
        except ActivityError as e:
            self._mark(Stage.NOTIFY, StepState.FAILED, failure_message(e))
