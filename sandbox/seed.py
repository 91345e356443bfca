"""Seed a realistic book through the admin API: resting orders, partial fills, positions, balances.

Deterministic from ``spec.seed``; one bulk call per account for orders, one for positions.
"""

from __future__ import annotations

import random
from decimal import ROUND_DOWN, Decimal

from pydantic import BaseModel, ConfigDict, Field

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import PositionSet, SeedOrder
from sandbox.markets import MARKETS, Market
from sandbox.prices import to_tick


class SeedAccount(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    api_key: str
    secret: str
    hedge_mode: bool = False


class BookSpec(BaseModel):
    """What to seed. Benchmark scenario: 2 accounts x 25 symbols, 1,000 orders, 20 positions."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    accounts: list[SeedAccount]
    symbols: int = Field(25, ge=1, le=len(MARKETS))
    open_orders: int = 1000
    """Total across accounts; split evenly, spread round-robin over the symbols."""
    positions: int = 20
    """Total futures positions across accounts, alternating long and short."""
    partial_fraction: float = 0.1
    """Share of orders seeded PARTIALLY_FILLED."""
    spot_orders_fraction: float = 0.2
    """Share of orders placed on spot instead of futures."""
    seed: int = 0
    create_accounts: bool = True


class SeededBook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    order_ids: dict[str, list[int]]
    positions: dict[str, list[PositionSet]]
    symbols: list[str]


def _qty(m: Market, price: Decimal, notional: Decimal) -> Decimal:
    """At least the min notional and a few lots, rounded to the step."""
    q = (notional / price).quantize(m.step, ROUND_DOWN)
    return max(q, m.step * 3)


async def seed_book(admin: SandboxAdmin, spec: BookSpec) -> SeededBook:
    rng = random.Random(f"seed_book:{spec.seed}")
    markets = list(MARKETS[: spec.symbols])
    prices = (await admin.prices()).prices
    n_acc = len(spec.accounts)
    order_ids: dict[str, list[int]] = {}
    positions: dict[str, list[PositionSet]] = {}
    for ai, acc in enumerate(spec.accounts):
        n_orders = spec.open_orders // n_acc + (1 if ai < spec.open_orders % n_acc else 0)
        n_pos = spec.positions // n_acc + (1 if ai < spec.positions % n_acc else 0)
        spot_balances = {"USDT": Decimal(1_000_000)}
        orders: list[SeedOrder] = []
        for i in range(n_orders):
            m = markets[(i + ai) % len(markets)]
            price = prices[m.symbol]
            side = "BUY" if rng.random() < 0.5 else "SELL"
            # 3-12 % away from the price: they rest through a test run unless it is moved.
            away = Decimal(str(round(rng.uniform(0.03, 0.12), 4)))
            px = to_tick(price * (1 - away if side == "BUY" else 1 + away), m.tick)
            notional = max(m.futures_min_notional, Decimal(25)) * Decimal(rng.randint(1, 4))
            qty = _qty(m, px, notional)
            venue = "spot" if rng.random() < spec.spot_orders_fraction else "futures"
            filled = Decimal(0)
            if rng.random() < spec.partial_fraction:
                filled = (qty / 3).quantize(m.step, ROUND_DOWN)
            position_side = None
            if venue == "futures" and acc.hedge_mode:
                position_side = "LONG" if side == "BUY" else "SHORT"
            orders.append(
                SeedOrder(
                    venue=venue,
                    symbol=m.symbol,
                    side=side,
                    qty=qty,
                    price=px,
                    filled_qty=filled,
                    position_side=position_side,
                )
            )
        pos_list: list[PositionSet] = []
        for j in range(n_pos):
            m = markets[(j * 3 + ai) % len(markets)]
            price = prices[m.symbol]
            sign = 1 if j % 2 == 0 else -1
            qty = _qty(m, price, Decimal(rng.randint(200, 2000))) * sign
            leg = "BOTH" if not acc.hedge_mode else ("LONG" if sign > 0 else "SHORT")
            pos_list.append(
                PositionSet(symbol=m.symbol, qty=qty, entry_price=price, position_side=leg)
            )
            # Spot holdings of the same coins, so spot flattening has something to sell.
            spot_balances[m.base] = spot_balances.get(m.base, Decimal(0)) + abs(qty)
        if spec.create_accounts:
            await admin.create_account(
                acc.api_key, acc.secret, hedge_mode=acc.hedge_mode, spot_balances=spot_balances
            )
        else:
            await admin.set_balances(acc.api_key, spot_balances=spot_balances)
        order_ids[acc.api_key] = await admin.seed_orders(acc.api_key, orders)
        if pos_list:
            await admin.set_positions(acc.api_key, pos_list)
        positions[acc.api_key] = pos_list
    return SeededBook(order_ids=order_ids, positions=positions, symbols=[m.symbol for m in markets])
