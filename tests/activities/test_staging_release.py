"""The ``release`` staging check against the real parts: the sandbox exchange through unmodified
ccxt, the sample strategy's releases under a supervisord staging target, a SQLite state database.
A good release passes with its measurements; a crash-looping, an oversized and a reject-storming
release each fail naming what failed; every time the staging env is left as it was found: the
release stopped, the account clean on the venue's own records, the trading state ACTIVE.

One staging env serves the module (its account is reused: each check must leave it clean)."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.runbooks import load_runbook
from activities.staging_checks import StagingChecks
from activities.staging_release import runbook_target
from activities.targets import SupervisorTarget
from activities.targets.base import DeployTarget, TargetError
from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import PositionSet
from sandbox.strategy.config import Fault
from sandbox.strategy.releases import build_release
from sandbox.strategy.state import TradingState, get_trading_state, set_trading_state
from tests.fixtures.sandbox import SandboxHandle
from tests.fixtures.venues import Rig, SandboxAccount, accounts_yaml
from tests.sandbox.test_strategy import strategy_config
from workflows.deploy_models import StrategyRef, TargetView
from workflows.deployment_models import CheckRequest, CheckResult

pytestmark = pytest.mark.timeout(300)  # a hang detector; the bake itself is BAKE_S

STAGING = StrategyRef(strategy="sample", env="staging")
SYMBOL = "ETHUSDT"
BAKE_S = 3
RELEASES = {
    "1.0.0": Fault.NONE,
    "1.1.0-crash": Fault.CRASH_LOOP,
    "1.1.0-big": Fault.OVERSIZED,
    "1.1.0-storm": Fault.REJECT_STORM,
}


@dataclass
class Staging:
    rig: Rig
    runbooks: Path
    database: Path
    target: SupervisorTarget

    @property
    def api_key(self) -> str:
        return self.rig.accounts[0].api_key


@pytest_asyncio.fixture(scope="module")
async def staging(sandbox: SandboxHandle) -> AsyncIterator[Staging]:
    base = Path(tempfile.mkdtemp(prefix="bg"))  # short: supervisord's unix socket lives here
    account = SandboxAccount.fresh(f"st{secrets.token_hex(3)}", "BG_TEST")
    with pytest.MonkeyPatch.context() as env:
        # Set before supervisord starts: the strategy inherits its credentials from it.
        env.setenv(account.key_env, account.api_key)
        env.setenv(account.secret_env, account.secret)
        async with SandboxAdmin(sandbox.admin_url, sandbox.admin_token) as admin:
            await admin.create_account(account.api_key, account.secret)
            accounts_file = base / "accounts.yaml"
            accounts_file.write_text(accounts_yaml([account]))
            rig = Rig(sandbox, admin, accounts_file, [account])
            for version, fault in RELEASES.items():
                build_release(base / "r", "sample", version, fault)
            database = base / "state.sqlite"
            config = strategy_config(
                sandbox,
                base,
                db=str(database),
                symbols=[SYMBOL],
                api_key_env=account.key_env,
                secret_env=account.secret_env,
                account=account.futures,
            )
            (base / "strategy.json").write_text(config.model_dump_json())
            runbooks = base / "rb"
            runbooks.mkdir()
            (runbooks / "sample-staging.yaml").write_text(
                f"""strategy: sample
env: staging
accounts: [{account.futures}]
target:
  kind: supervisor
  releases_root: {base / "r"}
  state_dir: {base / "t"}
  strategy_config: {base / "strategy.json"}
  port_file: {config.port_file}
  start_secs: 1
database: {{kind: sqlite, path: {database}}}
flatten: {{mode: auto}}
health: {{timeout_s: 30, interval_s: 0.5}}
deploy:
  check_symbols: [{SYMBOL}]
  staging_bake_s: {BAKE_S}
