"""Unmodified ccxt against the sandbox: orders, cancels, positions, balances, venue rules."""

from __future__ import annotations

from decimal import Decimal

import ccxt.async_support as ccxt
import pytest

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import PositionSet, SeedOrder
from sandbox.seed import BookSpec, SeedAccount, seed_book
from sandbox.weights import weight_of
from tests.fixtures.sandbox import NewAccount
from tests.helpers import assert_eventually
from tests.sandbox.conftest import Venue

BTC = "BTC/USDT:USDT"
ETH = "ETH/USDT:USDT"


async def _far_bid(admin: SandboxAdmin, symbol: str, away: str = "0.8") -> float:
    """A bid price that will not fill during a test."""
    price = (await admin.prices()).prices[symbol]
    return float((price * Decimal(away)).quantize(Decimal("0.1")))


async def test_markets_load_with_real_filters(new_account: NewAccount, venue: Venue) -> None:
    acct = await new_account()
    async with venue(acct) as usdm, venue(acct, "spot") as spot:
        assert len(usdm.markets) == 30 and len(spot.markets) == 30
        btc = usdm.market(BTC)
        assert btc["swap"] and btc["precision"]["amount"] == 0.001
        assert btc["limits"]["cost"]["min"] == 100
        assert spot.market("DOGE/USDT")["precision"]["amount"] == 1


