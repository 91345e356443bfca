"""Staging checks against the sandbox venue through unmodified ccxt, as the deployment runs them
(in Temporal's activity environment): each measures, passes or fails with the reason, and
leaves the staging account as it found it. The sandbox's own admin view is the judge."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.staging_checks import StagingChecks
from sandbox.admin_models import FaultRule, PositionSet
from tests.fixtures.venues import MakeRig, Rig
from workflows.deploy_models import StrategyRef
from workflows.deployment_models import CheckRequest, CheckResult

STAGING = StrategyRef(strategy="momentum", env="staging")


def runbooks(tmp_path: Path, account: str) -> Path:
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "staging.yaml").write_text(
        f"""strategy: momentum
env: staging
accounts: [{account}]
target:
  kind: supervisor
  releases_root: {tmp_path}/r
  state_dir: {tmp_path}/t
  strategy_config: {tmp_path}/c.json
  http_port: 8081
database: {{kind: sqlite, path: {tmp_path}/s.sqlite}}
flatten: {{mode: auto}}
deploy: {{check_symbols: [BTCUSDT]}}
"""
    )
    return folder


async def run_check(rig: Rig, tmp_path: Path, check: str) -> CheckResult:
    checks = StagingChecks(runbooks(tmp_path, rig.accounts[0].futures), rig.gateway())
    try:
        return await ActivityEnvironment().run(
            checks.run, CheckRequest(ref=STAGING, version="1.4.0", check=check)
        )
    finally:
        await checks.gateway.close()


async def assert_untouched(rig: Rig) -> None:
    state = await rig.admin.state(rig.accounts[0].api_key)
    assert state.open_orders == []
    assert all(p.qty == 0 and not p.flipped for p in state.positions), state.positions


async def test_feed_check_measures_the_price_feed(make_rig: MakeRig, tmp_path: Path) -> None:
    rig = await make_rig(n=1, create=True)
    result = await run_check(rig, tmp_path, "feed")
    assert result.passed, result.detail
    assert result.measurements["samples"] == 5
    assert 0 < result.measurements["p99_ms"] < 500


async def test_a_slow_feed_fails_the_check_with_its_numbers(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig(n=1, create=True)
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="latency",
                match="GET /fapi/v1/premiumIndex",
                latency_ms=600,
                api_key=None,
                max_count=5,
            )
        ]
    )
    try:
        result = await run_check(rig, tmp_path, "feed")
    finally:
        await rig.admin.clear_faults()
    assert not result.passed
    assert result.measurements["p99_ms"] >= 600
    assert "> 500 ms" in result.detail


async def test_broker_battery_routes_cancels_opens_and_closes(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig(n=1, create=True)
    result = await run_check(rig, tmp_path, "broker")
    assert result.passed, result.detail
    assert {"order_ack_ms", "cancel_ms", "position_update_ms"} <= set(result.measurements)
    await assert_untouched(rig)
    state = await rig.admin.state(rig.accounts[0].api_key)
    ours = {o.client_order_id.rsplit("-", 1)[-1] for o in state.orders}
    assert ours == {"rest", "open", "close"}  # exactly the battery's orders, each once


async def test_kill_switch_check_leaves_the_staging_account_flat(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig(n=1, create=True)
    result = await run_check(rig, tmp_path, "kill-switch")
    assert result.passed, result.detail
    assert result.measurements["time_to_flat_s"] > 0
    await assert_untouched(rig)


@pytest.mark.parametrize("check", ["broker", "kill-switch"])
async def test_a_dirty_staging_account_is_refused_and_left_alone(
    make_rig: MakeRig, tmp_path: Path, check: str
) -> None:
    rig = await make_rig(n=1, create=True)
    key = rig.accounts[0].api_key
    await rig.admin.set_positions(key, [PositionSet(symbol="ETHUSDT", qty=Decimal("0.5"))])
    result = await run_check(rig, tmp_path, check)
    assert not result.passed and "is not clean" in result.detail
    state = await rig.admin.state(key)
    assert [(p.symbol, p.qty) for p in state.positions if p.qty] == [("ETHUSDT", Decimal("0.5"))]
    assert state.orders == []  # nothing was sent
