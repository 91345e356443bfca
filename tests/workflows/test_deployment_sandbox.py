"""DeployWorkflow end to end through the real parts: the Temporal dev server, an in-process worker
wired like ``worker.main``, supervisord running two versions of the sample strategy side by side
on one SQLite database, and the sandbox exchange. The venue's own order records judge the one
thing a deployment must never do: two versions with orders on the account's book at once."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import pytest
from temporalio.client import Client, WorkflowHandle

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import AccountState, PositionSet
from sandbox.strategy import lease
from sandbox.strategy.app import version_tag
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import build_release
from tests.fixtures.rollback import GOOD, HELD, HELD_QTY, RollbackScenario, Scenarios, healthy
from tests.helpers import assert_eventually, fresh_id
from workflows.analysis_models import Verdict
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import DeployInput, DeployOutcome, DeployReport, Stage
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import ApprovalDecision, RollbackOutcome
from workflows.shared import StepState

pytestmark = pytest.mark.timeout(300)  # a hang detector: a busy machine takes its time

NEW, SLOW = "2.0.0", "2.1.0"
DEPLOY = """\
  shadow_bake_s: 4
  min_shadow_agreement: 0.5
  # Required by the runbook's validator; the canary trades the live account under the lease.
  canary: [{capital: 0.2, bake_s: 6}]
  analysis:
    gates: [{metric: order_latency_p99_s, comparator: "<", threshold: 1.0}]
    min_trades: 0
  approval_timeout_s: 120
  monitor_s: 2
  retire_delay_s: 2
