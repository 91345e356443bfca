"""The kill activities against the sandbox through unmodified ccxt, run in Temporal's activity
environment (real heartbeats and attempt numbers, no server): the venue's own admin view is the
judge of "cancelled" and "flat"."""

from __future__ import annotations

from decimal import Decimal

import pytest
from temporalio.testing import ActivityEnvironment

from activities.kill import KillActivities
from sandbox.admin_models import FaultRule, PositionSet
from tests.fixtures.venues import MakeRig, assert_flat, assert_no_order_sent_twice
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