"""
            )
            target = runbook_target(load_runbook(runbooks / "sample-staging.yaml"))
            assert isinstance(target, SupervisorTarget)
            try:
                yield Staging(rig, runbooks, database, target)
            finally:
                target.shutdown_supervisord()
                shutil.rmtree(base, ignore_errors=True)


async def run_release_check(
    s: Staging, version: str, target: DeployTarget | None = None
) -> CheckResult:
    """The check as the deployment runs it; ``target`` stands in for the staging target."""
    await s.rig.admin.reset_stats()  # a fresh per-minute weight budget, as if a minute passed
    if target is None:
        checks = StagingChecks(s.runbooks, s.rig.gateway())
    else:
        checks = StagingChecks(s.runbooks, s.rig.gateway(), target_for=lambda _: target)
    env = ActivityEnvironment()
    # A workflow id per check, as a deployment has: the check's own client ids never repeat.
    env.info = dataclasses.replace(env.info, workflow_id=f"deploy/sample/prod/{version}")
    try:
        return await env.run(
            checks.run, CheckRequest(ref=STAGING, version=version, check="release")
        )
    finally:
        await checks.gateway.close()


async def assert_left_as_found(s: Staging) -> None:
    """The venue's own records: nothing open, flat; the release stopped and removed from the
    target (``current`` untouched); the trading state back to ACTIVE."""
    state = await s.rig.admin.state(s.api_key)
    assert state.open_orders == [], state.open_orders[:3]
    assert all(p.qty == 0 for p in state.positions), state.positions  # the release flips its own
    view = await s.target.versions()
    assert view.running == [] and view.current is None and view.candidate is None, view
    assert get_trading_state(s.database).state is TradingState.ACTIVE


async def test_a_good_release_passes_with_its_measurements(staging: Staging) -> None:
    result = await run_release_check(staging, "1.0.0")
    assert result.passed, result.detail
    m = result.measurements
    assert m["orders_sent"] > 0 and m["reject_rate"] == 0, m
    assert 0 < m["decision_p99_s"] < 0.5 and m["decision_p50_s"] <= m["decision_p99_s"], m
    assert m["cpu_s"] > 0 and 10 < m["rss_peak_mb"] < 512, m
    assert 0 < m["max_order_notional"] <= 150 * 1.25, m
    assert m["max_position_notional"] <= 600 * 1.25, m
    assert m["disagreements"] == 0 and m["open_after_halt"] == 0, m
    assert m["filled_qty_venue"] == m["filled_qty_db"], m
    # Probed throughout, every probe healthy (how many fit in BAKE_S is the machine's business).
    assert m["probes"] > 0 and m["unhealthy_probes"] == 0, m
    await assert_left_as_found(staging)


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("1.1.0-crash", "exited"),
        ("1.1.0-big", "max_order_notional"),
        ("1.1.0-storm", "reject_rate"),
    ],
)
async def test_a_faulty_release_fails_naming_the_measurement(
    staging: Staging, version: str, reason: str
) -> None:
    result = await run_release_check(staging, version)
    assert not result.passed and reason in result.detail, result
    await assert_left_as_found(staging)
    if reason != "exited":
        assert result.measurements[reason] > 0, result.measurements


class LostSupervisor:
    """The staging target, whose process view fails once the release trades (supervisord gone
    mid-check): the check cannot tell, so it raises, and must still leave staging clean."""

    def __init__(self, real: SupervisorTarget) -> None:
        self.real = real
        self.ref = real.ref
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def versions(self) -> TargetView:
        if not self.failed:
            self.failed = True
            raise TargetError("supervisord did not answer")
        return await self.real.versions()


async def test_a_check_that_raises_still_leaves_staging_clean(staging: Staging) -> None:
    target = LostSupervisor(staging.target)
    with pytest.raises(ApplicationError, match="supervisord did not answer"):
        await run_release_check(staging, "1.0.0", cast(DeployTarget, target))
    assert target.failed
    state = await staging.rig.admin.state(staging.api_key)
    assert any(o.client_order_id.startswith("sg") for o in state.orders)  # it had traded
    await assert_left_as_found(staging)


async def test_a_dirty_staging_account_is_refused_and_left_alone(staging: Staging) -> None:
    admin, key = staging.rig.admin, staging.api_key
    await admin.set_positions(key, [PositionSet(symbol=SYMBOL, qty=Decimal("0.5"))])
    before = len((await admin.state(key)).orders)
    try:
        result = await run_release_check(staging, "1.0.0")
        assert not result.passed and "is not clean" in result.detail, result
        state = await admin.state(key)
        assert [(p.symbol, p.qty) for p in state.positions if p.qty] == [(SYMBOL, Decimal("0.5"))]
        assert len(state.orders) == before  # nothing was sent
        assert (await staging.target.versions()).processes == []  # nothing was started
    finally:
        await admin.set_positions(key, [PositionSet(symbol=SYMBOL, qty=Decimal(0))])


class StuckSupervisor(LostSupervisor):
    """The staging target, which cannot stop the release: the check halts it through its
    database, cancels and flattens, and raises naming what it could not do."""

    async def versions(self) -> TargetView:
        return await self.real.versions()

    async def retire(self, version: str, **_: Any) -> Any:
        self.failed = True
        raise TargetError("supervisord did not answer")


async def test_a_release_that_cannot_be_stopped_is_halted_and_the_account_flattened(
    staging: Staging,
) -> None:
    target = StuckSupervisor(staging.target)
    try:
        with pytest.raises(ApplicationError, match=r"staging not left clean: stopping 1\.0\.0"):
            await run_release_check(staging, "1.0.0", cast(DeployTarget, target))
        assert target.failed and await staging.target.running_versions() == ["1.0.0"]
        assert get_trading_state(staging.database).state is TradingState.HALTED  # stays so
        state = await staging.rig.admin.state(staging.api_key)
        assert state.open_orders == [] and all(p.qty == 0 for p in state.positions), state
    finally:
        await staging.target.retire("1.0.0", reason="test cleanup")
        set_trading_state(staging.database, TradingState.ACTIVE, "pytest", "test cleanup")