async def test_order_lifecycle_and_cancels(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    bid = await _far_bid(sandbox_admin, "BTCUSDT")
    async with venue(acct) as ex:
        made = [
            await ex.create_order(BTC, "limit", "buy", 0.002, bid, {"clientOrderId": f"c{i}"})
            for i in range(6)
        ]
        eth = await ex.create_order(ETH, "limit", "buy", 0.01, 2000.0)
        assert {o["status"] for o in made} == {"open"}
        assert len(await ex.fetch_open_orders(BTC)) == 6
        assert len(await ex.fetch_open_orders()) == 7

        got = await ex.fetch_order(None, BTC, {"clientOrderId": "c0"})
        assert got["id"] == made[0]["id"]
        await ex.cancel_order(None, BTC, {"clientOrderId": "c0"})
        await ex.cancel_order(made[1]["id"], BTC)
        batch = await ex.cancel_orders([made[2]["id"], made[3]["id"]], BTC)
        assert [o["status"] for o in batch] == ["canceled", "canceled"]
        by_cid = await ex.cancel_orders([], BTC, {"clientOrderIds": ["c4"]})
        assert by_cid[0]["clientOrderId"] == "c4"
        with pytest.raises(ccxt.OrderNotFound):
            await ex.cancel_order(made[1]["id"], BTC)
        await ex.cancel_all_orders(BTC)
        state = await sandbox_admin.state(acct.api_key)
        assert [o.order_id for o in state.open_orders] == [int(eth["id"])]
        assert len(state.orders) == 7


async def test_positions_balance_and_mode_one_way(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_positions(
        acct.api_key,
        [
            PositionSet(symbol="BTCUSDT", qty=Decimal("0.5")),
            PositionSet(symbol="ETHUSDT", qty=Decimal("-2")),
        ],
    )
    async with venue(acct) as ex:
        positions = {p["symbol"]: p for p in await ex.fetch_positions()}
        assert positions[BTC]["side"] == "long" and positions[BTC]["contracts"] == 0.5
        assert positions[ETH]["side"] == "short" and positions[ETH]["contracts"] == 2
        assert (await ex.fetch_position_mode())["hedged"] is False
        assert (await ex.fetch_balance())["USDT"]["total"] > 0


async def test_reduce_only_never_flips(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_positions(acct.api_key, [PositionSet(symbol="ETHUSDT", qty=Decimal(1))])
    async with venue(acct) as ex:
        with pytest.raises(ccxt.InvalidOrder):  # -2022: would increase the long
            await ex.create_order(ETH, "market", "buy", 0.5, None, {"reduceOnly": True})
        closed = await ex.create_order(ETH, "market", "sell", 1.5, None, {"reduceOnly": True})
        assert closed["filled"] == 1.0
        with pytest.raises(ccxt.InvalidOrder):  # nothing left to reduce
            await ex.create_order(ETH, "market", "sell", 0.5, None, {"reduceOnly": True})
    state = await sandbox_admin.state(acct.api_key)
    (pos,) = state.positions
    assert pos.qty == 0 and not pos.flipped


async def test_flip_flag_records_an_overshoot(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_positions(acct.api_key, [PositionSet(symbol="ETHUSDT", qty=Decimal(1))])
    async with venue(acct) as ex:
        # A retried non-reduce-only close is the overshoot the flag exists to catch.
        await ex.create_order(ETH, "market", "sell", 1, None, {"clientOrderId": "close"})
        await ex.create_order(ETH, "market", "sell", 1, None, {"clientOrderId": "close"})
    (pos,) = (await sandbox_admin.state(acct.api_key)).positions
    assert pos.qty == -1 and pos.flipped and pos.sign_history == [1, 0, -1]


async def test_hedge_mode_legs(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account(hedge_mode=True)
    await sandbox_admin.set_positions(
        acct.api_key,
        [
            PositionSet(symbol="BTCUSDT", qty=Decimal("0.3"), position_side="LONG"),
            PositionSet(symbol="BTCUSDT", qty=Decimal("-0.1"), position_side="SHORT"),
        ],
    )
    async with venue(acct) as ex:
        assert (await ex.fetch_position_mode())["hedged"] is True
        sides = sorted((p["side"], p["contracts"], p["hedged"]) for p in await ex.fetch_positions())
        assert sides == [("long", 0.3, True), ("short", 0.1, True)]
        with pytest.raises(ccxt.BadRequest):  # -1106: reduceOnly is not a hedge-mode parameter
            await ex.create_order(BTC, "market", "sell", 0.3, None, {"reduceOnly": True})
        # ccxt's hedged close: positionSide=LONG, side=SELL; oversize is capped at the leg.
        await ex.create_order(
            BTC, "market", "sell", 0.5, None, {"hedged": True, "reduceOnly": True}
        )
        await ex.create_order(BTC, "market", "buy", 0.1, None, {"hedged": True, "reduceOnly": True})
    state = await sandbox_admin.state(acct.api_key)
    assert {(p.position_side, p.qty, p.flipped) for p in state.positions} == {
        ("LONG", 0, False),
        ("SHORT", 0, False),
    }


async def test_client_order_id_unique_only_among_open(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    bid = await _far_bid(sandbox_admin, "BTCUSDT")
    async with venue(acct) as ex:
        first = await ex.create_order(BTC, "limit", "buy", 0.002, bid, {"clientOrderId": "dup"})
        with pytest.raises(ccxt.InvalidOrder):  # -4116 while the first is open
            await ex.create_order(BTC, "limit", "buy", 0.002, bid, {"clientOrderId": "dup"})
        await ex.cancel_order(first["id"], BTC)
        second = await ex.create_order(BTC, "limit", "buy", 0.002, bid, {"clientOrderId": "dup"})
        latest = await ex.fetch_order(None, BTC, {"clientOrderId": "dup"})
        assert latest["id"] == second["id"] != first["id"]


async def test_countdown_cancel_all_fires(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    bid = await _far_bid(sandbox_admin, "BTCUSDT")
    async with venue(acct) as ex:
        await ex.create_order(BTC, "limit", "buy", 0.002, bid)
        await ex.create_order(ETH, "limit", "buy", 0.01, 2000.0)
        await ex.fapiPrivatePostCountdownCancelAll({"symbol": "ETHUSDT", "countdownTime": 60000})
        await ex.fapiPrivatePostCountdownCancelAll({"symbol": "ETHUSDT", "countdownTime": 0})
        await ex.fapiPrivatePostCountdownCancelAll({"symbol": "BTCUSDT", "countdownTime": 300})

    async def only_eth_left() -> None:
        state = await sandbox_admin.state(acct.api_key)
        assert [o.symbol for o in state.open_orders] == ["ETHUSDT"]
        assert state.countdowns == []

    await assert_eventually(only_eth_left, timeout=60)  # the 300 ms countdown, polled


async def test_conditional_orders_use_algo_endpoints(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_positions(acct.api_key, [PositionSet(symbol="ETHUSDT", qty=Decimal(1))])
    async with venue(acct) as ex:
        stop = await ex.create_order(
            ETH, "market", "sell", 1, None, {"triggerPrice": 1000, "reduceOnly": True}
        )
        await ex.create_order(ETH, "market", "sell", 1, None, {"takeProfitPrice": 9000})
        assert len(await ex.fetch_open_orders(ETH, params={"trigger": True})) == 2
        assert await ex.fetch_open_orders(ETH) == []
        await ex.cancel_order(stop["id"], ETH, {"trigger": True})
        assert len((await sandbox_admin.state(acct.api_key)).open_conditional_orders) == 1
        await ex.cancel_all_orders(ETH, {"trigger": True})
    assert (await sandbox_admin.state(acct.api_key)).open_conditional_orders == []


async def test_spot_orders_balances_and_dust(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account(spot_balances={"USDT": Decimal(10000), "DOGE": Decimal(10)})
    async with venue(acct, "spot") as ex:
        bought = await ex.create_order("BTC/USDT", "market", "buy", 0.01)
        assert bought["status"] == "closed" and bought["filled"] == 0.01
        resting = await ex.create_order("BTC/USDT", "limit", "sell", 0.01, 200000.0)
        assert (await ex.fetch_balance())["BTC"]["used"] == 0.01
        assert len(await ex.fetch_open_orders()) == 1
        await ex.cancel_all_orders("BTC/USDT")
        with pytest.raises(ccxt.OrderNotFound):  # spot cancel-all with nothing open: -2011
            await ex.cancel_all_orders("BTC/USDT")
        with pytest.raises(ccxt.OrderNotFound):
            await ex.cancel_order(resting["id"], "BTC/USDT")
        with pytest.raises(ccxt.BadRequest):  # 10 DOGE is under the 5 USDT notional: -1013
            await ex.create_order("DOGE/USDT", "market", "sell", 10)
    state = await sandbox_admin.state(acct.api_key)
    assert state.spot_balances["BTC"].free == Decimal("0.01")
    assert state.spot_balances["USDT"].locked == 0


async def test_auth_errors(new_account: NewAccount, venue: Venue) -> None:
    acct = await new_account()
    wrong_secret = acct.model_copy(update={"secret": "not-the-secret"})
    wrong_key = acct.model_copy(update={"api_key": "unknown-key"})
    for bad in (wrong_secret, wrong_key):
        async with venue(bad) as ex:
            with pytest.raises(ccxt.AuthenticationError):
                await ex.fetch_balance()


async def test_seed_book_benchmark_scenario(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    accounts = [SeedAccount(api_key=f"bench-{i}-{id(new_account)}", secret=f"s{i}") for i in (0, 1)]
    book = await seed_book(sandbox_admin, BookSpec(accounts=accounts, seed=3))
    assert sum(len(ids) for ids in book.order_ids.values()) == 1000
    assert sum(len(p) for p in book.positions.values()) == 20
    state = await sandbox_admin.state(accounts[0].api_key)
    assert any(o.status == "PARTIALLY_FILLED" for o in state.open_orders)
    futures_open = [o for o in state.open_orders if o.venue == "futures"]
    from tests.fixtures.sandbox import TestAccount

    acct = TestAccount(api_key=accounts[0].api_key, secret=accounts[0].secret, state=state)
    async with venue(acct) as ex:
        assert len(await ex.fetch_open_orders()) == len(futures_open)
        assert len(await ex.fetch_positions()) == 10


async def test_seeded_partial_fill_is_open(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    bid = Decimal(str(await _far_bid(sandbox_admin, "BTCUSDT")))
    (oid,) = await sandbox_admin.seed_orders(
        acct.api_key,
        [
            SeedOrder(
                symbol="BTCUSDT",
                side="BUY",
                qty=Decimal("0.01"),
                price=bid,
                filled_qty=Decimal("0.004"),
            )
        ],
    )
    async with venue(acct) as ex:
        (o,) = await ex.fetch_open_orders(BTC)
        assert o["id"] == str(oid) and o["status"] == "open" and o["filled"] == 0.004


async def test_public_mark_and_last_prices_need_no_key(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    """premiumIndex and ticker/price answer without credentials, one symbol or all, at the
    venue's own price; weights as Binance documents them (premiumIndex 1 even for all)."""
    acct = await new_account()
    keyless = acct.model_copy(update={"api_key": "", "secret": ""})
    await sandbox_admin.control_prices(frozen=True)
    try:
        truth = (await sandbox_admin.prices()).prices
        async with venue(keyless) as ex:
            marks = await ex.fetch_mark_prices()
            assert len(marks) == 30
            assert Decimal(marks[BTC]["info"]["markPrice"]) == truth["BTCUSDT"]
            one = await ex.fetch_mark_price(ETH)
            assert Decimal(one["info"]["markPrice"]) == truth["ETHUSDT"]
            assert one["info"]["nextFundingTime"] > one["info"]["time"]
            last = await ex.fetch_last_prices([BTC, ETH])
            assert set(last) == {BTC, ETH}
            assert Decimal(last[ETH]["info"]["price"]) == truth["ETHUSDT"]
            single = await ex.fapiPublicGetTickerPrice({"symbol": "BTCUSDT"})
            assert Decimal(single["price"]) == truth["BTCUSDT"]
            with pytest.raises(ccxt.BadSymbol):
                await ex.fapiPublicGetPremiumIndex({"symbol": "NOPEUSDT"})
    finally:
        await sandbox_admin.control_prices(frozen=False)
    assert weight_of("GET", "/fapi/v1/premiumIndex", False) == ("fapi", 1)
    assert weight_of("GET", "/fapi/v2/ticker/price", False) == ("fapi", 2)
    assert weight_of("GET", "/fapi/v1/ticker/price", True) == ("fapi", 1)
