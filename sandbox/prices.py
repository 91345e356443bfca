"""Seeded random-walk mark prices, one independent stream per symbol.

Each symbol draws from its own ``random.Random`` seeded with ``"<seed>:<symbol>"`` so the path of
one symbol does not depend on how many others exist or on request timing: the n-th tick of a
symbol is the same in every run with the same seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal

from sandbox.markets import MARKETS, Market

# Per-tick volatility: ~0.9 % over a minute of 200 ms ticks, so seeded orders a few percent away
# from the price stay resting through a test run while orders near the price do fill.
SIGMA = 0.0005


def to_tick(price: Decimal, tick: Decimal) -> Decimal:
    return max(tick, (price / tick).to_integral_value(ROUND_HALF_UP) * tick)


class PriceProcess:
    """Owns the current price of every symbol; ``step()`` advances all of them by one tick."""

    def __init__(self, seed: int, markets: tuple[Market, ...] = MARKETS) -> None:
        self._markets = markets
        self.frozen = False
        self.reset(seed)

    def reset(self, seed: int) -> None:
        self.seed = seed
        self.ticks = 0
        self._rngs = {m.symbol: random.Random(f"{seed}:{m.symbol}") for m in self._markets}
        self.prices: dict[str, Decimal] = {m.symbol: m.start_price for m in self._markets}

    def set(self, symbol: str, price: Decimal) -> None:
        m = next(m for m in self._markets if m.symbol == symbol)
        self.prices[symbol] = to_tick(price, m.tick)

    def step(self, on_price: Callable[[str, Decimal], None]) -> None:
        self.ticks += 1
        for m in self._markets:
            shock = math.exp(self._rngs[m.symbol].gauss(0.0, SIGMA))
            self.prices[m.symbol] = to_tick(self.prices[m.symbol] * Decimal(shock), m.tick)
            on_price(m.symbol, self.prices[m.symbol])

    def half_spread(self, symbol: str, tick: Decimal) -> Decimal:
        """One basis point, at least one tick: market orders pay it, resting orders do not."""
        return to_tick(self.prices[symbol] * Decimal("0.0001"), tick)
