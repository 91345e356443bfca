"""The rollback saga end to end through the real parts: the Temporal dev server, an in-process
worker wired like ``worker.main``, supervisord running the sample strategy, its SQLite state
database and the sandbox exchange. The parts' own views judge the result: the sandbox's admin
state, supervisord, the strategy's /healthz and its database."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.snapshots import SnapshotActivities
from activities.targets import SupervisorTarget
from activities.targets.activities import TargetActivities
from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import PositionSet
from sandbox.strategy.config import Fault
from sandbox.strategy.releases import build_release
from sandbox.strategy.state import state_history
from tests.fixtures.sandbox import SandboxHandle
from tests.fixtures.venues import MakeRig
from tests.helpers import assert_eventually, fresh_id, new_worker
from tests.sandbox.test_strategy import strategy_config
from worker.main import WORKFLOWS, activities_for, rollback_activities
from worker.settings import Settings
from workflows.deploy_models import StrategyRef
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import RollbackInput, RollbackOutcome, RollbackStep
from workflows.shared import KillOutcome, StepState
from workflows.snapshot_models import DatabaseRef, SnapshotRequest

pytestmark = pytest.mark.timeout(90)

GOOD, FAULTY = "1.0.0", "1.1.0"
SYMBOL = "ETHUSDT"
"""The strategy quotes this one; the position flatten must close is on another symbol."""
HELD = "BTCUSDT"
T = TypeVar("T")


def runbook_yaml(
    env: str, account: str, base: Path, config: Path, port_file: Path, db: Path
) -> str:
    return f"""strategy: sample
env: {env}
accounts: [{account}]
target:
  kind: supervisor
  releases_root: {base / "r"}
  state_dir: {base / "t"}
  strategy_config: {config}
  http_port: 0
  port_file: {port_file}
  start_secs: 1
database:
  kind: sqlite
  path: {db}
flatten:
  mode: auto
timeouts:
  activate_s: 60
  flatten_s: 60
health:
  path: /healthz
  timeout_s: 30
"""


def wired(activities: list[Callable[..., Any]], cls: type[T]) -> T:
    """The instance behind the worker's bound activity methods of ``cls``."""
    return next(
        a.__self__  # type: ignore[attr-defined]
        for a in activities
        if isinstance(getattr(a, "__self__", None), cls)
    )


async def healthy(target: SupervisorTarget, version: str) -> None:
    report = await target.health(timeout_s=1.0)
    assert report.healthy and report.version == version, report


