"""The kill activities when part of the venue fails: every independent action still goes ahead,
and what failed is reported per book, per symbol or per position instead of failing the account.

Through the sandbox and unmodified ccxt, faults injected per account; the sandbox's admin view
(and its request journal) is the judge."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.kill import KillActivities
from activities.kill_flatten import client_order_id
from activities.ratelimit import WeightLimiter
from activities.venues import VenueGateway
from sandbox.admin_models import FaultRule, PositionSet, SeedOrder
from sandbox.prices import to_tick
from tests.fixtures.venues import MARKET_BY_SYMBOL, MakeRig, Rig, assert_no_order_sent_twice
from tests.helpers import assert_eventually
from workflows.shared import (
    AccountRequest,
    CancelAllRequest,
    FlattenRequest,
    HaltRequest,
)

FAPI = "fapi.binance.com"


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


def attempt(n: int, details: list[Any] | None = None) -> ActivityEnvironment:
    """An activity environment for retry number ``n`` (with the last attempt's heartbeat)."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=n, heartbeat_details=details or [])
    return env


def ccxt_symbol(symbol: str) -> str:
    return f"{symbol.removesuffix('USDT')}/USDT:USDT"


async def rest_orders(rig: Rig, symbols: list[str], conditional: list[str] = ()) -> None:  # type: ignore[assignment]
    """One resting buy per symbol in ``symbols`` and one stop per symbol in ``conditional``."""
    account = rig.accounts[0]
    prices = (await rig.admin.prices()).prices
    orders = []
    for symbol in symbols:
        m = MARKET_BY_SYMBOL[symbol]
        price = to_tick(prices[symbol] * Decimal("0.8"), m.tick)
        qty = max(m.step, (Decimal(150) / price // m.step + 1) * m.step)
        orders.append(SeedOrder(symbol=symbol, side="BUY", qty=qty, price=price))
    for symbol in conditional:
        m = MARKET_BY_SYMBOL[symbol]
        trigger = to_tick(prices[symbol] * Decimal("0.7"), m.tick)
        qty = max(m.step, (Decimal(150) / trigger // m.step + 1) * m.step)
        orders.append(
            SeedOrder(
                symbol=symbol, side="SELL", qty=qty, type="STOP_MARKET", trigger_price=trigger
            )
        )
    await rig.admin.seed_orders(account.api_key, orders)


async def inject(rig: Rig, kind: str, match: str, **rule: Any) -> None:
    """One fault on the rig's first account only (the sandbox is shared by the session)."""
    await rig.admin.add_faults(
        [FaultRule(kind=kind, match=match, api_key=rig.accounts[0].api_key, **rule)]  # type: ignore[arg-type]
    )


async def warm(gateway: VenueGateway, name: str) -> None:
    """Markets loaded and the first positions read made, as on a long-running worker."""
    venue = await gateway.session(name)
    await venue.positions()


# ------------------------------------------------------------------ defect 1: one book fails


async def test_a_failing_conditional_listing_blocks_nothing_else(env, make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rest_orders(rig, ["BTCUSDT", "ETHUSDT"], conditional=["ETHUSDT", "SOLUSDT"])
    # SOL has no plain order but a position: its stop is still cancelled by symbol.
    await rig.admin.set_positions(
        account.api_key, [PositionSet(symbol="SOLUSDT", qty=Decimal("3"))]
    )
    await inject(rig, kind="http_error", match="GET /fapi/v1/openAlgoOrders", status=400)
    acts = KillActivities(rig.gateway())
    try:
        halt = await env.run(acts.halt, HaltRequest(account=account.futures))
        started = time.monotonic()
        cancel = await env.run(acts.cancel_all, CancelAllRequest(account=account.futures))
        elapsed = time.monotonic() - started
        snap = await env.run(acts.snapshot_venue_state, AccountRequest(account=account.futures))
    finally:
        await acts.gateway.close()
    state = await rig.admin.state(account.api_key)
    assert state.open_orders == [] and state.open_conditional_orders == []
    assert sorted(halt.symbols_armed) == ["BTC/USDT:USDT", "ETH/USDT:USDT"]
    assert not cancel.complete
    assert [(f.symbol, f.conditional, f.action) for f in cancel.failed_books] == [
        (None, True, "list")
    ]
    assert cancel.orders_found >= 2 and cancel.still_open == []
    # Generous for a busy machine; the defect retried for minutes.
    assert elapsed < 25, f"cancel_all took {elapsed:.1f}s with one book failing"
    assert snap.unread_books and snap.open_orders == []
    assert [p.symbol for p in snap.positions] == ["SOL/USDT:USDT"]


async def test_plain_cancels_do_not_wait_for_the_conditional_listing(
    env, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rest_orders(rig, ["BTCUSDT", "ETHUSDT", "XRPUSDT"])
    acts = KillActivities(rig.gateway())
    await warm(acts.gateway, account.futures)
    await inject(rig, kind="latency", match="GET /fapi/v1/openAlgoOrders", latency_ms=1500)
    since = time.time()
    try:
        # The halt starts beside it, as in the kill: it shares the first listing.
        halt, cancel = await asyncio.gather(
            ActivityEnvironment().run(acts.halt, HaltRequest(account=account.futures)),
            env.run(acts.cancel_all, CancelAllRequest(account=account.futures)),
        )
    finally:
        await acts.gateway.close()
    assert cancel.still_open == [] and cancel.complete
    assert len(halt.symbols_armed) == 3
    log = await rig.admin.requests(since=since, api_key=account.api_key)
    first_read = next(r for r in log if r.path == "/fapi/v1/openOrders")
    cancels = [r for r in log if r.method == "DELETE" and r.path == "/fapi/v1/allOpenOrders"]
    assert len(cancels) >= 3
    # The first cancel arrives one round trip after the plain listing answered, long before the
    # slow conditional listing does.
    assert cancels[0].arrived - first_read.answered < 0.5, (first_read, cancels[0])
    before_first_cancel = [r for r in log if r.arrived < cancels[0].arrived]
    assert [r.path for r in before_first_cancel if r.path == "/fapi/v1/openOrders"] == [
        "/fapi/v1/openOrders"
    ], "the halt and the cancel-all read the open orders once between them"


# ------------------------------------------------------------------ defect 13: dead-man per symbol


async def test_halt_reports_exactly_what_the_venue_armed_and_released(make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    await rest_orders(rig, symbols)
    gateway = rig.gateway()
    await warm(gateway, account.futures)
    # Our own weight limiter has room for two armings only: the third is refused.
    limiter = gateway.limiters[FAPI]
    await limiter.acquire(limiter.budget - limiter.used() - 20)
    acts = KillActivities(gateway)
    try:
        halt = await ActivityEnvironment().run(
            acts.halt,
            HaltRequest(account=account.futures, symbols=[ccxt_symbol(s) for s in symbols]),
        )
        gateway.limiters[FAPI] = WeightLimiter(limiter.budget)  # the minute passes
        armed_on_venue = sorted((await rig.admin.state(account.api_key)).countdowns)
        assert sorted(ccxt_symbol(s) for s in armed_on_venue) == sorted(halt.symbols_armed)
        assert len(halt.symbols_armed) == 2
        assert list(halt.symbols_failed) == sorted(
            set(map(ccxt_symbol, symbols)) - set(halt.symbols_armed)
        )
        assert "weight" in next(iter(halt.symbols_failed.values()))
        # Disarm what was armed, with 503 on one call: released says exactly which.
        await inject(rig, kind="http_error", match="POST /fapi/v1/countdownCancelAll", max_count=3)
        release = await ActivityEnvironment().run(
            acts.halt,
            HaltRequest(account=account.futures, dead_man_seconds=0, symbols=halt.symbols_armed),
        )
    finally:
        await gateway.close()
    left = sorted(ccxt_symbol(s) for s in (await rig.admin.state(account.api_key)).countdowns)
    assert sorted(set(halt.symbols_armed) - set(release.symbols_released)) == left
    assert sorted(release.symbols_failed) == left


async def test_halt_under_a_flaky_venue_never_hides_an_armed_timer(make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT"]
    await rest_orders(rig, symbols)
    gateway = rig.gateway()
    await warm(gateway, account.futures)
    await inject(rig, kind="http_error", match="POST /fapi/v1/countdownCancelAll", probability=0.5)
    acts = KillActivities(gateway)
    try:
        halt = await ActivityEnvironment().run(acts.halt, HaltRequest(account=account.futures))
        on_venue = {ccxt_symbol(s) for s in (await rig.admin.state(account.api_key)).countdowns}
        assert set(halt.symbols_armed) == on_venue
        assert set(halt.symbols_armed) | set(halt.symbols_failed) == set(map(ccxt_symbol, symbols))
        release = await ActivityEnvironment().run(
            acts.halt,
            HaltRequest(account=account.futures, dead_man_seconds=0, symbols=halt.symbols_armed),
        )
    finally:
        await gateway.close()
    left = {ccxt_symbol(s) for s in (await rig.admin.state(account.api_key)).countdowns}
    assert left == set(halt.symbols_armed) - set(release.symbols_released)
    assert left == set(release.symbols_failed)


# ------------------------------------------------------------------ defect 14: recovered orders


@pytest.mark.parametrize("told_by", ["heartbeat", "first-heartbeat", "start-positions"])
async def test_a_retried_flatten_reports_the_orders_of_the_attempt_that_died(
    told_by: str, make_rig: MakeRig
) -> None:
    """The retry learns the legs from the dead attempt's last heartbeat, or its first one (the
    SDK sends the first at once and throttles the rest: a SIGKILL may lose them), or from the
    positions the kill saw at its start: the positions are flat by now, so its own read shows
    nothing."""
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rig.admin.set_positions(
        account.api_key,
        [
            PositionSet(symbol="BTCUSDT", qty=Decimal("0.2")),
            PositionSet(symbol="ETHUSDT", qty=Decimal("-2")),
        ],
    )
    # One closing order is slow at the venue: the worker dies while it is in flight.
    await inject(rig, kind="latency", match="POST /fapi/v1/order", latency_ms=1500, max_count=1)
    acts = KillActivities(rig.gateway())
    at_start = await (await acts.gateway.session(account.futures)).positions()
    first = attempt(1)
    beats: list[Any] = []
    first.on_heartbeat = lambda *details: beats.append(details)
    request = FlattenRequest(account=account.futures, client_id_prefix="bgcrash1")
    try:
        dying = asyncio.ensure_future(first.run(acts.flatten, request))

        async def one_order_filled() -> bool:
            state = await rig.admin.state(account.api_key)
            return any(o.client_order_id.startswith("bgcrash1") for o in state.orders)

        await assert_eventually(one_order_filled)
        first.cancel()  # the worker dies
        with pytest.raises(BaseException):  # noqa: B017 - cancelled, as a dead worker
            await dying

        async def both_filled() -> bool:
            state = await rig.admin.state(account.api_key)
            return len([o for o in state.orders if o.client_order_id.startswith("bgcrash1")]) == 2

        await assert_eventually(both_filled)
        if told_by == "heartbeat":
            retry = await attempt(2, list(beats[-1])).run(acts.flatten, request)
        elif told_by == "first-heartbeat":
            retry = await attempt(2, list(beats[0])).run(acts.flatten, request)
        else:
            request = request.model_copy(update={"known_positions": at_start})
            retry = await attempt(2).run(acts.flatten, request)
    finally:
        await acts.gateway.close()
    state = await rig.admin.state(account.api_key)
    sent = sorted(o.client_order_id for o in state.orders if o.client_order_id.startswith("bgc"))
    assert sorted(o.client_order_id for o in retry.recovered_orders) == sent
    assert retry.orders == [] and retry.positions_after == []
    assert all(o.filled > 0 for o in retry.recovered_orders)
    assert_no_order_sent_twice([state], prefix="bgcrash1")


# ------------------------------------------------------------------ defect 17: flaky venue


async def test_a_flaky_venue_still_ends_flat_and_never_flipped(make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rest_orders(rig, ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"], conditional=["BTCUSDT"])
    await rig.admin.set_positions(
        account.api_key,
        [
            PositionSet(symbol="BTCUSDT", qty=Decimal("0.3")),
            PositionSet(symbol="ETHUSDT", qty=Decimal("-4")),
            PositionSet(symbol="SOLUSDT", qty=Decimal("50")),
            PositionSet(symbol="XRPUSDT", qty=Decimal("-900")),
            PositionSet(symbol="LINKUSDT", qty=Decimal("30")),
        ],
    )
    gateway = rig.gateway()
    await warm(gateway, account.futures)
    await inject(rig, kind="http_error", match="*", probability=0.3)
    # A thin book: closing takes several passes, each a chance to fail.
    await inject(rig, kind="thin_book", match="POST /fapi/v1/order", liquidity=0.8)
    acts = KillActivities(gateway)
    request = FlattenRequest(account=account.futures, client_id_prefix="bgflaky1")
    try:
        cancel = await ActivityEnvironment().run(
            acts.cancel_all, CancelAllRequest(account=account.futures, verify_deadline_s=10)
        )
        # A retried attempt: every earlier client id is looked up first, under the same 503s.
        flat = await attempt(2).run(acts.flatten, request)
        looks = [
            await ActivityEnvironment().run(
                acts.snapshot_venue_state, AccountRequest(account=account.futures)
            )
            for _ in range(5)
        ]
    finally:
        await gateway.close()
    state = await rig.admin.state(account.api_key)
    for p in state.positions:
        assert not p.flipped, f"{p.symbol} changed sign: {p.sign_history}"
        assert p.qty == 0, f"{p.symbol} left at {p.qty}: failures {flat.failures}"
    assert flat.positions_after == []
    # A look either names the books it could not read or tells the truth; most read them all.
    assert all(look.unread_books or look.positions == [] for look in looks)
    assert any(not look.unread_books for look in looks)
    if cancel.complete and not cancel.still_open:
        assert state.open_orders == [] and state.open_conditional_orders == []
    assert_no_order_sent_twice([state], prefix="bgflaky1")


# ------------------------------------------------------------------ defect 18: dead-man budget


async def test_a_second_kill_is_not_delayed_by_the_first_ones_arming(make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    symbols = [m.symbol for m in MARKET_BY_SYMBOL.values()][:24]
    await rest_orders(rig, symbols)
    gateway = rig.gateway()
    await warm(gateway, account.futures)
    # A small budget: room for both kills' unwinding, not for arming every symbol twice.
    gateway.limiters[FAPI] = WeightLimiter(800)
    acts = KillActivities(gateway)
    try:
        first = await asyncio.gather(
            ActivityEnvironment().run(acts.halt, HaltRequest(account=account.futures)),
            ActivityEnvironment().run(acts.cancel_all, CancelAllRequest(account=account.futures)),
        )
        await rest_orders(rig, symbols)  # the strategy was quicker than the first kill
        since = time.time()
        started = time.monotonic()
        second = await asyncio.gather(
            ActivityEnvironment().run(acts.halt, HaltRequest(account=account.futures)),
            ActivityEnvironment().run(acts.cancel_all, CancelAllRequest(account=account.futures)),
        )
        elapsed = time.monotonic() - started
    finally:
        await gateway.close()
    assert first[1].still_open == [] and second[1].still_open == []
    assert gateway.limiters[FAPI].waits == 0
    # waits == 0 above is the property; the bound only catches a gross stall (48 s before).
    assert elapsed < 20, f"second kill's cancel took {elapsed:.2f}s"
    # Symbols the first kill armed are not armed again (their timers still run).
    log = await rig.admin.requests(since=since, api_key=account.api_key)
    rearmed = [r for r in log if r.path == "/fapi/v1/countdownCancelAll"]
    assert len(rearmed) <= len(symbols) - len(first[0].symbols_armed)
    assert set(first[0].symbols_armed) <= set(second[0].symbols_armed)


async def test_a_book_that_cannot_be_cancelled_does_not_hold_the_rest_for_the_deadline(
    env, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rest_orders(rig, ["BTCUSDT", "ETHUSDT"], conditional=["ETHUSDT"])
    await inject(rig, kind="http_error", match="DELETE /fapi/v1/algoOpenOrders", status=400)
    acts = KillActivities(rig.gateway())
    started = time.monotonic()
    try:
        cancel = await env.run(
            acts.cancel_all, CancelAllRequest(account=account.futures, verify_deadline_s=120)
        )
    finally:
        await acts.gateway.close()
    elapsed = time.monotonic() - started
    state = await rig.admin.state(account.api_key)
    assert state.open_orders == [] and len(state.open_conditional_orders) == 1
    assert not cancel.complete
    assert [(f.symbol, f.conditional, f.action) for f in cancel.failed_books] == [
        ("ETH/USDT:USDT", True, "cancel")
    ], cancel.failed_books
    assert [o.symbol for o in cancel.still_open] == ["ETH/USDT:USDT"]
    # Far below the 120 s deadline it would wait out before the fix, even on a busy machine.
    assert elapsed < 60, f"cancel_all waited {elapsed:.1f}s for a book it cannot cancel"


async def test_a_retry_finds_an_earlier_order_its_heartbeat_never_told(make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    await rig.admin.set_positions(
        account.api_key, [PositionSet(symbol="ETHUSDT", qty=Decimal("-3"))]
    )
    gateway = rig.gateway()
    venue = await gateway.session(account.futures)
    (position,) = await venue.positions()
    # The first attempt closed 1 of 3 with its pass-0 id and died before any heartbeat.
    cid = client_order_id("bgnobeat", position.symbol, None, 0)
    await venue.close_position(position, Decimal("1"), cid)
    acts = KillActivities(gateway)
    try:
        retry = await attempt(2).run(
            acts.flatten, FlattenRequest(account=account.futures, client_id_prefix="bgnobeat")
        )
    finally:
        await gateway.close()
    assert [o.client_order_id for o in retry.recovered_orders] == [cid]
    assert [o.client_order_id for o in retry.orders] == [
        client_order_id("bgnobeat", position.symbol, None, 1)
    ]
    assert retry.positions_after == [] and retry.failures == []
    state = await rig.admin.state(account.api_key)
    assert_no_order_sent_twice([state], prefix="bgnobeat")
    (eth,) = state.positions
    assert eth.qty == 0 and not eth.flipped
