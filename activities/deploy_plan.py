"""The deployment's plan: runbook, versions and staging environment resolved once, at the start.

Like the rollback's plan, the result goes into history: a runbook edited while a deployment runs
cannot change what that deployment does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.accounts import ConfigError
from activities.heartbeat import heartbeating
from activities.rollback_plan import find_runbook
from activities.targets.base import DeployTarget
from workflows.deploy_models import StrategyRef
from workflows.deployment_models import DeployInput, DeployPlan


def _refuse(message: str, kind: str = "PlanRefused") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


class DeployPlanner:
    """Reads the runbook (and the staging env's), asks the deploy target for the current
    version, and refuses a deployment that could never be promoted."""

    def __init__(
        self, runbooks_dir: Path, target_for: Callable[[StrategyRef], DeployTarget]
    ) -> None:
        self.runbooks_dir = runbooks_dir
        self.target_for = target_for

    @activity.defn(name="plan_deploy")
    async def plan(self, request: DeployInput) -> DeployPlan:
        async with heartbeating({"phase": "planning"}):
            return await self._plan(request)

    async def _plan(self, request: DeployInput) -> DeployPlan:
        try:
            runbook = await asyncio.to_thread(
                find_runbook, self.runbooks_dir, request.strategy, request.env
            )
            policy = runbook.deploy
            staging = None
            if policy.staging_env is not None:
                staged = await asyncio.to_thread(
                    find_runbook, self.runbooks_dir, request.strategy, policy.staging_env
                )
                staging = staged.ref
        except ConfigError as e:
            raise _refuse(str(e), "ConfigError") from None
        if not runbook.approvers:
            raise _refuse(f"{runbook.ref}: the runbook names no approvers; promotion needs one")
        current = await self.target_for(runbook.ref).current()
        if current == request.version:
            raise _refuse(f"{runbook.ref}: {request.version} is already the current version")
        return DeployPlan(
            ref=runbook.ref,
            staging=staging,
            accounts=runbook.accounts,
            database=runbook.database,
            version_from=current,
            version_to=request.version,
            checks=[c.value for c in policy.checks] if staging is not None else [],
            shadow_bake_s=policy.shadow_bake_s,
            min_shadow_agreement=policy.min_shadow_agreement,
            canary=policy.canary,
            analysis=policy.analysis,
            pause_timeout_s=policy.pause_timeout_s,
            approvers=runbook.approvers,
            quorum=runbook.quorum,
            approval_timeout_s=policy.approval_timeout_s,
            monitor_s=policy.monitor_s,
            monitor_window_s=policy.monitor_window_s,
            retire_delay_s=policy.retire_delay_s,
            health_timeout_s=runbook.health.timeout_s,
            timeouts=runbook.timeouts,
        )
