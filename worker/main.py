"""The Temporal worker process: wires the activities with their clients once and polls.

Run as ``python -m worker.main``; settings come from the environment (``BREAKGLASS_*``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Interceptor, Worker

from activities.accounts import ConfigError, load_accounts
from activities.bake import BakeActivities
from activities.deploy_plan import DeployPlanner
from activities.kill import KillActivities
from activities.lease import LeaseActivities
from activities.notify import ConsoleNotifier, Notifier, NotifyActivities
from activities.reconcile import ReconcileActivities
from activities.rollback_plan import NOT_RUNBOOKS, RollbackPlanner
from activities.runbooks import load_runbook
from activities.snapshot_catalog import SnapshotCatalog
from activities.snapshots import SnapshotActivities
from activities.staging_checks import StagingChecks
from activities.targets.activities import TargetActivities
from activities.targets.base import DeployTarget
from activities.targets.registry import runbook_target
from activities.trading_state import TradingStateActivities
from activities.venues import VenueGateway
from worker.process import exit_now
from worker.settings import Settings
from worker.temporal_client import TemporalUnreachable, connect
from workflows.deploy_models import StrategyRef
from workflows.deployment import DeployWorkflow
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow
from workflows.shared import TASK_QUEUE

log = logging.getLogger("breakglass.worker")

WORKFLOWS: Sequence[type] = (KillSwitchWorkflow, RollbackWorkflow, DeployWorkflow)
STICKY_FAILOVER = timedelta(seconds=3)
"""A dead worker's cached workflows move to another worker after this (SDK default 10 s): a kill
switch should not sit out the default when its worker was SIGKILLed."""
HEARTBEAT_THROTTLE = timedelta(seconds=2)
"""How often an activity's heartbeats reach the server at most. The SDK's default, 0.8 x the
heartbeat timeout, left the kill's 5 s timeout 1 s of slack (now 3 s): under 100 concurrent kills
on 2 cores 248 cancel_all and 444 flatten attempts timed out while their workers were alive."""


def gateway_for(settings: Settings) -> VenueGateway:
    return VenueGateway(
        load_accounts(settings.accounts_file),
        sandbox_address=settings.sandbox_address,
        sandbox_ca_file=settings.sandbox_ca(),
    )


def activities_for(gateway: VenueGateway, notifiers: list[Notifier]) -> list[Callable[..., Any]]:
    """The activities that talk to venues (and notify): the kill switch's, and the rollback's
    reconcile, which reads the venue to correct the strategy's database."""
    kill = KillActivities(gateway)
    notify = NotifyActivities(notifiers)
    reconcile = ReconcileActivities(gateway)
    return [
        kill.halt,
        kill.cancel_all,
        kill.flatten,
        kill.snapshot_venue_state,
        reconcile.reconcile,
        notify.notify,
    ]


def deploy_targets(runbooks_dir: Path) -> dict[StrategyRef, DeployTarget]:
    """The deploy target of every valid runbook; a broken runbook is logged and left out (a
    rollback of it is then refused with the runbook's own error)."""
    targets: dict[StrategyRef, DeployTarget] = {}
    for path in sorted(runbooks_dir.glob("*.yaml")):
        if path.name in NOT_RUNBOOKS:
            continue
        try:
            runbook = load_runbook(path)
        except ConfigError as e:
            log.error("runbook left out: %s", e)
            continue
        targets[runbook.ref] = runbook_target(runbook)
    return targets


def rollback_activities(settings: Settings) -> list[Callable[..., Any]]:
    """Snapshots, deploy targets, trading state and the planner, wired once."""
    store = settings.snapshots_dir()
    store.mkdir(parents=True, exist_ok=True)
    catalog = SnapshotCatalog(store / "catalog.sqlite")
    targets = TargetActivities(deploy_targets(settings.runbooks_dir))
    snapshots = SnapshotActivities(catalog, store / "store")
    planner = RollbackPlanner(settings.runbooks_dir, targets.target, catalog)
    return [
        planner.plan,
        planner.locate,
        DeployPlanner(settings.runbooks_dir, targets.target).plan,
        TradingStateActivities().set_state,
        snapshots.snapshot,
        snapshots.restore,
        snapshots.checksum,
        targets.stop_strategy,
        targets.activate_version,
        targets.check_health,
        targets.current_version,
        targets.start_candidate,
        targets.promote_version,
        targets.retire_version,
        targets.target_view,
        *bake_activities(targets),
    ]


def bake_activities(targets: TargetActivities) -> list[Callable[..., Any]]:
    """Shadow and canary measurements of a deployment, and the capital a version trades."""
    bake = BakeActivities(targets.target)
    return [bake.bake_shadow, bake.sample_metrics, bake.judge_canary, bake.set_allocation]


def deploy_venue_activities(settings: Settings, gateway: VenueGateway) -> list[Callable[..., Any]]:
    """The deployment's activities that trade: staging checks and the lease handover."""
    return [
        StagingChecks(settings.runbooks_dir, gateway).run,
        LeaseActivities(gateway).handover,
    ]


def build_worker(
    client: Client,
    gateway: VenueGateway,
    *,
    task_queue: str = TASK_QUEUE,
    extra_activities: Sequence[Callable[..., Any]] = (),
    **options: Any,
) -> Worker:
    options.setdefault("sticky_queue_schedule_to_start_timeout", STICKY_FAILOVER)
    options.setdefault("max_heartbeat_throttle_interval", HEARTBEAT_THROTTLE)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=list(WORKFLOWS),
        activities=[*activities_for(gateway, [ConsoleNotifier()]), *extra_activities],
        **options,
    )


async def serve(settings: Settings, interceptors: Sequence[Interceptor] = ()) -> None:
    """Run the worker until SIGTERM/SIGINT (``interceptors``: e.g. tracing, or a test's faults)."""
    gateway = gateway_for(settings)
    client = await connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = build_worker(
        client,
        gateway,
        task_queue=settings.task_queue,
        extra_activities=[
            *rollback_activities(settings),
            *deploy_venue_activities(settings, gateway),
        ],
        interceptors=list(interceptors),
    )
    try:
        async with worker:
            log.info(
                "worker started: task queue %s on %s (namespace %s), pid %d",
                settings.task_queue,
                settings.temporal_address,
                settings.temporal_namespace,
                os.getpid(),
            )
            await stop.wait()
            log.info("worker stopping")
    finally:
        await gateway.close()


def main(interceptors: Sequence[Interceptor] = ()) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    rc = 0
    try:
        asyncio.run(serve(Settings(), interceptors))
    except (ConfigError, TemporalUnreachable) as e:
        print(f"breakglass worker: {e}", file=sys.stderr)
        rc = 2
    exit_now(rc)


if __name__ == "__main__":
    main()
