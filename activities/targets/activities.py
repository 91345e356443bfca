"""Deploy-target activities: stop, activate, check health, read the current version."""

from __future__ import annotations

from collections.abc import Mapping

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.targets.base import DeployTarget, TargetError
from workflows.deploy_models import (
    ActivateRequest,
    ActivationRecord,
    CurrentVersion,
    HealthReport,
    HealthRequest,
    StopRequest,
    StopResult,
    StrategyRef,
)


class TargetActivities:
    """The worker wires one instance with the deploy target of every (strategy, env)."""

    def __init__(self, targets: Mapping[StrategyRef, DeployTarget]) -> None:
        self.targets = dict(targets)

    def target(self, ref: StrategyRef) -> DeployTarget:
        """The deploy target of one system (unknown: a non-retryable error)."""
        try:
            return self.targets[ref]
        except KeyError:
            raise ApplicationError(
                f"no deploy target for {ref}", type="UnknownTarget", non_retryable=True
            ) from None

    @staticmethod
    def _error(ref: StrategyRef, e: TargetError) -> ApplicationError:
        return ApplicationError(
            f"{ref}: {type(e).__name__}: {e}", type=type(e).__name__, non_retryable=not e.retryable
        )

    @activity.defn(name="stop_strategy")
    async def stop_strategy(self, request: StopRequest) -> StopResult:
        """Stop every running version (idempotent: nothing running is a success)."""
        activity.logger.info("stop %s by %s: %s", request.ref, request.requested_by, request.reason)
        try:
            async with heartbeating({"phase": "stopping"}):
                stopped = await self.target(request.ref).stop()
        except TargetError as e:
            raise self._error(request.ref, e) from None
        return StopResult(ref=request.ref, stopped_versions=stopped)

    @activity.defn(name="activate_version")
    async def activate_version(self, request: ActivateRequest) -> ActivationRecord:
        """Switch to the version; a repeat of the current activation changes nothing."""
        try:
            async with heartbeating({"phase": f"activating {request.version}"}):
                return await self.target(request.ref).activate(
                    request.version, requested_by=request.requested_by, reason=request.reason
                )
        except TargetError as e:
            raise self._error(request.ref, e) from None

    @activity.defn(name="check_health")
    async def check_health(self, request: HealthRequest) -> HealthReport:
        """One /healthz look (unhealthy is a result, not an error: the workflow decides)."""
        async with heartbeating({"phase": "probing"}):
            return await self.target(request.ref).health(request.timeout_s)

    @activity.defn(name="current_version")
    async def current_version(self, ref: StrategyRef) -> CurrentVersion:
        target = self.target(ref)
        return CurrentVersion(
            ref=ref,
            current=await target.current(),
            previous=await target.previous(),
            running=await target.running_versions(),
        )
