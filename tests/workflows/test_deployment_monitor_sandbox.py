"""A release that fails only after promotion, end to end through the real parts (dev Temporal
server, sandbox exchange, supervisord, the sample strategy): its reject storm starts
``fault_after_s`` after the process starts, so the shadow and the canary see a good release; the
post-promotion monitoring's hard gates catch it and the rollback brings back the old version,
which was still warm."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import PositionSet
from sandbox.strategy import lease
from sandbox.strategy.app import version_tag
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import build_release
from tests.fixtures.rollback import GOOD, HELD, HELD_QTY, Scenarios, healthy
from tests.helpers import assert_eventually
from tests.workflows.test_deployment_sandbox import (
    assert_one_version_at_a_time,
    deploy,
    prefix_of,
    quoting,
    spans,
    stages,
)
from workflows.analysis_models import Verdict
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import DeployOutcome, DeployReport, Stage
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import ApprovalDecision, RollbackOutcome
from workflows.shared import StepState

pytestmark = pytest.mark.timeout(120)

LATE = "2.2.0"
FAULT_AFTER_S = 18.0
"""The candidate starts at the shadow and is promoted about 12 s later (health, 4 s shadow, 6 s
canary, approval): the storm starts after the canary was judged, in the first monitoring window
(a few seconds late, it falls in the second)."""
DEPLOY = """\
  shadow_bake_s: 4
  min_shadow_agreement: 0.5
  canary: [{capital: 0.2, bake_s: 6}]
  analysis:
    gates:
      - {metric: order_latency_p99_s, comparator: "<", threshold: 1.0}
      - {metric: reject_rate, comparator: "<", threshold: 0.5}
    min_trades: 0
  approval_timeout_s: 120
  monitor_s: 30
  retire_delay_s: 2
"""
"""Short bakes; monitoring runs in three 10 s windows and ends at the first violated gate."""


async def test_a_release_failing_after_promotion_is_caught_by_monitoring_and_rolled_back(
    client: Client, sandbox_admin: SandboxAdmin, rollback_scenario: Scenarios
) -> None:
    async with rollback_scenario(deploy=DEPLOY) as s, s.worker(client) as worker:
        build_release(s.base / "r", "sample", LATE, Fault.REJECT_STORM)
        # Versions started from now on read the slow burn (1.0.0 has no fault to delay).
        config_file = s.base / "strategy.json"
        config = StrategyConfig.model_validate_json(config_file.read_text())
        config_file.write_text(
            config.model_copy(update={"fault_after_s": FAULT_AFTER_S}).model_dump_json()
        )
        # A position the strategy does not trade: the rollback's flatten closes it.
        await sandbox_admin.set_positions(s.api_key, [PositionSet(symbol=HELD, qty=HELD_QTY)])
        handle = await deploy(client, worker.task_queue, s, LATE)

        async def awaiting() -> None:
            status = await handle.query(DeployWorkflow.status)
            assert status.paused is None, status.paused  # the canary passed on its own
            assert status.awaiting_approval, status.stage

        await assert_eventually(awaiting, timeout=60, interval=0.2)
        await handle.execute_update(
            DeployWorkflow.approve_promotion, ApprovalDecision(approver="bob")
        )
        report: DeployReport = await handle.result()
        tree = "\n".join(
            f"{n.name} {n.state.value} {n.detail}"
            + "".join(f"\n  {c.name} {c.state.value} {c.detail}" for c in n.children)
            for n in report.tree
        )
        assert report.outcome is DeployOutcome.ROLLED_BACK, f"{report.error}\n{tree}"
        assert report.failed_stage is Stage.MONITOR, tree
        # Shadow and canary saw a good release; it was promoted, then it failed.
        assert [a.verdict for a in report.analyses] == [Verdict.PASS], report.analyses
        assert stages(report)[Stage.PROMOTE.value] is StepState.DONE, tree
        assert stages(report)[Stage.RETIRE.value] is StepState.PENDING, tree
        assert report.monitoring and report.monitoring[-1].verdict is Verdict.FAIL, tree
        assert "gate reject_rate < 0.5 violated" in report.error, report.error
        monitor = next(n for n in report.tree if n.name == Stage.MONITOR.value)
        assert monitor.children[-1].state is StepState.FAILED, tree

        assert report.rollback_workflow_id is not None
        rollback = client.get_workflow_handle_for(RollbackWorkflow.run, report.rollback_workflow_id)
        rolled = await rollback.result()
        assert rolled.outcome is RollbackOutcome.ROLLED_BACK, rolled.error
        assert (rolled.version_from, rolled.version_to) == (LATE, GOOD), rolled

        # 1.0.0 runs alone again, on the restored database (no lease row: it sends alone).
        assert await s.target.running_versions() == [GOOD]
        assert await s.target.current() == GOOD
        await healthy(s.target, GOOD)
        assert lease.read_lease(s.strategy_db, s.account.futures) is None
        await assert_eventually(lambda: quoting(sandbox_admin, s, GOOD), timeout=10)

        after = await sandbox_admin.state(s.api_key)
        prefix = prefix_of(s)
        late = f"{prefix}-{version_tag(LATE)}-"
        assert [o for o in after.open_orders if o.client_order_id.startswith(late)] == []
        assert any(o.client_order_id.startswith(late) for o in after.orders)  # it did trade
        (held,) = [p for p in after.positions if p.symbol == HELD]
        assert held.qty == 0 and not held.flipped, held
        found = spans(after, prefix)
        assert {x.version for x in found} == {GOOD, LATE}
        evidence = assert_one_version_at_a_time(found)
        by_name = {n.name: n for n in report.tree}
        started = by_name[Stage.SHADOW.value].started_at
        assert started is not None
        margin = {
            n: (by_name[n].finished_at or started) - started
            for n in (Stage.CANARY.value, Stage.PROMOTE.value, Stage.MONITOR.value)
        }
        timing = ", ".join(f"{n} ended {t.total_seconds():.1f}s" for n, t in margin.items())
        print(f"\n{tree}\nafter the candidate's start: {timing} (storm at {FAULT_AFTER_S:g}s)")
        print(f"handover {report.handover}\n{evidence}")
