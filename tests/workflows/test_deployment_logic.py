"""DeployWorkflow's orchestration on the time-skipping server: stage order, what stops a release
before production, canary verdicts (pass, fail, inconclusive pauses for a human), the promotion
approval (four eyes, runbook approvers, refusals leave no trace, timeout denies) and the rollback
saga started as a child after the first switch. Activities are hand-written fakes registered
under the real names; the rollback child is the real RollbackWorkflow on test_rollback_logic's
fakes, with the real kill switch under it on the fake venue."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.testing import ActivityEnvironment

from activities.analysis import judge as judge_for_real
from activities.rollback_plan import RollbackPlanner
from activities.snapshot_catalog import SnapshotCatalog
from activities.snapshots import SnapshotActivities
from tests.fixtures.kill import FakeVenue
from tests.helpers import assert_eventually, new_worker
from tests.workflows.test_rollback_logic import DB, REF, SNAPSHOT, FakeSystem, plan
from workflows.analysis_models import (
    AnalysisPolicy,
    AnalysisResult,
    HardGate,
    MetricPolicy,
    MetricSeries,
    Verdict,
)
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
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import (
    AllocationRequest,
    CanaryStep,
    CandidateBake,
    CheckRequest,
    CheckResult,
    DeployInput,
    DeployOutcome,
    DeployPlan,
    DeployReport,
    HandoverRequest,
    HandoverResult,
    JudgeRequest,
    PauseDecision,
    SampleRequest,
    ShadowReport,
    Stage,
    deploy_workflow_id,
)
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import ApprovalDecision, RollbackInput, RollbackOutcome
from workflows.shared import StepState
from workflows.snapshot_models import (
    DatabaseKind,
    DatabaseRef,
    RestoreRequest,
    SnapshotRecord,
    SnapshotRequest,
)

OLD, NEW = "1.3.0", "1.4.0"
POLICY = AnalysisPolicy(
    metrics=[MetricPolicy(name="order_latency_p99_s", direction="higher-is-worse")],
    gates=[HardGate(metric="reject_rate", comparator="<", threshold=0.5)],
)
QUIET = {"order_latency_p99_s": [0.01] * 30, "reject_rate": [0.0] * 30}
"""What every sample of either version shows unless a test says otherwise."""
STORM = {"order_latency_p99_s": [0.01], "reject_rate": [0.0, 1.0, 1.0]}
"""A monitoring window in which the promoted version starts storming the venue with rejects."""


def deploy_plan(**overrides: object) -> DeployPlan:
    base: dict[str, object] = {
        "ref": REF,
        "staging": REF.model_copy(update={"env": "staging"}),
        "accounts": ["a"],
        "database": DB,
        "version_from": OLD,
        "version_to": NEW,
        "checks": ["feed", "broker", "kill-switch"],
        "canary": [CanaryStep(capital=0.05, bake_s=60), CanaryStep(capital=0.25, bake_s=120)],
        "analysis": POLICY,
        "approvers": ["bob", "carol"],
        "monitor_s": 5,
        "retire_delay_s": 300,
    }
    return DeployPlan.model_validate({**base, **overrides})


def verdict(v: Verdict) -> AnalysisResult:
    return AnalysisResult(verdict=v, summary=f"{v.value}: p99 latency judged", score=None)


@dataclass
class FakeRelease:
    """The managed system during a deployment, as the workflow sees it; calls in order."""

    plan: DeployPlan
    failing_check: str | None = None
    agreement: float = 1.0
    verdicts: list[Verdict] = field(default_factory=lambda: [Verdict.PASS, Verdict.PASS])
    calls: list[str] = field(default_factory=list)
    current: str = OLD
    after_promotion: list[dict[str, list[float]]] = field(default_factory=list)
    """The promoted version's samples, one per monitoring window (then ``QUIET``)."""
    sick_after_promotion: bool = False
    """The promoted version answers unhealthy (the previous one, brought back, is fine)."""

    def activities(self) -> list[Any]:
        @activity.defn(name="plan_deploy")
        async def plan_deploy(r: DeployInput) -> DeployPlan:
            self.calls.append("plan")
            return self.plan

        @activity.defn(name="staging_check")
        async def check(r: CheckRequest) -> CheckResult:
            self.calls.append(f"check:{r.check}")
            passed = r.check != self.failing_check
            return CheckResult(
                check=r.check,
                passed=passed,
                detail="ok" if passed else "p99 parse latency 40 ms > 5 ms",
                measurements={"p99_ms": 1.0 if passed else 40.0},
            )

        @activity.defn(name="snapshot_state_db")
        async def snapshot(r: SnapshotRequest) -> SnapshotRecord:
            self.calls.append(f"snapshot:{r.version}")
            return SNAPSHOT

        @activity.defn(name="start_candidate")
        async def start_candidate(r: CandidateRequest) -> CandidateRecord:
            self.calls.append(f"candidate:{r.version}")
            return CandidateRecord(ref=r.ref, version=r.version, started_at=datetime.now(UTC))

        @activity.defn(name="bake_shadow")
        async def bake_shadow(r: CandidateBake) -> ShadowReport:
            self.calls.append("shadow")
            return ShadowReport(decisions_compared=200, agreement=self.agreement)

        @activity.defn(name="sample_metrics")
        async def sample(r: SampleRequest) -> MetricSeries:
            self.calls.append(f"sample:{r.version}")
            promoted = self.current == NEW and self.after_promotion
            values = self.after_promotion.pop(0) if promoted else QUIET
            return MetricSeries(version=r.version, values=values)

        @activity.defn(name="judge_canary")
        async def judge(r: JudgeRequest) -> AnalysisResult:
            if not r.policy.metrics:  # monitoring: the real judge on the hard gates alone
                self.calls.append(f"gates:{r.canary.version}")
                return judge_for_real(r.policy, r.baseline, r.canary)
            self.calls.append(f"judge:{r.baseline.version}<>{r.canary.version}")
            return verdict(self.verdicts.pop(0))

        @activity.defn(name="set_allocation")
        async def allocate(r: AllocationRequest) -> float:
            self.calls.append(f"capital:{r.version}={r.capital:g}")
            return r.capital

        @activity.defn(name="handover_lease")
        async def handover(r: HandoverRequest) -> HandoverResult:
            self.calls.append(f"handover:{r.from_version}->{r.to_version}")
            return HandoverResult(epoch=2, holder=r.to_version, handover_s=0.2)

        @activity.defn(name="promote_version")
        async def promote(r: ActivateRequest) -> ActivationRecord:
            self.calls.append(f"promote:{r.version}")
            self.current = r.version
            return ActivationRecord(ref=r.ref, version=r.version, activated_at=datetime.now(UTC))

        @activity.defn(name="retire_version")
        async def retire(r: RetireRequest) -> RetireResult:
            self.calls.append(f"retire:{r.version}")
            return RetireResult(ref=r.ref, version=r.version, stopped_versions=[r.version])

        @activity.defn(name="check_health")
        async def health(r: HealthRequest) -> HealthReport:
            version = r.version or self.current
            sick = self.sick_after_promotion and version == NEW and self.current == NEW
            return HealthReport(
                ref=r.ref,
                healthy=not sick,
                checked_at=datetime.now(UTC),
                version=version,
                detail="loop stale for 9.0s" if sick else "",
            )

        @activity.defn(name="activate_version")
        async def activate(r: ActivateRequest) -> ActivationRecord:
            self.calls.append(f"activate:{r.version}")  # the rollback child's
            self.current = r.version
            return ActivationRecord(ref=r.ref, version=r.version, activated_at=datetime.now(UTC))

        rollback = FakeSystem(plan(version_from=NEW, version_to=OLD), calls=self.calls)
        taken = {"health", "activate"}
        rollback_side = [a for a in rollback.activities() if a.__name__ not in taken]
        return [
            plan_deploy,
            check,
            snapshot,
            start_candidate,
            bake_shadow,
            sample,
            judge,
            allocate,
            handover,
            promote,
            retire,
            health,
            activate,
            *rollback_side,
            *FakeVenue().activities(),
        ]


