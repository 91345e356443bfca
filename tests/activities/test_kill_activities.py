"""The kill activities against the sandbox through unmodified ccxt, run in Temporal's activity
environment (real heartbeats and attempt numbers, no server): the venue's own admin view is the
judge of "cancelled" and "flat"."""

from __future__ import annotations

from decimal import Decimal

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.kill import KillActivities
from sandbox.admin_models import FaultRule, PositionSet, SeedOrder
from sandbox.prices import to_tick
from tests.fixtures.venues import (
    MARKET_BY_SYMBOL,
    MakeRig,
    assert_flat,
    assert_no_order_sent_twice,
)
from workflows.shared import (
    AccountRequest,
    CancelAllRequest,
    FlattenRequest,
    HaltRequest,
)


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


async def test_cancel_all_and_flatten_leave_the_venue_flat(env, make_rig: MakeRig) -> None:
    rig = await make_rig(n=1)
    await rig.seed(symbols=10, open_orders=120, positions=6)
    acts = KillActivities(rig.gateway())
    account = rig.accounts[0]
    try:
        halt = await env.run(acts.halt, HaltRequest(account=account.futures, dead_man_seconds=300))
        assert halt.symbols_armed
        before = await rig.admin.state(account.api_key)
        futures_open = [o for o in before.open_orders if o.venue == "futures"]
        for name in (account.futures, account.spot):
            cancel = await env.run(acts.cancel_all, CancelAllRequest(account=name))
            assert cancel.still_open == []
        after_cancel = await rig.admin.state(account.api_key)
        assert after_cancel.open_orders == []
        cancel_f = await env.run(acts.cancel_all, CancelAllRequest(account=account.futures))
        assert cancel_f.orders_found == 0  # nothing left: a second run is harmless
        assert len(futures_open) > 0
        for name in (account.futures, account.spot):
            flat = await env.run(
                acts.flatten, FlattenRequest(account=name, client_id_prefix="bgtest1")
            )
            assert flat.positions_before
            assert [p for p in flat.positions_after if p not in flat.dust] == []
        await assert_flat(rig)
        snap = await env.run(acts.snapshot_venue_state, AccountRequest(account=account.futures))
        assert snap.open_orders == [] and snap.positions == []
        assert_no_order_sent_twice(await rig.states())
    finally:
        await acts.gateway.close()


async def test_flatten_answer_lost_after_apply_is_retried_without_overshoot(
    env, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rig.admin.set_positions(
        account.api_key, [PositionSet(symbol="BTCUSDT", qty=Decimal("0.5"))]
    )
    # The first closing order is applied but its answer never comes: the client times out.
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="no_answer",
                match="POST /fapi/v1/order",
                max_count=1,
                hold_s=12.0,
                api_key=account.api_key,
            )
        ]
    )
    acts = KillActivities(rig.gateway())
    try:
        flat = await env.run(
            acts.flatten, FlattenRequest(account=account.futures, client_id_prefix="bgtest2")
        )
    finally:
        await acts.gateway.close()
    assert flat.positions_after == []
    state = await rig.admin.state(account.api_key)
    btc = next(p for p in state.positions if p.symbol == "BTCUSDT")
    assert btc.qty == 0 and not btc.flipped
    # The lost order was applied, so nothing else needed to be sent.
    sent = [o for o in state.orders if o.client_order_id.startswith("bgtest2")]
    assert sum(o.filled_qty for o in sent) == Decimal("0.5")


async def test_flatten_loops_on_partial_fills_and_racing_fills(env, make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rig.admin.set_positions(
        account.api_key,
        [
            PositionSet(symbol="ETHUSDT", qty=Decimal("-3.2")),
            PositionSet(symbol="SOLUSDT", qty=Decimal("40")),
        ],
    )
    # Resting orders that fill while being cancelled: the positions grow under our feet.
    prices = (await rig.admin.prices()).prices
    eth, sol = MARKET_BY_SYMBOL["ETHUSDT"], MARKET_BY_SYMBOL["SOLUSDT"]
    await rig.admin.seed_orders(
        account.api_key,
        [
            SeedOrder(
                symbol="ETHUSDT",
                side="SELL",
                qty=Decimal("0.8"),
                price=to_tick(prices["ETHUSDT"] * Decimal("1.05"), eth.tick),
            ),
            SeedOrder(
                symbol="SOLUSDT",
                side="BUY",
                qty=Decimal("5"),
                price=to_tick(prices["SOLUSDT"] * Decimal("0.95"), sol.tick),
            ),
        ],
    )
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="fill_races_cancel",
                match="DELETE /fapi/*",
                fill="partial",
                api_key=account.api_key,
            ),
            # A thin book: each closing market order fills only 40 %.
            FaultRule(
                kind="thin_book",
                match="POST /fapi/v1/order",
                liquidity=0.4,
                api_key=account.api_key,
            ),
        ]
    )
    acts = KillActivities(rig.gateway())
    try:
        cancel = await env.run(acts.cancel_all, CancelAllRequest(account=account.futures))
        assert cancel.still_open == [] and cancel.orders_found == 2
        flat = await env.run(
            acts.flatten, FlattenRequest(account=account.futures, client_id_prefix="bgtest3")
        )
    finally:
        await acts.gateway.close()
    assert flat.passes > 2  # partial fills took several passes
    assert [p for p in flat.positions_after if p not in flat.dust] == []
    await assert_flat(rig, spot=False)
    assert_no_order_sent_twice(await rig.states(), prefix="bgtest3")


async def test_wrong_credentials_are_not_retried_and_not_echoed(
    env, make_rig: MakeRig, monkeypatch
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    monkeypatch.setenv(account.secret_env, "f" * 64)
    acts = KillActivities(rig.gateway())
    try:
        with pytest.raises(ApplicationError) as caught:
            await env.run(acts.cancel_all, CancelAllRequest(account=account.futures))
    finally:
        await acts.gateway.close()
    assert caught.value.non_retryable
    assert caught.value.type == "AuthFailed"
    assert "f" * 64 not in str(caught.value) and account.api_key not in str(caught.value)
    assert (await rig.admin.state(account.api_key)).orders == []
