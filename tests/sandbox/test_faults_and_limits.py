"""Fault injection, weight limits, determinism and the admin boundary, observed through ccxt."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from decimal import Decimal

import aiohttp
import ccxt.async_support as ccxt
import pytest

from activities.venue_routing import loopback_session
from sandbox.admin_client import AdminError, SandboxAdmin
from sandbox.admin_models import FaultRule, Limits
from tests.fixtures.sandbox import REPO, NewAccount, SandboxHandle
from tests.sandbox.conftest import Venue

BTC = "BTC/USDT:USDT"
ETH = "ETH/USDT:USDT"


@pytest.fixture
async def clean_faults(sandbox_admin: SandboxAdmin):  # type: ignore[no-untyped-def]
    await sandbox_admin.clear_faults()
    yield
    await sandbox_admin.clear_faults()


async def _bid(admin: SandboxAdmin) -> float:
    return float(((await admin.prices()).prices["BTCUSDT"] * Decimal("0.8")).quantize(Decimal("1")))


@pytest.mark.usefixtures("clean_faults")
async def test_http_5xx_is_exchange_not_available_and_not_applied(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_faults(
        [FaultRule(kind="http_error", match="POST /fapi/v1/order", status=503, max_count=1)]
    )
    async with venue(acct) as ex:
        with pytest.raises(ccxt.ExchangeNotAvailable):
            await ex.create_order(ETH, "limit", "buy", 0.01, 2000.0)
        assert (await sandbox_admin.state(acct.api_key)).orders == []
        await ex.create_order(ETH, "limit", "buy", 0.01, 2000.0)  # max_count=1: next one passes


@pytest.mark.usefixtures("clean_faults")
async def test_1007_is_request_timeout_with_unknown_outcome(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_faults(
        [FaultRule(kind="error_1007", match="POST /fapi/v1/order", applied=True, max_count=1)]
    )
    async with venue(acct) as ex:
        with pytest.raises(ccxt.RequestTimeout):
            await ex.create_order(ETH, "limit", "buy", 0.01, 2000.0, {"clientOrderId": "u1"})
    (order,) = (await sandbox_admin.state(acct.api_key)).orders
    assert order.client_order_id == "u1"


@pytest.mark.usefixtures("clean_faults")
async def test_applied_but_no_answer_times_out_with_order_placed(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_faults(
        [FaultRule(kind="no_answer", match="POST /fapi/v1/order", hold_s=1.5, max_count=1)]
    )
    async with venue(acct, timeout=700) as ex:
        with pytest.raises(ccxt.RequestTimeout):
            await ex.create_order(ETH, "market", "buy", 0.01, None, {"clientOrderId": "lost"})
    state = await sandbox_admin.state(acct.api_key)
    assert [o.status for o in state.orders] == ["FILLED"]
    assert state.positions[0].qty == Decimal("0.01")


@pytest.mark.usefixtures("clean_faults")
async def test_burst_429_and_latency(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.set_faults(
        [
            FaultRule(kind="burst_429", match="GET /fapi/v1/openOrders", max_count=2),
            FaultRule(kind="latency", match="/fapi/v3/positionRisk", latency_ms=300),
        ]
    )
    async with venue(acct) as ex:
        for _ in range(2):
            with pytest.raises(ccxt.DDoSProtection):
                await ex.fetch_open_orders(ETH)
        assert await ex.fetch_open_orders(ETH) == []
        started = time.monotonic()
        await ex.fetch_positions()
        assert time.monotonic() - started >= 0.3
    rules = await sandbox_admin.faults()
    assert [r.hits for r in rules] == [2, 1]


@pytest.mark.usefixtures("clean_faults")
@pytest.mark.parametrize("fill", ["full", "partial"])
async def test_fill_races_cancel(
    fill: str, new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    bid = await _bid(sandbox_admin)
    await sandbox_admin.set_faults(
        [FaultRule(kind="fill_races_cancel", match="DELETE /fapi/v1/order", fill=fill)]  # type: ignore[arg-type]
    )
    async with venue(acct) as ex:
        o = await ex.create_order(BTC, "limit", "buy", 0.004, bid)
        if fill == "full":
            with pytest.raises(ccxt.OrderNotFound):
                await ex.cancel_order(o["id"], BTC)
        else:
            cancelled = await ex.cancel_order(o["id"], BTC)
            assert cancelled["status"] == "canceled" and cancelled["filled"] == 0.002
    (pos,) = (await sandbox_admin.state(acct.api_key)).positions
    assert pos.qty == (Decimal("0.004") if fill == "full" else Decimal("0.002"))


async def test_weight_limit_429_then_418(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    await sandbox_admin.reset_stats()
    await sandbox_admin.set_limits(Limits(fapi_weight_limit=20, ban_after=3, ban_s=30))
    try:
        async with venue(acct) as ex:  # load_markets costs 1
            statuses = []
            for _ in range(30):
                try:
                    await ex.fetch_open_orders(ETH)
                    statuses.append(200)
                except ccxt.DDoSProtection as e:
                    statuses.append(418 if " 418 " in str(e) else 429)
            assert statuses[:19] == [200] * 19
            assert 429 in statuses and statuses[-1] == 418
            assert int(ex.last_response_headers["X-MBX-USED-WEIGHT-1M"]) >= 20
        stats = await sandbox_admin.stats()
        assert stats.count_429 == 3 and stats.count_418 >= 1
        assert stats.requests_by_endpoint["GET /fapi/v1/openOrders"] == 30
    finally:
        await sandbox_admin.set_limits(Limits(fapi_weight_limit=2400, ban_after=5, ban_s=120))
        await sandbox_admin.reset_stats()


async def test_same_seed_same_requests_same_fills(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    async def run_once() -> list[tuple[str, Decimal, Decimal]]:
        await sandbox_admin.control_prices(frozen=True, reset_seed=42)
        acct = await new_account()
        price = (await sandbox_admin.prices()).prices["ETHUSDT"]
        async with venue(acct) as ex:
            await ex.create_order(ETH, "market", "buy", 0.05)
            await ex.create_order(ETH, "limit", "sell", 0.05, float(price * Decimal("1.002")))
            await ex.create_order(ETH, "limit", "buy", 0.05, float(price * Decimal("0.998")))
        await sandbox_admin.control_prices(step=100)
        fills = (await sandbox_admin.state(acct.api_key)).fills
        return [(f.side, f.qty, f.price) for f in fills]

    try:
        first, second = await run_once(), await run_once()
    finally:
        await sandbox_admin.control_prices(frozen=False)
    assert first == second and len(first) > 1


async def test_admin_boundary(sandbox: SandboxHandle, new_account: NewAccount) -> None:
    acct = await new_account()
    async with SandboxAdmin(sandbox.admin_url, acct.api_key) as wrong:
        with pytest.raises(AdminError) as err:
            await wrong.stats()
        assert err.value.status == 401
    session = loopback_session(sandbox.address, sandbox.ca_file)
    async with session:
        async with session.get("https://fapi.binance.com/admin/stats") as r:
            assert r.status == 404
        with pytest.raises(aiohttp.ClientConnectorError):  # never leaves loopback
            await session.get("https://example.com/")


def test_busy_port_exits_2(sandbox: SandboxHandle, tmp_path: object) -> None:
    port = sandbox.address.rsplit(":", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox", "--port", port, "--admin-port", "1",
         "--state-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot listen" in proc.stderr


async def test_concurrent_cancels_are_fast(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    acct = await new_account()
    bid = await _bid(sandbox_admin)
    async with venue(acct) as ex:
        orders = await asyncio.gather(
            *(ex.create_order(BTC, "limit", "buy", 0.002, bid) for _ in range(50))
        )
        started = time.monotonic()
        await asyncio.gather(*(ex.cancel_order(o["id"], BTC) for o in orders))
        # 50 concurrent cancels: one round trip each, at once (generous for a busy machine).
        assert time.monotonic() - started < 20
    assert (await sandbox_admin.state(acct.api_key)).open_orders == []


@pytest.mark.usefixtures("clean_faults")
async def test_request_journal_says_when_a_cancel_was_applied(
    new_account: NewAccount, venue: Venue, sandbox_admin: SandboxAdmin
) -> None:
    """The benchmarks' first-cancel clock: the venue's own arrival and answer times, per key."""
    acct, other = await new_account(), await new_account()
    bid = await _bid(sandbox_admin)
    await sandbox_admin.set_faults([FaultRule(kind="latency", match="*", latency_ms=50)])
    async with venue(acct) as ex, venue(other) as ex_other:
        order = await ex.create_order(BTC, "limit", "buy", 0.002, bid)
        await ex_other.fetch_open_orders(BTC)
        since = time.time()
        await ex.cancel_order(order["id"], BTC)
        after = time.time()
    mine = await sandbox_admin.requests(since=since, api_key=acct.api_key)
    assert [(r.method, r.path, r.status) for r in mine] == [("DELETE", "/fapi/v1/order", 200)]
    record = mine[0]
    assert since <= record.arrived and record.arrived + 0.05 <= record.answered <= after
    assert [r.api_key for r in await sandbox_admin.requests(api_key=other.api_key)] != []