class Running:
    def __init__(self, env: Any, release: FakeRelease, requester: str = "alice") -> None:
        self.env, self.release, self.requester = env, release, requester

    async def __aenter__(self) -> WorkflowHandle:
        workflows = (DeployWorkflow, RollbackWorkflow, KillSwitchWorkflow)
        self._worker = new_worker(self.env.client, *workflows, activities=self.release.activities())
        worker = await self._worker.__aenter__()
        return await self.env.client.start_workflow(
            DeployWorkflow.run,
            DeployInput(
                strategy=REF.strategy,
                env=REF.env,
                version=NEW,
                reason="release 1.4.0",
                requested_by=self.requester,
            ),
            id=deploy_workflow_id(REF.strategy, REF.env) + f"/{id(self)}",
            task_queue=worker.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )

    async def __aexit__(self, *exc: object) -> None:
        await self._worker.__aexit__(*exc)


async def approve(handle: WorkflowHandle, who: str) -> None:
    async def waiting() -> None:
        assert (await handle.query(DeployWorkflow.status)).awaiting_approval

    await assert_eventually(waiting, timeout=30)
    await handle.execute_update(DeployWorkflow.approve_promotion, ApprovalDecision(approver=who))


async def update_events(handle: WorkflowHandle) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    )


async def test_a_good_release_goes_through_every_stage_and_is_promoted(time_env) -> None:
    release = FakeRelease(deploy_plan())
    async with Running(time_env, release) as handle:
        await approve(handle, "bob")
        report: DeployReport = await handle.result()
    assert report.outcome is DeployOutcome.PROMOTED, report.error
    checks = [f"check:{c}" for c in release.plan.checks]
    calls = release.calls
    n = len(checks) + 4
    # The live version is sampled while the candidate shadows it (the canary's baseline).
    assert sorted(calls[n : n + 2]) == ["sample:1.3.0", "shadow"]
    assert calls[:n] == [
        "plan",
        *checks,
        f"snapshot:{OLD}",
        f"handover:None->{OLD}",  # the live version holds the lease by name: NEW only shadows
        f"candidate:{NEW}",
    ]
    assert calls[n + 2 :] == [
        f"capital:{NEW}=0.05",
        f"handover:{OLD}->{NEW}",  # the first switch: the canary trades from here
        f"sample:{NEW}",
        f"judge:{OLD}<>{NEW}",
        f"capital:{NEW}=0.25",
        f"sample:{NEW}",
        f"judge:{OLD}<>{NEW}",
        f"capital:{NEW}=1",
        f"promote:{NEW}",
        f"sample:{NEW}",  # monitoring: one window of monitor_s (5 s), the gates alone judged
        f"gates:{NEW}",
        f"retire:{OLD}",  # after the warm delay
    ]
    assert report.approvals == ["bob"] and report.snapshot_id == SNAPSHOT.id
    assert [a.verdict for a in report.analyses] == [Verdict.PASS, Verdict.PASS]
    states = {n.name: n.state for n in report.tree}
    assert all(states[s.value] is StepState.DONE for s in Stage if s is not Stage.ROLLBACK)
    assert states[Stage.ROLLBACK.value] is StepState.PENDING
    canary = next(n for n in report.tree if n.name == Stage.CANARY.value)
    assert [c.name for c in canary.children] == [
        "step 1: 5% of capital",
        "step 2: 25% of capital",
    ]
    monitor = next(n for n in report.tree if n.name == Stage.MONITOR.value)
    assert [(c.name, c.state) for c in monitor.children] == [("window 1/1: 5s", StepState.DONE)]
    assert [a.verdict for a in report.monitoring] == [Verdict.PASS]


