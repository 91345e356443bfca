"""The rollback half of ``make demo``: a good release trades, its state is snapshotted, a faulty
release replaces it and storms the venue with rejected orders, and ``breakglass rollback`` brings
the good one back through Temporal.

These two deploys are done here directly on the deploy target (the trading lease handed to each
version as it starts, since only one runs); everything after "the release misbehaves" is the
real saga. ``worker.demo_deploy`` then shows a deployment as ``breakglass deploy`` runs it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from temporalio.testing import ActivityEnvironment

from activities.rollback_plan import find_runbook
from activities.snapshot_catalog import SnapshotCatalog
from activities.snapshots import SnapshotActivities
from activities.targets.base import DeployTarget
from activities.targets.registry import runbook_target
from sandbox.admin_client import SandboxAdmin
from sandbox.strategy import lease
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import build_release
from sandbox.strategy.state import set_trading_state
from worker.cli_common import console
from worker.settings import Settings
from workflows.snapshot_models import SnapshotRequest

STRATEGY, ENV = "sample", "demo"
GOOD, FAULTY, NEXT = "1.0.0", "1.1.0", "1.2.0"
ACCOUNT = "alpha-futures"
"""The runbook's account: the key of the strategy's trading lease."""


def prepare(settings: Settings) -> tuple[DeployTarget, SnapshotActivities]:
    runbook = find_runbook(settings.runbooks_dir, STRATEGY, ENV)
    target_options = runbook.target
    for version, fault in ((GOOD, Fault.NONE), (FAULTY, Fault.REJECT_STORM), (NEXT, Fault.NONE)):
        build_release(target_options.releases_root, STRATEGY, version, fault)  # idempotent
    config = StrategyConfig(
        exchange_address=f"127.0.0.1:{settings.dev_sandbox_port}",
        ca_file=settings.sandbox_ca().resolve(),
        api_key_env="BG_ALPHA_FUTURES_KEY",
        secret_env="BG_ALPHA_FUTURES_SECRET",
        account=ACCOUNT,
        db=str(runbook.database.path),
        port_file=target_options.port_file,
        symbols=["ETHUSDT"],
        client_id_prefix="sgdemo",
        # The strategy shares the sandbox's one-IP weight budget with the kill switch (as it would
        # on Binance from one host): a slow loop keeps its share small.
        loop_interval_s=5.0,
        loop_stale_s=15.0,
        feed_stale_s=15.0,
    )
    target_options.strategy_config.parent.mkdir(parents=True, exist_ok=True)
    target_options.strategy_config.write_text(config.model_dump_json())
    target = runbook_target(runbook)
    store = settings.snapshots_dir()
    store.mkdir(parents=True, exist_ok=True)
    snapshots = SnapshotActivities(SnapshotCatalog(store / "catalog.sqlite"), store / "store")
    return target, snapshots


async def wait_healthy(target: DeployTarget, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        report = await target.health(timeout_s=1.0)
        if report.healthy and report.version == version:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version} did not become healthy: {report.detail}")
        await asyncio.sleep(0.5)


async def run_rollback(settings: Settings, admin: SandboxAdmin) -> int:
    weight_window_end = time.monotonic() + 61
    runbook = find_runbook(settings.runbooks_dir, STRATEGY, ENV)
    target, snapshots = prepare(settings)
    console.print(f"[bold]5. deploy {GOOD}[/bold] (good release) and snapshot its state")
    # A deploy starts trading (an earlier demo run may have left the database HALTED).
    db = str(runbook.database.path)
    set_trading_state(db, "ACTIVE", "demo", f"deploy {GOOD}")
    lease.grant(db, ACCOUNT, GOOD, "demo", f"deploy {GOOD}")
    await target.activate(GOOD, requested_by="demo", reason="demo: the good release")
    await wait_healthy(target, GOOD)
    await asyncio.sleep(2)  # let it quote and keep some state
    record = await ActivityEnvironment().run(
        snapshots.snapshot,
        SnapshotRequest(
            strategy=STRATEGY,
            env=ENV,
            version=GOOD,
            database=runbook.database,
            reason=f"before deploying {FAULTY}",
            idempotency_key=f"demo-{int(time.time())}",
        ),
    )
    console.print(
        f"   snapshot {record.id}: {record.rows} rows, content {record.content_checksum[:12]}"
    )
    console.print(f"[bold]6. deploy {FAULTY}[/bold]: a faulty release (reject storm)")
    rejected = (await admin.stats()).requests_by_status.get("400", 0)
    lease.grant(db, ACCOUNT, FAULTY, "demo", f"deploy {FAULTY}")  # 1.0.0 stops as it starts
    await target.activate(FAULTY, requested_by="demo", reason="demo: the faulty release")
    await wait_healthy(target, FAULTY)
    await asyncio.sleep(8)
    storm = (await admin.stats()).requests_by_status.get("400", 0) - rejected
    console.print(f"   the venue answered {storm} rejected requests in 8 s: roll it back")
    # Everything here trades from one IP: the kill above spent most of the minute's request
    # weight, and the worker's limiter (rightly) backs off rather than risk a 429/418 ban.
    wait = weight_window_end - time.monotonic()
    if wait > 0:
        console.print(f"   waiting {wait:.0f}s for the venue's request-weight minute to roll over")
        await asyncio.sleep(wait)
    console.print("[bold]7. the rollback saga[/bold], through Temporal, as on-call runs it:")
    console.print(
        f'   $ breakglass rollback {STRATEGY} --env {ENV} --reason "demo: reject storm" --yes'
    )
    argv = [
        sys.executable, "-m", "worker.cli", "rollback", STRATEGY, "--env", ENV,
        "--reason", "demo: reject storm", "--yes", "--as", "demo",
    ]  # fmt: skip
    code = await asyncio.to_thread(subprocess.call, argv)
    running = await target.running_versions()
    health = await target.health(timeout_s=2.0)
    deadline = time.monotonic() + 12  # the strategy reports its state once per (5 s) loop
    while health.trading_state != "ACTIVE" and time.monotonic() < deadline:
        await asyncio.sleep(1)
        health = await target.health(timeout_s=2.0)
    console.print(
        f"[bold]8. checked on the target[/bold]: running {running}, "
        f"{health.version} {'healthy' if health.healthy else 'UNHEALTHY'}, "
        f"trading state {health.trading_state}"
    )
    console.print(f"   supervisord and strategy logs: {runbook.target.state_dir}")
    return code
