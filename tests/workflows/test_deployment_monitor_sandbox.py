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
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import build_release
from tests.fixtures.rollback import HELD, HELD_QTY, Scenarios
from tests.helpers import assert_eventually
from tests.workflows.test_deployment_sandbox import (
    assert_rolled_back_to_good,
    deploy,
    stages,
)
from workflows.analysis_models import Verdict
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import DeployOutcome, DeployReport, Stage
from workflows.rollback_models import ApprovalDecision
from workflows.shared import StepState

pytestmark = pytest.mark.timeout(300)  # a hang detector: a busy machine takes its time

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

        evidence = await assert_rolled_back_to_good(
            client, sandbox_admin, s, report, bad=LATE, rolled_from=LATE
        )
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
