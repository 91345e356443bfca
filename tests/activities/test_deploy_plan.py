"""The deployment's plan from real runbook files and the real deploy target: staging resolved by
env, the runbook's policy carried over, and deployments that could never be promoted refused
before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.deploy_plan import DeployPlanner
from activities.targets.activities import TargetActivities
from worker.main import deploy_targets
from workflows.deployment_models import DeployInput

PROD = """\
strategy: momentum
env: prod
accounts: [alpha-futures]
target:
  kind: supervisor
  releases_root: {root}/r
  state_dir: {root}/t-prod
  strategy_config: {root}/c.json
  http_port: 8081
database: {{kind: sqlite, path: {root}/prod.sqlite}}
flatten: {{mode: auto}}
approvers: [bob, carol]
deploy:
  staging_env: staging
  checks: [feed, kill-switch]
  canary:
    - {{capital: 0.05, bake_s: 60}}
    - {{capital: 0.25, bake_s: 120}}
  analysis:
    metrics: [{{name: order_latency_p99_s, direction: higher-is-worse}}]
    gates: [{{metric: reject_rate, comparator: "<=", threshold: 0.05}}]
  retire_delay_s: 600
  monitor_window_s: 5
"""
STAGING = """\
strategy: momentum
env: staging
accounts: [alpha-spot]
target:
  kind: supervisor
  releases_root: {root}/r
  state_dir: {root}/t-stg
  strategy_config: {root}/c.json
  http_port: 8082
database: {{kind: sqlite, path: {root}/staging.sqlite}}
flatten: {{mode: auto}}
"""


def planner(runbooks: Path) -> DeployPlanner:
    return DeployPlanner(runbooks, TargetActivities(deploy_targets(runbooks)).target)


def request(env: str = "prod", version: str = "1.4.0") -> DeployInput:
    return DeployInput(
        strategy="momentum", env=env, version=version, reason="release", requested_by="alice"
    )


async def refused(runbooks: Path, deploy: DeployInput) -> ApplicationError:
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(planner(runbooks).plan, deploy)
    assert e.value.non_retryable
    return e.value


async def test_the_plan_carries_the_runbook_policy_and_the_staging_env(tmp_path: Path) -> None:
    (tmp_path / "prod.yaml").write_text(PROD.format(root=tmp_path))
    (tmp_path / "staging.yaml").write_text(STAGING.format(root=tmp_path))
    plan = await ActivityEnvironment().run(planner(tmp_path).plan, request())
    assert str(plan.ref) == "momentum/prod" and str(plan.staging) == "momentum/staging"
    assert (plan.version_from, plan.version_to) == (None, "1.4.0")  # nothing deployed yet
    assert plan.checks == ["feed", "kill-switch"]
    assert [s.capital for s in plan.canary] == [0.05, 0.25]
    assert plan.accounts == ["alpha-futures"]
    assert plan.analysis is not None and plan.analysis.gates[0].metric == "reject_rate"
    assert plan.approvers == ["bob", "carol"] and plan.retire_delay_s == 600
    assert plan.monitor_window_s == 5


async def test_a_missing_staging_runbook_is_refused(tmp_path: Path) -> None:
    (tmp_path / "prod.yaml").write_text(PROD.format(root=tmp_path))
    error = await refused(tmp_path, request())
    assert error.type == "ConfigError" and "no runbook for momentum/staging" in error.message


async def test_a_runbook_without_approvers_is_refused(tmp_path: Path) -> None:
    text = PROD.format(root=tmp_path).replace("approvers: [bob, carol]\n", "")
    (tmp_path / "prod.yaml").write_text(text)
    (tmp_path / "staging.yaml").write_text(STAGING.format(root=tmp_path))
    error = await refused(tmp_path, request())
    assert "no approvers; promotion needs one" in error.message


async def test_an_unknown_system_is_refused(tmp_path: Path) -> None:
    (tmp_path / "prod.yaml").write_text(PROD.format(root=tmp_path))
    error = await refused(tmp_path, request(env="qa"))
    assert "no runbook for momentum/qa" in error.message