async def test_a_gate_failing_after_promotion_rolls_back_to_the_warm_version(time_env) -> None:
    # Good in the shadow and both canary steps; it starts storming in the second window.
    release = FakeRelease(
        deploy_plan(monitor_s=30, monitor_window_s=10), after_promotion=[QUIET, STORM]
    )
    async with Running(time_env, release) as handle:
        await approve(handle, "bob")
        report: DeployReport = await handle.result()
        rollback = time_env.client.get_workflow_handle_for(
            RollbackWorkflow.run, report.rollback_workflow_id
        )
        rolled = await rollback.result()
    assert report.outcome is DeployOutcome.ROLLED_BACK, report.error
    assert report.failed_stage is Stage.MONITOR
    assert "window 2/3: 10s: gate reject_rate < 0.5 violated: 1.4.0 worst is 1" in report.error
    assert [a.verdict for a in report.analyses] == [Verdict.PASS, Verdict.PASS]
    assert [a.verdict for a in report.monitoring] == [Verdict.PASS, Verdict.FAIL]
    assert rolled.outcome is RollbackOutcome.ROLLED_BACK, rolled.error
    calls = release.calls
    promoted = calls.index(f"promote:{NEW}")
    assert calls[promoted + 1 : promoted + 5] == [f"sample:{NEW}", f"gates:{NEW}"] * 2
    assert f"activate:{OLD}" in calls[promoted:]  # the rollback child brought it back
    assert f"retire:{OLD}" not in calls  # it stayed warm: never retired
    monitor = next(n for n in report.tree if n.name == Stage.MONITOR.value)
    assert monitor.state is StepState.FAILED
    assert [(c.name, c.state) for c in monitor.children] == [
        ("window 1/3: 10s", StepState.DONE),
        ("window 2/3: 10s", StepState.FAILED),
    ]
    states = {n.name: n.state for n in report.tree}
    assert states[Stage.PROMOTE.value] is StepState.DONE
    assert states[Stage.ROLLBACK.value] is StepState.DONE
    assert states[Stage.RETIRE.value] is StepState.PENDING