async def test_rollback_brings_back_the_previous_version_end_to_end(
    client: Client,
    sandbox: SandboxHandle,
    sandbox_admin: SandboxAdmin,
    make_rig: MakeRig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    env = f"e2e{secrets.token_hex(3)}"
    ref = StrategyRef(strategy="sample", env=env)
    # Short base: the supervisord unix socket lives under it.
    base = Path(tempfile.mkdtemp(prefix="bg"))
    db = base / "state.sqlite"
    for version, fault in ((GOOD, Fault.NONE), (FAULTY, Fault.REJECT_STORM)):
        build_release(base / "r", "sample", version, fault)
    config = strategy_config(
        sandbox,
        base,
        db=str(db),
        symbols=[SYMBOL],
        loop_interval_s=0.5,
        api_key_env=account.key_env,
        secret_env=account.secret_env,
    )
    assert config.port_file is not None
    config_file = base / "strategy.json"
    config_file.write_text(config.model_dump_json())
    # supervisord hands its environment (the rig's credentials are set already) to strategies.
    monkeypatch.setenv("STRATEGY_FEED_TOKEN", sandbox.admin_token)
    runbooks = base / "rb"
    runbooks.mkdir()
    (runbooks / f"sample-{env}.yaml").write_text(
        runbook_yaml(env, account.futures, base, config_file, config.port_file, db)
    )

    # Wired like the worker does it, on this test's runbooks and state folders.
    rollback = rollback_activities(Settings(runbooks_dir=runbooks, state_dir=base / "bg"))
    snapshots = wired(rollback, SnapshotActivities)
    target = wired(rollback, TargetActivities).targets[ref]
    assert isinstance(target, SupervisorTarget)
    gateway = rig.gateway()
    try:
        # ---- the good version trades; its state is snapshotted before the next deploy
        await target.activate(GOOD, requested_by="pytest", reason="first deploy")
        await assert_eventually(lambda: healthy(target, GOOD), timeout=15)

        async def quoting() -> None:
            state = await sandbox_admin.state(account.api_key)
            assert {(o.symbol, o.side) for o in state.open_orders} == {
                (SYMBOL, "BUY"),
                (SYMBOL, "SELL"),
            }

        await assert_eventually(quoting, timeout=10)
        snapshot = await ActivityEnvironment().run(
            snapshots.snapshot,
            SnapshotRequest(
                strategy="sample",
                env=env,
                version=GOOD,
                database=DatabaseRef(path=db),
                reason=f"before deploying {FAULTY}",
                idempotency_key=f"pytest/{env}/pre-deploy-{FAULTY}",
            ),
        )
        assert snapshot.version == GOOD and "trading_state" in snapshot.tables

        # ---- the faulty version storms the venue with rejected orders; a position is open
        rejected_before = (await sandbox_admin.stats()).requests_by_status.get("400", 0)
        record = await target.activate(FAULTY, requested_by="pytest", reason="release 1.1.0")
        assert record.previous == GOOD and record.running_versions == [FAULTY]
        await assert_eventually(lambda: healthy(target, FAULTY), timeout=15)

        async def storming() -> None:
            stats = await sandbox_admin.stats()
            assert stats.requests_by_status.get("400", 0) >= rejected_before + 3

        await assert_eventually(storming, timeout=10)
        await sandbox_admin.set_positions(
            account.api_key, [PositionSet(symbol=HELD, qty=Decimal("0.004"))]
        )
        before = await sandbox_admin.state(account.api_key)
        orders_before = {o.order_id for o in before.orders}

        # ---- the rollback saga on an in-process worker
        async with new_worker(
            client, *WORKFLOWS, activities=[*activities_for(gateway, []), *rollback]
        ) as worker:
            report = await client.execute_workflow(
                RollbackWorkflow.run,
                RollbackInput(
                    strategy="sample", env=env, reason="reject storm", requested_by="pytest"
                ),
                id=fresh_id("rollback"),
                task_queue=worker.task_queue,
            )

        timeline = "\n".join(f"{e.step.value} {e.state.value} {e.detail}" for e in report.timeline)
        assert report.outcome is RollbackOutcome.ROLLED_BACK, f"{report.error}\n{timeline}"
        assert (report.version_from, report.version_to) == (FAULTY, GOOD)
        assert report.snapshot_id == snapshot.id
        assert report.flatten == "flattened"

        # Supervisord and the strategy: only the previous version runs, and it is healthy.
        assert await target.running_versions() == [GOOD]
        assert await target.current() == GOOD
        await healthy(target, GOOD)

        # The venue: every order alive before the rollback is gone, the position is closed
        # without ever changing sign; both kills verified it on the venue.
        assert [k.outcome for k in report.kills] == [KillOutcome.VERIFIED, KillOutcome.VERIFIED]
        assert report.kills[-1].outcome == KillOutcome.VERIFIED
        after = await sandbox_admin.state(account.api_key)
        assert [o for o in after.open_orders if o.order_id in orders_before] == []
        assert after.open_conditional_orders == []
        (held,) = [p for p in after.positions if p.symbol == HELD]
        assert held.qty == 0 and not held.flipped, held
        flattened = report.kills[-1].accounts[0]
        unified = "BTC/USDT:USDT"  # ccxt's name of HELD
        assert any(
            p.symbol == unified and p.quantity == Decimal("0.004")
            for p in flattened.positions_before
        ), flattened
        assert all(p.symbol != unified for p in flattened.positions_after), flattened

        # The database: restored to the snapshot's content (the RESTORE step says so).
        (restored,) = [
            e
            for e in report.timeline
            if e.step is RollbackStep.RESTORE and e.state is StepState.DONE
        ]
        assert restored.detail == f"content {snapshot.content_checksum[:12]} (restored)", timeline

        # Trading state: REDUCING then HALTED before the stop (the timeline; the restore then
        # replaced that history with the snapshot's), HALTED again after the restore, ACTIVE
        # once healthy (the database's own history).
        why = f"rollback {report.workflow_id}: reject storm"
        freezes = [
            e.detail
            for e in report.timeline
            if e.step is RollbackStep.FREEZE and e.state is StepState.DONE
        ]
        assert freezes == [
            f"ACTIVE -> REDUCING by pytest: {why}",
            f"REDUCING -> HALTED by pytest: {why}",
            f"ACTIVE -> HALTED by pytest: {why}",
            f"HALTED -> ACTIVE by pytest: {why}",
        ], timeline
        history = [(h[1], h[2], h[3], h[4]) for h in state_history(db)]
        assert history[-2:] == [
            ("ACTIVE", "HALTED", "pytest", why),
            ("HALTED", "ACTIVE", "pytest", why),
        ], history
        print(timeline)
    finally:
        target.shutdown_supervisord()
        await gateway.close()
        shutil.rmtree(base, ignore_errors=True)
