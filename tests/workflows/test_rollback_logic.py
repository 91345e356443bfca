"""RollbackWorkflow's orchestration on the time-skipping server: step order, flatten policies,
approvals (four eyes, runbook approvers, refusals leave no trace), timeouts and the safe stop.
Activities are hand-written fakes registered under the real names; the kill switch children run
the real KillSwitchWorkflow on the fake venue from test_kill_switch_logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from tests.fixtures.kill import FakeVenue
from tests.helpers import assert_eventually, fresh_id, new_worker
from workflows.deploy_models import (
    ActivateRequest,
    ActivationRecord,
    HealthReport,
    HealthRequest,
    StopRequest,
    StopResult,
    StrategyRef,
)
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    ApprovalDecision,
    FlattenMode,
    ReconcileRequest,
    ReconcileResult,
    RollbackInput,
    RollbackOutcome,
    RollbackPlan,
    RollbackReport,
    RollbackStep,
    SystemLocation,
    TradingStateChange,
    TradingStateRequest,
)
from workflows.shared import KillScope
from workflows.snapshot_models import (
    DatabaseKind,
    DatabaseRef,
    RestoreRequest,
    RestoreResult,
    SnapshotRecord,
)

REF = StrategyRef(strategy="momentum", env="prod")
DB = DatabaseRef(kind=DatabaseKind.SQLITE, path=Path("/srv/momentum/state.sqlite"))
SNAPSHOT = SnapshotRecord(
    id="snap-" + "a" * 24,
    strategy="momentum",
    env="prod",
    version="1.3.0",
    db_kind=DatabaseKind.SQLITE,
    size_bytes=1,
    checksum="c" * 64,
    content_checksum="d" * 64,
    created_at=datetime(2026, 11, 1, tzinfo=UTC),
    path=Path("/snapshots/x"),
)


def plan(**overrides: object) -> RollbackPlan:
    base: dict[str, object] = {
        "ref": REF,
        "accounts": ["a"],
        "database": DB,
        "version_from": "1.4.0",
        "version_to": "1.3.0",
        "snapshot": SNAPSHOT,
        "approvers": ["bob", "carol"],
    }
    return RollbackPlan.model_validate({**base, **overrides})


@dataclass
class FakeSystem:
    """The managed system as the saga sees it: calls are recorded in order."""

    plan: RollbackPlan
    calls: list[str] = field(default_factory=list)
    fail_activate: bool = False
    healthy_after: int = 1
    disagree: list[str] = field(default_factory=list)
    """What the reconcile still finds different after correcting (empty: they agree)."""
    fail_plan: str | None = None
    """The plan is refused with this message (e.g. no snapshot of the version)."""
    findable: bool = True
    """Whether the runbook still names the system (a safe stop without a plan locates it)."""

    def activities(self) -> list:
        @activity.defn(name="plan_rollback")
        async def plan_rollback(r: RollbackInput) -> RollbackPlan:
            self.calls.append("plan")
            if self.fail_plan is not None:
                raise ApplicationError(self.fail_plan, type="PlanRefused", non_retryable=True)
            return self.plan

        @activity.defn(name="locate_system")
        async def locate(r: RollbackInput) -> SystemLocation:
            self.calls.append("locate")
            if not self.findable:
                raise ApplicationError(
                    f"no runbook for {r.strategy}/{r.env} in /rb",
                    type="ConfigError",
                    non_retryable=True,
                )
            return SystemLocation(ref=self.plan.ref, accounts=self.plan.accounts, database=DB)

        @activity.defn(name="set_trading_state")
        async def set_state(r: TradingStateRequest) -> TradingStateChange:
            self.calls.append(f"state:{r.state.value}")
            return TradingStateChange(state=r.state, changed=True, message=f"-> {r.state.value}")

        @activity.defn(name="stop_strategy")
        async def stop(r: StopRequest) -> StopResult:
            self.calls.append("stop")
            return StopResult(ref=r.ref, stopped_versions=["1.4.0"])

        @activity.defn(name="restore_state_db")
        async def restore(r: RestoreRequest) -> RestoreResult:
            self.calls.append(f"restore:{r.snapshot_id[:6]}")
            return RestoreResult(
                snapshot_id=r.snapshot_id,
                strategy=r.strategy,
                env=r.env,
                version="1.3.0",
                db_kind=DatabaseKind.SQLITE,
                content_checksum="d" * 64,
                content_checksum_before="e" * 64,
                changed=True,
                method="backup",
                restored_at=datetime.now(UTC),
            )

        @activity.defn(name="activate_version")
        async def activate(r: ActivateRequest) -> ActivationRecord:
            self.calls.append(f"activate:{r.version}")
            if self.fail_activate:
                raise ApplicationError(
                    "release 1.3.0 missing", type="UnknownRelease", non_retryable=True
                )
            return ActivationRecord(ref=r.ref, version=r.version, activated_at=datetime.now(UTC))

        @activity.defn(name="check_health")
        async def health(r: HealthRequest) -> HealthReport:
            self.calls.append("health")
            self.healthy_after -= 1
            return HealthReport(
                ref=r.ref,
                healthy=self.healthy_after <= 0,
                checked_at=datetime.now(UTC),
                version="1.3.0",
            )

        @activity.defn(name="reconcile_state_db")
        async def reconcile(r: ReconcileRequest) -> ReconcileResult:
            self.calls.append(f"reconcile:{','.join(r.accounts)}")
            return ReconcileResult(disagreements=self.disagree)

        return [plan_rollback, locate, set_state, stop, restore, activate, health, reconcile]


def kill_scopes(venue: FakeVenue) -> list[str]:
    return ["flatten" if venue.flatten_calls else "cancel-only"]


async def start(env, system: FakeSystem, venue: FakeVenue, requester: str = "alice"):
    acts = system.activities() + venue.activities()
    worker_cm = new_worker(env.client, RollbackWorkflow, KillSwitchWorkflow, activities=acts)
    worker = await worker_cm.__aenter__()
    handle: WorkflowHandle = await env.client.start_workflow(
        RollbackWorkflow.run,
        RollbackInput(
            strategy="momentum", env="prod", reason="reject storm", requested_by=requester
        ),
        id=fresh_id("rollback"),
        task_queue=worker.task_queue,
    )
    return handle, worker_cm


async def test_auto_policy_runs_every_step_in_order(time_env) -> None:
    system, venue = FakeSystem(plan()), FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.ROLLED_BACK
    assert report.flatten == "flattened"
    # One flatten kill cancels and flattens (auto needs no cancel-only pass of its own).
    assert [k.scope for k in report.kills] == [KillScope.FLATTEN]
    cancel = [e for e in report.timeline if e.step is RollbackStep.CANCEL_ALL]
    assert [e.state for e in cancel] == ["running", "done"]
    assert "verified by the flatten kill" in cancel[-1].detail
    assert system.calls == [
        "plan",
        "state:REDUCING",
        "state:HALTED",
        "stop",
        "restore:snap-a",
        "state:HALTED",
        "activate:1.3.0",
        "health",
        "reconcile:a",
        "state:ACTIVE",
    ]
    done = [e.step for e in report.timeline if e.state == "done"]
    assert done.index(RollbackStep.STOP) < done.index(RollbackStep.ACTIVATE)
    assert venue.notified  # told at the steps and at the end


async def wait_for_approval(handle: WorkflowHandle) -> None:
    async def awaiting() -> bool:
        return (await handle.query(RollbackWorkflow.status)).awaiting_approval

    await assert_eventually(awaiting, timeout=30)


async def update_events(handle: WorkflowHandle) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    )


async def test_approval_refuses_strangers_and_the_requester_without_a_trace(time_env) -> None:
    approvers = ["alice", "bob", "carol"]  # alice may approve others' rollbacks, not her own
    system = FakeSystem(plan(flatten=FlattenMode.APPROVE, approvers=approvers))
    venue = FakeVenue()
    handle, worker = await start(time_env, system, venue, requester="alice")
    try:
        await wait_for_approval(handle)
        refusals = (("mallory", "not an approver"), ("alice", "cannot approve their own"))
        for who, reason in refusals:
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await handle.execute_update(
                    RollbackWorkflow.approve_flatten, ApprovalDecision(approver=who)
                )
            assert reason in str(refused.value.cause)
        assert await update_events(handle) == 0  # refusals left nothing in history
        # The database does not wait for the approval: restored while the question is open.
        assert "restore:snap-a" in system.calls
        status = await handle.query(RollbackWorkflow.status)
        assert status.awaiting_approval
        state = await handle.execute_update(
            RollbackWorkflow.approve_flatten, ApprovalDecision(approver="bob"), id="slack-action-1"
        )
        again = await handle.execute_update(
            RollbackWorkflow.approve_flatten, ApprovalDecision(approver="bob"), id="slack-action-1"
        )
        assert state.decided and again == state  # a repeated click is harmless
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.ROLLED_BACK
    assert report.flatten == "flattened" and report.approvals == ["bob"]


@pytest.mark.parametrize(("on_timeout", "flattened"), [("hold", False), ("flatten", True)])
async def test_approval_timeout_follows_the_runbook(
    time_env, on_timeout: str, flattened: bool
) -> None:
    system = FakeSystem(plan(flatten=FlattenMode.APPROVE, on_timeout=on_timeout))
    venue = FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        report: RollbackReport = await handle.result()  # time skips past the approval timeout
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.ROLLED_BACK
    assert bool(venue.flatten_calls) is flattened
    assert report.flatten == ("flattened" if flattened else "held (approval timed out)")


async def test_rejection_holds_positions(time_env) -> None:
    system, venue = FakeSystem(plan(flatten=FlattenMode.APPROVE)), FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        await wait_for_approval(handle)
        await handle.execute_update(
            RollbackWorkflow.approve_flatten, ApprovalDecision(approver="carol", approve=False)
        )
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.flatten == "held (rejected by carol)"
    assert venue.flatten_calls == []


async def test_a_permanent_failure_stops_in_a_safe_state(time_env) -> None:
    system, venue = FakeSystem(plan(), fail_activate=True), FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.SAFE_STOP
    assert report.failed_step is RollbackStep.ACTIVATE
    assert "release 1.3.0 missing" in report.error
    # Everything done before the failure is in the report: the exact state it stopped in.
    assert (report.version_from, report.version_to) == ("1.4.0", "1.3.0")
    assert report.snapshot_id == SNAPSHOT.id and report.flatten == "flattened"
    assert [k.scope for k in report.kills] == [KillScope.FLATTEN, KillScope.CANCEL_ONLY]
    # After the failure: halted, stopped, and every order cancelled once more.
    tail = system.calls[system.calls.index("activate:1.3.0") + 1 :]
    assert tail == ["state:HALTED", "stop"]
    assert "health" not in system.calls and "state:ACTIVE" not in system.calls
    assert any(n.severity == "critical" and "STOPPED SAFELY" in n.text for n in venue.notified)


async def test_database_and_venue_still_disagreeing_stops_before_trading(time_env) -> None:
    disagreement = "position BTCUSDT: database 0.004, venue 0"
    system, venue = FakeSystem(plan(), disagree=[disagreement]), FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.SAFE_STOP
    assert report.failed_step is RollbackStep.RECONCILE
    assert disagreement in report.error
    # Never ACTIVE on a database that contradicts the venue: halted and stopped instead.
    assert "state:ACTIVE" not in system.calls
    tail = system.calls[system.calls.index("reconcile:a") + 1 :]
    assert tail == ["state:HALTED", "stop"]


async def test_a_failed_plan_still_halts_stops_and_cancels_what_the_runbook_names(
    time_env,
) -> None:
    """Issue 8: the plan failed and the safe stop did nothing, yet reported STOPPED SAFELY."""
    refused = "no snapshot of momentum/prod at version 1.3.0"
    system, venue = FakeSystem(plan(), fail_plan=refused), FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.SAFE_STOP
    assert report.failed_step is RollbackStep.PLAN and refused in report.error
    assert system.calls == ["plan", "locate", "state:HALTED", "stop"]
    assert [k.scope for k in report.kills] == [KillScope.CANCEL_ONLY]
    stop = report.safe_stop
    assert stop is not None and stop.found and not stop.stopped_nothing, stop
    assert (stop.halted, stop.stopped_versions) == ("-> HALTED", ["1.4.0"]), stop
    assert stop.orders_cancelled is not None
    (told,) = [n for n in venue.notified if n.severity == "critical"]
    assert "STOPPED SAFELY at plan: halted (-> HALTED), stopped 1.4.0" in told.text, told.text
    assert "None" not in told.text


async def test_a_system_nobody_can_find_is_reported_as_stopped_by_nobody(time_env) -> None:
    refused = "no runbook for momentum/prod in /rb"
    system = FakeSystem(plan(), fail_plan=refused, findable=False)
    venue = FakeVenue()
    handle, worker = await start(time_env, system, venue)
    try:
        report: RollbackReport = await handle.result()
    finally:
        await worker.__aexit__(None, None, None)
    assert report.outcome is RollbackOutcome.SAFE_STOP
    assert system.calls == ["plan", "locate"] and report.kills == []
    assert report.safe_stop is not None and not report.safe_stop.found
    (told,) = [n for n in venue.notified if n.severity == "critical"]
    assert "STOPPED NOTHING at plan" in told.text and "STOPPED SAFELY" not in told.text, told
