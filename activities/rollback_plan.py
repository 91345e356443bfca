"""The rollback's plan: runbook, versions and snapshot resolved once, at the start of the saga.

The result goes into history, so a runbook edited (or a snapshot taken) while a rollback runs
cannot change what that rollback does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import yaml
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.accounts import ConfigError
from activities.heartbeat import heartbeating
from activities.runbooks import Runbook, load_runbook
from activities.snapshot_catalog import SnapshotCatalog
from activities.targets.base import DeployTarget
from workflows.deploy_models import StrategyRef
from workflows.rollback_models import RollbackInput, RollbackPlan, SystemLocation
from workflows.snapshot_models import SnapshotRecord

NOT_RUNBOOKS = {"accounts.yaml"}


def _refuse(message: str, kind: str = "PlanRefused") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def find_runbook(runbooks_dir: Path, strategy: str, env: str) -> Runbook:
    """The runbook of one strategy in one environment (exactly one must exist).

    A broken file of another system is skipped: it must never stop a rollback of this one
    (``breakglass runbook validate`` reports it). A broken file that may be this system's (its
    name, or the strategy and env it names) is this system's problem and is reported.
    """
    found: list[tuple[Path, Runbook]] = []
    ours_broken: list[str] = []
    others_broken = 0
    for path in sorted(runbooks_dir.glob("*.yaml")):
        if path.name in NOT_RUNBOOKS:
            continue
        try:
            runbook = load_runbook(path)
        except ConfigError as e:
            if _may_be_of(path, strategy, env):
                ours_broken.append(str(e))
            else:
                others_broken += 1
            continue
        if runbook.strategy == strategy and runbook.env == env:
            found.append((path, runbook))
    if ours_broken:
        raise ConfigError("\n".join(ours_broken))
    if not found:
        hint = (
            f" ({others_broken} other file(s) there could not be read: breakglass runbook validate)"
            if others_broken
            else ""
        )
        raise ConfigError(f"no runbook for {strategy}/{env} in {runbooks_dir}{hint}")
    if len(found) > 1:
        raise ConfigError(f"several runbooks for {strategy}/{env}: {[str(p) for p, _ in found]}")
    return found[0][1]


def _may_be_of(path: Path, strategy: str, env: str) -> bool:
    """Whether a runbook that failed to load may describe ``strategy``/``env``: named so, or
    naming them (any value of a key written twice counts)."""
    if path.stem == f"{strategy}-{env}":
        return True
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(root, yaml.MappingNode):
        return False
    named: dict[str, set[str]] = {"strategy": set(), "env": set()}
    for key, value in root.value:
        if isinstance(value, yaml.ScalarNode) and key.value in named:
            named[key.value].add(str(value.value))
    return strategy in named["strategy"] and env in named["env"]


class RollbackPlanner:
    """Reads the runbook, asks the deploy target for its versions and picks the snapshot."""

    def __init__(
        self,
        runbooks_dir: Path,
        target_for: Callable[[StrategyRef], DeployTarget],
        catalog: SnapshotCatalog,
    ) -> None:
        self.runbooks_dir = runbooks_dir
        self.target_for = target_for
        self.catalog = catalog

    @activity.defn(name="plan_rollback")
    async def plan(self, request: RollbackInput) -> RollbackPlan:
        async with heartbeating({"phase": "planning"}):
            return await self._plan(request)

    @activity.defn(name="locate_system")
    async def locate(self, request: RollbackInput) -> SystemLocation:
        """Where the system is, from its runbook alone: what a safe stop halts, stops and
        cancels when the plan failed (no versions, no snapshot needed)."""
        async with heartbeating({"phase": "locating"}):
            try:
                runbook = await asyncio.to_thread(
                    find_runbook, self.runbooks_dir, request.strategy, request.env
                )
            except ConfigError as e:
                raise _refuse(str(e), "ConfigError") from None
        return SystemLocation(
            ref=runbook.ref,
            accounts=runbook.accounts,
            database=runbook.database,
            timeouts=runbook.timeouts,
        )

    async def _plan(self, request: RollbackInput) -> RollbackPlan:
        try:
            runbook = await asyncio.to_thread(
                find_runbook, self.runbooks_dir, request.strategy, request.env
            )
        except ConfigError as e:
            raise _refuse(str(e), "ConfigError") from None
        target = self.target_for(runbook.ref)
        version_from = await target.current()
        version_to = request.target_version or await target.previous()
        if version_to is None:
            raise _refuse(f"{runbook.ref}: no previous version is recorded; name one")
        if version_to == version_from:
            # Still current, but a deployment's candidate may run (and trade) beside it: rolling
            # back to the current version then clears the candidate. Otherwise nothing to do.
            beside = [v for v in await target.running_versions() if v != version_to]
            if not beside:
                raise _refuse(f"{runbook.ref}: {version_to} is already the current version")
        snapshot = await asyncio.to_thread(self._snapshot, request, version_to)
        return RollbackPlan(
            ref=runbook.ref,
            accounts=runbook.accounts,
            database=runbook.database,
            version_from=version_from,
            version_to=version_to,
            snapshot=snapshot,
            flatten=runbook.flatten.mode,
            approval_timeout_s=runbook.flatten.approval_timeout_s,
            on_timeout=runbook.flatten.on_timeout.value,
            approvers=runbook.approvers,
            quorum=runbook.quorum,
            health_timeout_s=runbook.health.timeout_s,
            health_interval_s=runbook.health.interval_s,
            timeouts=runbook.timeouts,
        )

    def _snapshot(self, request: RollbackInput, version: str) -> SnapshotRecord:
        if request.snapshot_id is not None:
            record = self.catalog.get(request.snapshot_id)
            if record is None:
                raise _refuse(f"no snapshot {request.snapshot_id}")
            if (record.strategy, record.env) != (request.strategy, request.env):
                raise _refuse(
                    f"snapshot {record.id} is of {record.strategy}/{record.env}, "
                    f"not {request.strategy}/{request.env}"
                )
            return record
        for record in self.catalog.list(request.strategy, request.env):  # newest first
            if record.version == version:
                return record
        raise _refuse(f"no snapshot of {request.strategy}/{request.env} at version {version}")