async def test_an_unhealthy_promoted_version_is_rolled_back_during_monitoring(time_env) -> None:
    release = FakeRelease(deploy_plan(), sick_after_promotion=True)
    async with Running(time_env, release) as handle:
        await approve(handle, "bob")
        report: DeployReport = await handle.result()
        rollback = time_env.client.get_workflow_handle_for(
            RollbackWorkflow.run, report.rollback_workflow_id
        )
        rolled = await rollback.result()
    assert report.outcome is DeployOutcome.ROLLED_BACK, report.error
    assert report.failed_stage is Stage.MONITOR
    assert f"{NEW} after promotion, window 1/1: 5s: unhealthy: loop stale" in report.error
    assert rolled.outcome is RollbackOutcome.ROLLED_BACK, rolled.error
    assert f"retire:{OLD}" not in release.calls


async def test_a_failing_staging_check_stops_before_anything_reaches_production(
    time_env,
) -> None:
    release = FakeRelease(deploy_plan(), failing_check="feed")
    async with Running(time_env, release) as handle:
        report: DeployReport = await handle.result()
    assert report.outcome is DeployOutcome.REJECTED
    assert report.failed_stage is Stage.VALIDATE
    assert "staging check feed failed: p99 parse latency 40 ms" in report.error
    assert release.calls == ["plan", "check:feed"]  # no snapshot, nothing started
    assert report.checks[0].measurements == {"p99_ms": 40.0}


async def test_shadow_disagreement_retires_the_candidate_without_a_rollback(time_env) -> None:
    release = FakeRelease(deploy_plan(), agreement=0.4)
    async with Running(time_env, release) as handle:
        report: DeployReport = await handle.result()
    assert report.outcome is DeployOutcome.REJECTED and report.failed_stage is Stage.SHADOW
    assert release.calls[-1] == f"retire:{NEW}"  # the candidate, not the live one
    assert not any(c.startswith("capital:") for c in release.calls)
    assert [c for c in release.calls if c.startswith("handover:")] == [f"handover:None->{OLD}"]
    assert report.rollback_workflow_id is None


