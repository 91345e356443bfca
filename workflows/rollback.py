"""The rollback saga: freeze → stop → cancel_all → flatten (per policy) → restore → activate →
health → reconcile → notify, for one strategy in one environment.

Orders are cancelled and positions flattened by the kill switch itself, run as child workflows,
so there is one implementation of the money-safety rules. If a step fails for good, the saga
stops in a safe state (trading HALTED, the bad version stopped, every order cancelled) and says
exactly where it stopped; it never starts a second version while another one runs (the deploy
target stops before it starts).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from workflows.deploy_models import (
        ActivateRequest,
        ActivationRecord,
        HealthReport,
        HealthRequest,
        StopRequest,
        StopResult,
    )
    from workflows.failures import failure_message
    from workflows.kill_switch import KillSwitchWorkflow
    from workflows.rollback_models import (
        ApprovalDecision,
        ApprovalState,
        FlattenMode,
        ReconcileRequest,
        ReconcileResult,
        RollbackInput,
        RollbackOutcome,
        RollbackPlan,
        RollbackReport,
        RollbackStatus,
        RollbackStep,
        SafeStopReport,
        StepTimeouts,
        SystemLocation,
        TimelineEntry,
        TradingState,
        TradingStateChange,
        TradingStateRequest,
    )
    from workflows.shared import (
        KillOutcome,
        KillReport,
        KillScope,
        KillSwitchInput,
        NotifyRequest,
        StepState,
    )
    from workflows.snapshot_models import RestoreRequest, RestoreResult

STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=15),
    maximum_attempts=10,
)
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=5))
SHORT_STEP = timedelta(seconds=30)
"""Start-to-close of the steps that only read or write a row (state, health probe, plan)."""
PLAN_HEARTBEAT = timedelta(seconds=5)
"""The plan brings the runbook's heartbeat timeout; the plan step itself uses this one."""
RECONCILE_PATCH = "reconcile-before-active"
"""Runs recorded before the reconcile step existed replay without it."""
TOGETHER_PATCH = "venue-and-restore-together"
"""Runs recorded before replay their sequential unwind (and two kills under ``auto``)."""
LOCATE_PATCH = "safe-stop-without-plan"
"""Runs recorded before: a safe stop whose plan had failed did nothing at all."""
DEAD_MAN_PATCH = "rollback-kill-without-dead-man"
"""Runs recorded before armed the venue's dead-man switch in every child kill."""


def _system(plan: RollbackPlan) -> SystemLocation:
    """The part of a plan a kill and a safe stop need."""
    return SystemLocation(
        ref=plan.ref, accounts=plan.accounts, database=plan.database, timeouts=plan.timeouts
    )


def _cancelled(kill: KillReport) -> int | None:
    """Orders a kill cancelled over its accounts; None when one account's count is unknown."""
    counts = [a.orders_cancelled for a in kill.accounts]
    return None if None in counts else sum(c or 0 for c in counts)


class StepFailed(Exception):
    """A saga step failed after its retries (workflow-internal)."""

    def __init__(self, step: RollbackStep, message: str) -> None:
        super().__init__(message)
        self.step = step