"""
"""Short bakes; the latency gate catches a release that takes 1.2 s to decide each order."""
OPEN = {"NEW", "PARTIALLY_FILLED"}


@dataclass(frozen=True)
class Span:
    """How long one strategy order rested on the venue (milliseconds, the venue's clock)."""

    version: str
    opened: int
    closed: int
    cid: str


def spans(state: AccountState, prefix: str) -> list[Span]:
    """Every order the strategy placed, by the version tag in its client order id."""
    now = int(time.time() * 1000)
    out = []
    for o in state.orders:
        if o.client_order_id.startswith(f"{prefix}-"):
            tag = o.client_order_id[len(prefix) + 1 :].split("-", 1)[0]
            closed = now if o.status in OPEN else o.update_time
            out.append(Span(tag, o.time, closed, o.client_order_id))
    return out


def assert_one_version_at_a_time(found: list[Span]) -> str:
    """No two versions' orders ever open at the same moment; returns the evidence."""
    for a in found:
        for b in found:
            if a.version != b.version:
                assert not (a.opened < b.closed and b.opened < a.closed), (a, b)
    runs: list[list[Span]] = []
    for span in sorted(found, key=lambda x: x.opened):
        if runs and runs[-1][0].version == span.version:
            runs[-1].append(span)
        else:
            runs.append([span])
    gaps = [
        f"{a[0].version} -> {b[0].version}: {b[0].opened - max(x.closed for x in a)} ms"
        for a, b in pairwise(runs)
    ]
    per_version = dict(Counter(x.version for x in found))
    return f"orders per version {per_version}; last close -> first open {'; '.join(gaps)}"


def prefix_of(s: RollbackScenario) -> str:
    config = StrategyConfig.model_validate_json((s.base / "strategy.json").read_text())
    return config.client_id_prefix


async def quoting(admin: SandboxAdmin, s: RollbackScenario, version: str) -> None:
    state = await admin.state(s.api_key)
    tag = f"{prefix_of(s)}-{version_tag(version)}-"
    assert [o for o in state.open_orders if o.client_order_id.startswith(tag)], version


async def deploy(
    client: Client, task_queue: str, s: RollbackScenario, version: str
) -> WorkflowHandle:
    return await client.start_workflow(
        DeployWorkflow.run,
        DeployInput(
            strategy="sample",
            env=s.env,
            version=version,
            reason=f"release {version}",
            requested_by="carol",
        ),
        id=fresh_id("deploy"),
        task_queue=task_queue,
    )


async def assert_rolled_back_to_good(
    client: Client,
    sandbox_admin: SandboxAdmin,
    s: RollbackScenario,
    report: DeployReport,
    bad: str,
    rolled_from: str,
) -> str:
    """The deploy's rollback child brought 1.0.0 back alone on the restored database; nothing of
    ``bad`` is open, the position was closed and never flipped, and the venue's own records show
    one version at a time. Returns that evidence."""
    assert report.rollback_workflow_id is not None
    rollback = client.get_workflow_handle_for(RollbackWorkflow.run, report.rollback_workflow_id)
    rolled = await rollback.result()
    assert rolled.outcome is RollbackOutcome.ROLLED_BACK, rolled.error
    assert (rolled.version_from, rolled.version_to) == (rolled_from, GOOD), rolled
    # 1.0.0 runs alone again, on the restored database (no lease row: it sends alone).
    assert await s.target.running_versions() == [GOOD]
    assert await s.target.current() == GOOD
    await assert_eventually(lambda: healthy(s.target, GOOD))
    assert lease.read_lease(s.strategy_db, s.account.futures) is None
    await assert_eventually(lambda: quoting(sandbox_admin, s, GOOD))
    after = await sandbox_admin.state(s.api_key)
    prefix = prefix_of(s)
    tag = f"{prefix}-{version_tag(bad)}-"
    assert [o for o in after.open_orders if o.client_order_id.startswith(tag)] == []
    assert any(o.client_order_id.startswith(tag) for o in after.orders)  # it did trade
    (held,) = [p for p in after.positions if p.symbol == HELD]
    assert held.qty == 0 and not held.flipped, held
    found = spans(after, prefix)
    assert {x.version for x in found} == {GOOD, bad}
    return assert_one_version_at_a_time(found)


def stages(report: DeployReport) -> dict[str, StepState]:
    return {n.name: n.state for n in report.tree}


async def test_a_good_release_is_promoted_and_alone_holds_the_lease(
    client: Client, sandbox_admin: SandboxAdmin, rollback_scenario: Scenarios
) -> None:
    async with rollback_scenario(deploy=DEPLOY) as s, s.worker(client) as worker:
        build_release(s.base / "r", "sample", NEW, Fault.NONE)
        handle = await deploy(client, worker.task_queue, s, NEW)

        async def awaiting() -> None:
            status = await handle.query(DeployWorkflow.status)
            assert status.paused is None, status.paused  # the canary passed on its own
            assert status.awaiting_approval, status.stage

        await assert_eventually(awaiting, timeout=60, interval=0.2)
        await handle.execute_update(
            DeployWorkflow.approve_promotion, ApprovalDecision(approver="bob")
        )
        report: DeployReport = await handle.result()
        tree = "\n".join(f"{n.name} {n.state.value} {n.detail}" for n in report.tree)
        assert report.outcome is DeployOutcome.PROMOTED, f"{report.error}\n{tree}"
        assert stages(report) == {
            x.value: StepState.SKIPPED
            if x is Stage.VALIDATE  # no staging env in the runbook
            else StepState.PENDING
            if x is Stage.ROLLBACK
            else StepState.DONE
            for x in Stage
        }, tree
        assert report.shadow is not None and report.shadow.decisions_compared > 0, report.shadow
        assert [a.verdict for a in report.analyses] == [Verdict.PASS], report.analyses
        assert report.approvals == ["bob"]
        assert report.handover is not None and report.handover.holder == NEW

        # Only the new version runs, it holds the lease at full capital, and it trades.
        assert await s.target.running_versions() == [NEW]
        assert await s.target.current() == NEW
        await assert_eventually(lambda: healthy(s.target, NEW))
        held = lease.read_lease(s.strategy_db, s.account.futures)
        assert held is not None and held.holder == NEW and held.mode is lease.LeaseMode.ACTIVE
        await assert_eventually(lambda: quoting(sandbox_admin, s, NEW))

        found = spans(await sandbox_admin.state(s.api_key), prefix_of(s))
        assert {x.version for x in found} == {GOOD, NEW}
        evidence = assert_one_version_at_a_time(found)
        print(f"\n{tree}\nhandover {report.handover}\n{evidence}")


async def test_a_slow_release_is_caught_by_the_canary_and_rolled_back(
    client: Client, sandbox_admin: SandboxAdmin, rollback_scenario: Scenarios
) -> None:
    async with rollback_scenario(deploy=DEPLOY) as s, s.worker(client) as worker:
        build_release(s.base / "r", "sample", SLOW, Fault.LATENCY)
        # A position the strategy does not trade: the rollback's flatten closes it.
        await sandbox_admin.set_positions(s.api_key, [PositionSet(symbol=HELD, qty=HELD_QTY)])
        handle = await deploy(client, worker.task_queue, s, SLOW)
        report: DeployReport = await handle.result()
        tree = "\n".join(f"{n.name} {n.state.value} {n.detail}" for n in report.tree)
        assert report.outcome is DeployOutcome.ROLLED_BACK, f"{report.error}\n{tree}"
        assert report.failed_stage is Stage.CANARY, tree
        assert [a.verdict for a in report.analyses] == [Verdict.FAIL], report.analyses
        assert "order_latency_p99_s" in report.error
        evidence = await assert_rolled_back_to_good(
            client, sandbox_admin, s, report, bad=SLOW, rolled_from=GOOD
        )
        print(f"\n{tree}\nhandover {report.handover}\n{evidence}")