async def test_a_failing_canary_starts_the_rollback_saga_as_a_child(time_env) -> None:
    release = FakeRelease(deploy_plan(), verdicts=[Verdict.PASS, Verdict.FAIL])
    async with Running(time_env, release) as handle:
        report: DeployReport = await handle.result()
        rollback = time_env.client.get_workflow_handle_for(
            RollbackWorkflow.run, report.rollback_workflow_id
        )
        rolled = await rollback.result()
    assert report.outcome is DeployOutcome.ROLLED_BACK, report.error
    assert report.failed_stage is Stage.CANARY
    assert report.rollback_workflow_id == f"rollback/{REF.strategy}/{REF.env}"
    assert rolled.outcome is RollbackOutcome.ROLLED_BACK
    assert f"promote:{NEW}" not in release.calls  # never promoted
    assert f"activate:{OLD}" in release.calls and "restore:snap-a" in release.calls


async def test_an_inconclusive_canary_pauses_until_an_approver_says_go(time_env) -> None:
    release = FakeRelease(deploy_plan(), verdicts=[Verdict.INCONCLUSIVE, Verdict.PASS])
    async with Running(time_env, release) as handle:

        async def paused() -> None:
            assert (await handle.query(DeployWorkflow.status)).paused

        await assert_eventually(paused, timeout=30)
        for who, reason in (("alice", "requester cannot"), ("mallory", "not an approver")):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await handle.execute_update(
                    DeployWorkflow.resume, PauseDecision(by=who, proceed=True)
                )
            assert reason in str(refused.value.cause)
        assert await update_events(handle) == 0
        await handle.execute_update(DeployWorkflow.resume, PauseDecision(by="carol", proceed=True))
        await approve(handle, "bob")
        report: DeployReport = await handle.result()
    assert report.outcome is DeployOutcome.PROMOTED
    canary = next(n for n in report.tree if n.name == Stage.CANARY.value)
    assert "continued by carol" in canary.children[0].detail


async def test_promotion_approval_refuses_strangers_and_the_requester_without_a_trace(
    time_env,
) -> None:
    release = FakeRelease(deploy_plan())
    async with Running(time_env, release, requester="bob") as handle:

        async def waiting() -> None:
            assert (await handle.query(DeployWorkflow.status)).awaiting_approval

        await assert_eventually(waiting, timeout=30)
        for who, reason in (("mallory", "not an approver"), ("bob", "cannot approve")):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await handle.execute_update(
                    DeployWorkflow.approve_promotion, ApprovalDecision(approver=who)
                )
            assert reason in str(refused.value.cause)
        assert await update_events(handle) == 0
        await handle.execute_update(
            DeployWorkflow.approve_promotion, ApprovalDecision(approver="carol")
        )
        report: DeployReport = await handle.result()
    assert report.outcome is DeployOutcome.PROMOTED and report.approvals == ["carol"]


async def test_an_approval_timeout_denies_and_rolls_back(time_env) -> None:
    release = FakeRelease(deploy_plan(approval_timeout_s=600))
    async with Running(time_env, release) as handle:
        report: DeployReport = await handle.result()  # time skips past the timeout
    assert report.outcome is DeployOutcome.ROLLED_BACK
    assert report.failed_stage is Stage.APPROVAL and "timed out" in report.error
    assert f"promote:{NEW}" not in release.calls