@workflow.defn(name="Rollback")
class RollbackWorkflow:
    def __init__(self) -> None:
        self._input: RollbackInput | None = None
        self._plan: RollbackPlan | None = None
        self._located: SystemLocation | None = None
        """The system as its runbook names it, when the plan failed (a safe stop's target)."""
        self._current: RollbackStep | None = None
        self._timeline: list[TimelineEntry] = []
        self._awaiting_approval = False
        self._approval = ApprovalState()
        self._report: RollbackReport | None = None
        self._told: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ messages

    @workflow.query(name="status")
    def status(self) -> RollbackStatus:
        return RollbackStatus(
            workflow_id=workflow.info().workflow_id,
            current=self._current,
            awaiting_approval=self._awaiting_approval,
            approvals=self._approval.approvals,
            timeline=self._timeline,
            report=self._report,
        )

    @workflow.update(name="approve_flatten")
    async def approve_flatten(self, decision: ApprovalDecision) -> ApprovalState:
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

    @approve_flatten.validator
    def _validate_approval(self, decision: ApprovalDecision) -> None:
        """Refused here, a request never enters history (four eyes, runbook approvers only)."""
        plan, request = self._plan, self._input
        if plan is None or request is None or not self._awaiting_approval:
            raise ApplicationError("no flatten approval is pending", type="NotPending")
        if decision.approver == request.requested_by:
            raise ApplicationError(
                "the requester cannot approve their own rollback", type="Unauthorized"
            )
        if decision.approver not in plan.approvers:
            raise ApplicationError(
                f"{decision.approver!r} is not an approver of {plan.ref}", type="Unauthorized"
            )
        if decision.approver in self._approval.approvals:
            raise ApplicationError(f"{decision.approver!r} already approved", type="Duplicate")

    # ------------------------------------------------------------------ the saga

    @workflow.run
    async def run(self, request: RollbackInput) -> RollbackReport:
        self._input = request
        self._draft = RollbackReport(
            workflow_id=workflow.info().workflow_id,
            strategy=request.strategy,
            env=request.env,
            reason=request.reason,
            requested_by=request.requested_by,
            outcome=RollbackOutcome.ROLLED_BACK,
        )
        try:
            await self._saga(request)
        except StepFailed as failure:
            await self._safe_stop(request, failure)
        report = self._draft
        await self._notify(report)
        await asyncio.gather(*self._told, return_exceptions=True)
        self._report = report.model_copy(update={"timeline": self._timeline})
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._report

    def _record(self, **fields: Any) -> None:
        """Into the report as soon as it is known: a safe stop reports everything done before."""
        self._draft = self._draft.model_copy(update=fields)

    async def _saga(self, request: RollbackInput) -> None:
        plan = await self._run(
            RollbackStep.PLAN,
            workflow.execute_activity(
                "plan_rollback",
                request,
                result_type=RollbackPlan,
                start_to_close_timeout=SHORT_STEP,
                heartbeat_timeout=PLAN_HEARTBEAT,
                retry_policy=RetryPolicy(maximum_attempts=3),
            ),
            lambda p: f"{p.version_from} -> {p.version_to}, snapshot {p.snapshot.id}",
        )
        self._plan = plan
        self._record(
            version_from=plan.version_from, version_to=plan.version_to, snapshot_id=plan.snapshot.id
        )
        why = f"rollback {workflow.info().workflow_id}: {request.reason}"
        # Soft stop first (only reducing orders), then hard stop: the strategy obeys its database.
        for state in (TradingState.REDUCING, TradingState.HALTED):
            await self._set_trading_state(plan, state, request.requested_by, why)
        await self._run(
            RollbackStep.STOP,
            self._activity(
                "stop_strategy",
                StopRequest(ref=plan.ref, reason=why),
                StopResult,
                timeout=timedelta(seconds=plan.timeouts.stop_s),
            ),
            lambda r: f"stopped {', '.join(r.stopped_versions) or 'nothing (none running)'}",
        )
        if workflow.patched(TOGETHER_PATCH):
            # Nothing of the strategy runs now: the venue and the database are unwound at the
            # same time (a restore does not wait for an approval, nor a flatten for a restore).
            # Both branches finish before anything else happens, failed or not.
            outcomes = await asyncio.gather(
                self._unwind_venue(plan, request, one_kill=True),
                self._restore(plan, why),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        else:
            await self._unwind_venue(plan, request, one_kill=False)
            await self._restore(plan, why)
        # The restored database carries the trading state of its time: hold it HALTED until the
        # previous version is up and healthy, then let it trade.
        await self._set_trading_state(plan, TradingState.HALTED, request.requested_by, why)
        await self._run(
            RollbackStep.ACTIVATE,
            self._activity(
                "activate_version",
                ActivateRequest(
                    ref=plan.ref,
                    version=plan.version_to,
                    requested_by=request.requested_by,
                    reason=why,
                ),
                ActivationRecord,
                timeout=timedelta(seconds=plan.timeouts.activate_s),
            ),
            lambda r: f"{r.version} running ({r.switch_s:.2f}s switch)",
        )
        await self._wait_healthy(plan)
        if workflow.patched(RECONCILE_PATCH):
            self._record(reconcile=await self._reconcile(plan, request.requested_by, why))
        await self._set_trading_state(plan, TradingState.ACTIVE, request.requested_by, why)

    # ------------------------------------------------------------------ steps

    async def _unwind_venue(
        self, plan: RollbackPlan, request: RollbackInput, *, one_kill: bool
    ) -> None:
        """Every order cancelled, then positions flattened per policy; each verified on the venue
        by the kill switch. With ``auto`` one flatten kill does both (it cancels first)."""
        if one_kill and plan.flatten is FlattenMode.AUTO:
            self._mark(RollbackStep.CANCEL_ALL, StepState.RUNNING, "by the flatten kill")
            kill = await self._kill(_system(plan), request, KillScope.FLATTEN, RollbackStep.FLATTEN)
            cancelled = _cancelled(kill)
            detail = (
                f"{'?' if cancelled is None else cancelled} cancelled, verified by the flatten kill"
            )
            self._mark(RollbackStep.CANCEL_ALL, StepState.DONE, detail)
            self._record(flatten="flattened", kills=[kill])
            return
        kill = await self._kill(
            _system(plan), request, KillScope.CANCEL_ONLY, RollbackStep.CANCEL_ALL
        )
        self._record(kills=[kill])
        flatten, kills = await self._flatten(plan, request)
        self._record(
            flatten=flatten,
            kills=self._draft.kills + kills,
            approvals=self._approval.approvals,
        )

    async def _restore(self, plan: RollbackPlan, why: str) -> None:
        await self._run(
            RollbackStep.RESTORE,
            self._activity(
                "restore_state_db",
                RestoreRequest(
                    snapshot_id=plan.snapshot.id,
                    strategy=plan.ref.strategy,
                    env=plan.ref.env,
                    database=plan.database,
                    reason=why,
                ),
                RestoreResult,
                timeout=timedelta(seconds=plan.timeouts.restore_s),
            ),
            lambda r: f"content {r.content_checksum[:12]} ({'restored' if r.changed else 'same'})",
        )

    async def _flatten(
        self, plan: RollbackPlan, request: RollbackInput
    ) -> tuple[str, list[KillReport]]:
        policy = plan.flatten
        if policy is FlattenMode.HOLD:
            self._mark(RollbackStep.FLATTEN, StepState.SKIPPED, "held: runbook policy is hold")
            return "held (policy)", []
        if policy is FlattenMode.APPROVE:
            self._awaiting_approval = True
            self._mark(
                RollbackStep.FLATTEN,
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
                if plan.on_timeout == "hold":
                    self._mark(RollbackStep.FLATTEN, StepState.SKIPPED, "held: approval timed out")
                    return "held (approval timed out)", []
                self._mark(
                    RollbackStep.FLATTEN, StepState.RUNNING, "approval timed out: runbook flattens"
                )
            self._awaiting_approval = False
            if self._approval.rejected_by is not None:
                detail = f"held: rejected by {self._approval.rejected_by}"
                self._mark(RollbackStep.FLATTEN, StepState.SKIPPED, detail)
                return f"held (rejected by {self._approval.rejected_by})", []
        kill = await self._kill(_system(plan), request, KillScope.FLATTEN, RollbackStep.FLATTEN)
        return "flattened", [kill]

    async def _kill(
        self,
        system: SystemLocation,
        request: RollbackInput,
        scope: KillScope,
        step: RollbackStep,
        *,
        sender_stopped: bool = True,
    ) -> KillReport:
        """The kill switch as a child: one implementation of cancel/flatten and their checks.

        Once the saga has stopped the strategy (the only sender), the venue's dead-man switch
        guards nothing: arming it costs a countdown call per symbol (weight 10 each, most of
        the minute's budget on a wide book) that the cancels and flattens need."""
        info = workflow.info()
        dead_man = not (sender_stopped and workflow.patched(DEAD_MAN_PATCH))
        kill = await self._run(
            step,
            workflow.execute_child_workflow(
                KillSwitchWorkflow.run,
                KillSwitchInput(
                    accounts=system.accounts,
                    scope=scope,
                    reason=f"rollback {system.ref}: {request.reason}",
                    requested_by=request.requested_by,
                    dead_man=dead_man,
                ),
                id=f"{info.workflow_id}/{step.value}",
                execution_timeout=timedelta(
                    seconds=system.timeouts.flatten_s
                    if scope is KillScope.FLATTEN
                    else system.timeouts.cancel_s
                ),
            ),
            lambda k: f"{k.outcome.value} in {k.time_to_flat_s or 0:.2f}s",
        )
        if kill.outcome is not KillOutcome.VERIFIED:
            problems = "; ".join(e for a in kill.accounts for e in a.errors) or "not verified"
            raise StepFailed(step, f"kill {kill.outcome.value}: {problems}")
        return kill

    async def _wait_healthy(self, plan: RollbackPlan) -> None:
        self._mark(RollbackStep.HEALTH, StepState.RUNNING)
        deadline = workflow.now() + timedelta(seconds=plan.health_timeout_s)
        last: HealthReport | None = None
        while workflow.now() < deadline:
            last = await self._activity(
                "check_health",
                HealthRequest(ref=plan.ref),
                HealthReport,
            )
            if last.healthy and last.version == plan.version_to:
                self._mark(RollbackStep.HEALTH, StepState.DONE, f"{last.version} healthy")
                return
            await workflow.sleep(timedelta(seconds=plan.health_interval_s))
        detail = last.detail if last else "no answer"
        self._mark(RollbackStep.HEALTH, StepState.FAILED, detail)
        raise StepFailed(RollbackStep.HEALTH, f"{plan.version_to} not healthy: {detail}")

    async def _reconcile(self, plan: RollbackPlan, who: str, why: str) -> ReconcileResult:
        """Database vs venue, the venue wins: the restored rows describe the snapshot's world,
        not what the venue holds after the cancel and flatten."""
        result: ReconcileResult = await self._run(
            RollbackStep.RECONCILE,
            self._activity(
                "reconcile_state_db",
                ReconcileRequest(database=plan.database, accounts=plan.accounts, who=who, why=why),
                ReconcileResult,
            ),
            lambda r: (
                f"{len(r.corrections)} correction(s); positions "
                f"{', '.join(f'{s} {q}' for s, q in r.positions.items()) or 'flat'}; "
                f"{len(r.open_orders)} open order(s)"
            ),
        )
        if not result.agreed:
            raise StepFailed(
                RollbackStep.RECONCILE,
                "database and venue disagree: " + "; ".join(result.disagreements),
            )
        return result

    async def _set_trading_state(
        self, plan: RollbackPlan, state: TradingState, who: str, why: str
    ) -> TradingStateChange:
        return await self._run(
            RollbackStep.FREEZE,
            self._activity(
                "set_trading_state",
                TradingStateRequest(database=plan.database, state=state, who=who, why=why),
                TradingStateChange,
            ),
            lambda c: c.message,
        )

    async def _safe_stop(self, request: RollbackInput, failure: StepFailed) -> None:
        """Leave the system where nobody is hurt: HALTED, not running, nothing open. Each part
        is best effort and recorded; the report names the step that failed, why, and what was
        (and was not) halted, stopped and cancelled.

        Without a plan (the plan itself failed) the runbook still names the system: it is
        located and stopped all the same; if even that fails, the report says nothing was
        stopped (never "stopped safely")."""
        notes = [f"{failure.step.value} failed: {failure}"]
        system = _system(self._plan) if self._plan is not None else None
        stop = SafeStopReport(found=False, failures=["no plan: the system was not located"])
        if system is None and workflow.patched(LOCATE_PATCH):
            system, stop = await self._locate(request)
        if system is not None:
            stop = await self._stop_everything(request, system, failure)
        notes += [f for f in stop.failures if f not in notes[0]]
        self._record(
            outcome=RollbackOutcome.SAFE_STOP,
            failed_step=failure.step,
            error=" | ".join(notes),
            safe_stop=stop,
        )

    async def _locate(self, request: RollbackInput) -> tuple[SystemLocation | None, SafeStopReport]:
        try:
            system: SystemLocation = await workflow.execute_activity(
                "locate_system",
                request,
                result_type=SystemLocation,
                start_to_close_timeout=SHORT_STEP,
                heartbeat_timeout=PLAN_HEARTBEAT,
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as e:
            return None, SafeStopReport(found=False, failures=[failure_message(e)])
        self._located = system
        return system, SafeStopReport()

    async def _stop_everything(
        self, request: RollbackInput, system: SystemLocation, failure: StepFailed
    ) -> SafeStopReport:
        why = f"rollback {workflow.info().workflow_id} stopped safely: {failure}"
        failures: list[str] = []
        halted: str | None = None
        stopped: list[str] | None = None
        cancelled: int | None = None
        try:
            change: TradingStateChange = await self._activity(
                "set_trading_state",
                TradingStateRequest(
                    database=system.database,
                    state=TradingState.HALTED,
                    who=request.requested_by,
                    why=why,
                ),
                TradingStateChange,
            )
            halted = change.message.split(" by ", 1)[0] if change.changed else "already HALTED"
        except (ActivityError, ApplicationError) as e:
            failures.append(f"halt failed too: {failure_message(e)}")
        try:
            result: StopResult = await self._activity(
                "stop_strategy", StopRequest(ref=system.ref, reason=why), StopResult
            )
            stopped = result.stopped_versions
        except (ActivityError, ApplicationError) as e:
            failures.append(f"stop failed too: {failure_message(e)}")
        # Cancelling again is harmless and guarantees "no orders" whatever step failed.
        try:
            kill = await self._kill(
                system,
                request,
                KillScope.CANCEL_ONLY,
                RollbackStep.CANCEL_ALL,
                sender_stopped=stopped is not None,
            )
            self._record(kills=[*self._draft.kills, kill])
            cancelled = _cancelled(kill)
        except StepFailed as e:
            failures.append(f"cancel-all failed too: {e}")
        return SafeStopReport(
            halted=halted, stopped_versions=stopped, orders_cancelled=cancelled, failures=failures
        )

    # ------------------------------------------------------------------ plumbing

    def _activity(
        self, name: str, arg: Any, result_type: type, timeout: timedelta = SHORT_STEP
    ) -> Any:
        """One saga activity after the plan. Every one heartbeats each second, so the timeout
        can be as long as the step needs and a dead worker is still noticed within the
        runbook's ``heartbeat_s``."""
        return workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=timeout,
            heartbeat_timeout=self._heartbeat(),
            retry_policy=STEP_RETRY,
        )

    def _heartbeat(self) -> timedelta:
        """How soon a worker that died inside a step is noticed: the runbook's ``heartbeat_s``."""
        known = self._plan or self._located
        timeouts = known.timeouts if known is not None else StepTimeouts()
        return timedelta(seconds=timeouts.heartbeat_s)

    async def _run(self, step: RollbackStep, call: Any, describe: Any) -> Any:
        self._current = step
        self._mark(step, StepState.RUNNING)
        try:
            result = await call
        except (ActivityError, ChildWorkflowError, ApplicationError) as e:
            self._mark(step, StepState.FAILED, failure_message(e))
            raise StepFailed(step, failure_message(e)) from None
        self._mark(step, StepState.DONE, describe(result))
        return result

    def _mark(self, step: RollbackStep, state: StepState, detail: str = "") -> None:
        self._timeline.append(
            TimelineEntry(step=step, state=state, at=workflow.now(), detail=detail)
        )
        if state is not StepState.RUNNING or step is RollbackStep.FLATTEN:
            self._tell(f"{step.value}: {state.value}" + (f" — {detail}" if detail else ""))

    def _tell(self, text: str) -> None:
        """Tell people about a step without waiting on the channel: the saga never blocks on
        Slack; the notifications are collected before the workflow ends."""
        request = self._input
        title = f"Rollback {request.strategy}/{request.env}" if request else "Rollback"
        self._told.append(
            asyncio.ensure_future(
                workflow.execute_activity(
                    "notify",
                    NotifyRequest(title=title, text=text),
                    result_type=int,
                    start_to_close_timeout=SHORT_STEP,
                    heartbeat_timeout=self._heartbeat(),
                    retry_policy=NOTIFY_RETRY,
                )
            )
        )

    async def _notify(self, report: RollbackReport) -> None:
        if report.outcome is RollbackOutcome.ROLLED_BACK:
            text = (
                f"{report.strategy}/{report.env} rolled back: {report.version_from} -> "
                f"{report.version_to}; positions {report.flatten or 'untouched'}"
            )
        else:
            stop = report.safe_stop
            verb = (
                "STOPPED NOTHING"
                if stop is None or not stop.found or stop.stopped_nothing
                else "STOPPED SAFELY"
            )
            step = report.failed_step.value if report.failed_step else "?"
            what = stop.summary() if stop is not None else "nothing was stopped"
            text = f"{report.strategy}/{report.env} {verb} at {step}: {what}; {report.error}"
        try:
            await workflow.execute_activity(
                "notify",
                NotifyRequest(
                    title=f"Rollback {report.outcome.value}: {report.strategy}/{report.env}",
                    text=text,
                    severity="info"
                    if report.outcome is RollbackOutcome.ROLLED_BACK
                    else "critical",
                ),
                result_type=int,
                start_to_close_timeout=SHORT_STEP,
                heartbeat_timeout=self._heartbeat(),
                retry_policy=NOTIFY_RETRY,
            )
            self._mark(RollbackStep.NOTIFY, StepState.DONE)
        except ActivityError as e:
            self._mark(RollbackStep.NOTIFY, StepState.FAILED, failure_message(e))
