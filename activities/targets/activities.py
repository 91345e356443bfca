"""Deploy-target activities: stop, activate, check health, read the current version, and the
blue/green steps (start a candidate beside the current version, promote it, retire a version)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.targets.base import DeployTarget, TargetError
from workflows.deploy_models import (
    ActivateRequest,
    ActivationRecord,
    CandidateRecord,
    CandidateRequest,
    CurrentVersion,
    HealthReport,
    HealthRequest,
    RetireRequest,
    RetireResult,
    StopRequest,
    StopResult,
    StrategyRef,
    TargetView,
)

T = TypeVar("T")


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

    async def _run(
        self, ref: StrategyRef, phase: str, step: Callable[[DeployTarget], Awaitable[T]]
    ) -> T:
        """One target call, heartbeating while it blocks; refusals become ApplicationErrors."""
        target = self.target(ref)
        try:
            async with heartbeating({"phase": phase}):
                return await step(target)
        except TargetError as e:
            raise self._error(ref, e) from None

    @activity.defn(name="stop_strategy")
    async def stop_strategy(self, request: StopRequest) -> StopResult:
        """Stop every running version (idempotent: nothing running is a success)."""
        activity.logger.info("stop %s by %s: %s", request.ref, request.requested_by, request.reason)
        stopped = await self._run(request.ref, "stopping", lambda t: t.stop())
        return StopResult(ref=request.ref, stopped_versions=stopped)

    @activity.defn(name="activate_version")
    async def activate_version(self, request: ActivateRequest) -> ActivationRecord:
        """Switch to the version; a repeat of the current activation changes nothing."""
        return await self._run(
            request.ref,
            f"activating {request.version}",
            lambda t: t.activate(
                request.version, requested_by=request.requested_by, reason=request.reason
            ),
        )

    @activity.defn(name="check_health")
    async def check_health(self, request: HealthRequest) -> HealthReport:
        """One /healthz look at the current version, or at ``request.version`` (unhealthy is a
        result, not an error: the workflow decides)."""
        async with heartbeating({"phase": "probing"}):
            target = self.target(request.ref)
            if request.version is None:
                return await target.health(request.timeout_s)
            return await target.health(request.timeout_s, version=request.version)

    @activity.defn(name="current_version")
    async def current_version(self, ref: StrategyRef) -> CurrentVersion:
        target = self.target(ref)
        return CurrentVersion(
            ref=ref,
            current=await target.current(),
            previous=await target.previous(),
            running=await target.running_versions(),
        )

    @activity.defn(name="start_candidate")
    async def start_candidate(self, request: CandidateRequest) -> CandidateRecord:
        """Start the version beside the current one (which stays current); a repeat says
        ``already_running``. Refused for good: the current version, an unknown release, a
        second version beside the current one."""
        activity.logger.info(
            "start candidate %s of %s by %s: %s",
            request.version,
            request.ref,
            request.requested_by,
            request.reason,
        )
        return await self._run(
            request.ref,
            f"starting candidate {request.version}",
            lambda t: t.start_candidate(
                request.version, requested_by=request.requested_by, reason=request.reason
            ),
        )

    @activity.defn(name="promote_version")
    async def promote_version(self, request: ActivateRequest) -> ActivationRecord:
        """Make a running version current without stopping the old one (kept warm); a repeat
        says ``already_active``. Refused for good when the version is not running."""
        activity.logger.info(
            "promote %s of %s by %s: %s",
            request.version,
            request.ref,
            request.requested_by,
            request.reason,
        )
        return await self._run(
            request.ref,
            f"promoting {request.version}",
            lambda t: t.promote(
                request.version, requested_by=request.requested_by, reason=request.reason
            ),
        )

    @activity.defn(name="retire_version")
    async def retire_version(self, request: RetireRequest) -> RetireResult:
        """Stop and remove one version (a repeat says ``already_retired``); the current one
        only with ``force``."""
        activity.logger.info(
            "retire %s of %s by %s%s: %s",
            request.version,
            request.ref,
            request.requested_by,
            " (FORCED)" if request.force else "",
            request.reason,
        )
        return await self._run(
            request.ref,
            f"retiring {request.version}",
            lambda t: t.retire(
                request.version,
                requested_by=request.requested_by,
                reason=request.reason,
                force=request.force,
            ),
        )

    @activity.defn(name="target_view")
    async def target_view(self, ref: StrategyRef) -> TargetView:
        """Current, previous, candidate and every version's process state."""
        return await self._run(ref, "reading", lambda t: t.versions())