async def test_a_second_deploy_of_the_same_system_is_refused_while_one_runs(dev_env) -> None:
    # On the dev server: a run terminated on the time-skipping server leaves its time locked,
    # and every later test there that waits on a timer hangs (seen in CI: 300 s timeouts).
    release = FakeRelease(deploy_plan())
    async with new_worker(
        dev_env.client,
        DeployWorkflow,
        RollbackWorkflow,
        KillSwitchWorkflow,
        activities=release.activities(),
    ) as worker:
        request = DeployInput(
            strategy=REF.strategy, env=REF.env, version=NEW, reason="release", requested_by="al"
        )
        workflow_id = deploy_workflow_id(REF.strategy, REF.env)
        first = await dev_env.client.start_workflow(
            DeployWorkflow.run,
            request,
            id=workflow_id,
            task_queue=worker.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
        with pytest.raises(WorkflowAlreadyStartedError):
            await dev_env.client.start_workflow(
                DeployWorkflow.run,
                request,
                id=workflow_id,
                task_queue=worker.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
        await first.terminate("test done")


class _AfterTheDeploy:
    """The deploy target as a rollback planner sees it after the deploy: NEW current, OLD
    before it (the only target method the planner calls beyond these is never reached)."""

    async def current(self) -> str | None:
        return NEW

    async def previous(self) -> str | None:
        return OLD

    async def running_versions(self) -> list[str]:
        return [NEW]


async def test_two_deploys_in_a_row_take_two_snapshots_and_a_rollback_restores_the_newest(
    time_env: Any, tmp_path: Path
) -> None:
    """Every deploy of a system has the same workflow id (``deploy/<s>/<e>``): a snapshot keyed
    on it was taken once, and every later deploy reused the first one, so a rollback restored
    state from deploys ago. The real snapshot activity on a real SQLite state database."""
    db_path = tmp_path / "state.sqlite"
    database = DatabaseRef(kind=DatabaseKind.SQLITE, path=db_path)
    catalog = SnapshotCatalog(tmp_path / "catalog.sqlite")
    snapshots = SnapshotActivities(catalog, tmp_path / "store")

    def write(content: str) -> None:
        with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
            conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, v TEXT)")
            conn.execute("INSERT OR REPLACE INTO notes (id, v) VALUES (1, ?)", (content,))

    def read() -> str:
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            return str(conn.execute("SELECT v FROM notes WHERE id = 1").fetchone()[0])

    reports: list[DeployReport] = []
    for content in ("before the first deploy", "before the second deploy"):
        write(content)
        release = FakeRelease(deploy_plan(database=database))
        fakes = [a for a in release.activities() if getattr(a, "__name__", "") != "snapshot"]
        workflows = (DeployWorkflow, RollbackWorkflow, KillSwitchWorkflow)
        async with new_worker(
            time_env.client, *workflows, activities=[*fakes, snapshots.snapshot]
        ) as worker:
            handle = await time_env.client.start_workflow(
                DeployWorkflow.run,
                DeployInput(
                    strategy=REF.strategy,
                    env=REF.env,
                    version=NEW,
                    reason="release 1.4.0",
                    requested_by="alice",
                ),
                id=deploy_workflow_id(REF.strategy, REF.env),  # the same for both
                task_queue=worker.task_queue,
                result_type=DeployReport,
            )
            await approve(handle, "bob")
            reports.append(await handle.result())
    first, second = reports
    assert [r.outcome for r in reports] == [DeployOutcome.PROMOTED] * 2, reports
    assert first.snapshot_id is not None and second.snapshot_id is not None
    assert first.snapshot_id != second.snapshot_id, "the second deploy reused the first snapshot"
    taken = catalog.list(REF.strategy, REF.env)  # newest first
    assert [r.id for r in taken] == [second.snapshot_id, first.snapshot_id]

    # A rollback after the second deploy plans the newest snapshot and restores its content.
    runbooks = tmp_path / "rb"
    runbooks.mkdir()
    (runbooks / "momentum-prod.yaml").write_text(
        f"strategy: {REF.strategy}\nenv: {REF.env}\naccounts: [a]\n"
        f"target: {{releases_root: {tmp_path}, state_dir: {tmp_path}, "
        f"strategy_config: {tmp_path / 'c.json'}, http_port: 8081}}\n"
        f"database: {{kind: sqlite, path: {db_path}}}\nflatten: {{mode: auto}}\n"
    )
    planner = RollbackPlanner(runbooks, lambda ref: _AfterTheDeploy(), catalog)  # type: ignore[arg-type, return-value]
    rollback_plan = await ActivityEnvironment().run(
        planner.plan,
        RollbackInput(strategy=REF.strategy, env=REF.env, reason="bad", requested_by="bob"),
    )
    assert rollback_plan.snapshot.id == second.snapshot_id
    write("written by the bad release")
    await ActivityEnvironment().run(
        snapshots.restore,
        RestoreRequest(
            snapshot_id=rollback_plan.snapshot.id,
            strategy=REF.strategy,
            env=REF.env,
            database=database,
            reason="rollback",
        ),
    )
    assert read() == "before the second deploy"
