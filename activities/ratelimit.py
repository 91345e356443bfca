"""A rolling-window weight limiter for one venue host: bursts are free, the budget is never passed.

ccxt's own throttle is off (its leaky bucket serialises a concurrent cancel-all into seconds);
this limiter hooks every HTTP request through aiohttp's trace hooks, so every call ccxt makes is
counted, and it also trusts the venue's ``X-MBX-USED-WEIGHT-1M`` answer when that is higher
(other processes on the same IP spend the same budget).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace

import aiohttp

from activities.errors import RateLimited

WINDOW_S = 60.0

# (method, path) -> (weight with symbol, weight without symbol). Binance's documented weights.
_FAPI_WEIGHTS: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/fapi/v1/openOrders"): (1, 40),
    ("GET", "/fapi/v1/openAlgoOrders"): (1, 40),
    ("GET", "/fapi/v3/positionRisk"): (5, 5),
    ("GET", "/fapi/v2/positionRisk"): (5, 5),
    ("GET", "/fapi/v3/account"): (5, 5),
    ("GET", "/fapi/v2/account"): (5, 5),
    ("GET", "/fapi/v3/balance"): (5, 5),
    ("GET", "/fapi/v1/positionSide/dual"): (30, 30),
    ("POST", "/fapi/v1/countdownCancelAll"): (10, 10),
    ("GET", "/fapi/v1/exchangeInfo"): (1, 1),
    ("GET", "/fapi/v1/leverageBracket"): (1, 1),
}
_SPOT_WEIGHTS: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/api/v3/openOrders"): (6, 80),
    ("GET", "/api/v3/account"): (20, 20),
    ("GET", "/api/v3/exchangeInfo"): (20, 20),
    ("GET", "/api/v3/order"): (4, 4),
}


def request_weight(method: str, url: str) -> int:
    """Weight Binance charges for one request (1 where it documents nothing heavier)."""
    parsed = aiohttp.client.URL(url)
    table = _FAPI_WEIGHTS if parsed.path.startswith("/fapi") else _SPOT_WEIGHTS
    with_symbol, without_symbol = table.get((method.upper(), parsed.path), (1, 1))
    return with_symbol if "symbol" in parsed.query else without_symbol


class WeightLimiter:
    """Admits requests while the last minute's weight stays within ``budget``.

    It waits at most ``max_wait_s``: the request it holds is already signed, and a venue refuses
    a timestamp older than its receive window (-1021). Past that it raises :class:`RateLimited`
    so the activity's retry signs afresh, with Temporal's backoff.
    """

    def __init__(
        self, budget: int, max_wait_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.budget = budget
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._spent: deque[tuple[float, int]] = deque()
        self._lock = asyncio.Lock()
        self.waits = 0
        """How many requests had to wait: zero in a healthy run."""

    def used(self) -> int:
        self._expire()
        return sum(weight for _, weight in self._spent)

    async def acquire(self, weight: int) -> None:
        async with self._lock:  # FIFO: a heavy request is not starved by light ones
            deadline = self._clock() + self.max_wait_s
            while True:
                self._expire()
                used = sum(w for _, w in self._spent)
                if used + weight <= self.budget or not self._spent:
                    self._spent.append((self._clock(), weight))
                    return
                free_at = self._spent[0][0] + WINDOW_S
                if free_at > deadline:
                    raise RateLimited(
                        f"weight budget {self.budget}/min spent ({used} used): "
                        f"backing off instead of waiting {free_at - self._clock():.0f}s"
                    )
                self.waits += 1
                # Short naps, re-checked: the window moves and the venue's count may change.
                await asyncio.sleep(min(max(free_at - self._clock(), 0.01), 0.25))

    def observe(self, venue_used: int) -> None:
        """Account for weight the venue says was spent that this process did not send."""
        missing = venue_used - self.used()
        if missing > 0:
            self._spent.append((self._clock(), missing))

    def _expire(self) -> None:
        cutoff = self._clock() - WINDOW_S
        while self._spent and self._spent[0][0] <= cutoff:
            self._spent.popleft()


def limiter_trace(limiter_for: Callable[[str], WeightLimiter | None]) -> aiohttp.TraceConfig:
    """aiohttp hooks that make every request wait for its weight and read the venue's count."""

    async def on_start(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        limiter = limiter_for(params.url.host or "")
        if limiter is not None:
            await limiter.acquire(request_weight(params.method, str(params.url)))

    async def on_end(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        limiter = limiter_for(params.url.host or "")
        used = params.response.headers.get("X-MBX-USED-WEIGHT-1M")
        if limiter is not None and used and used.isdigit():
            limiter.observe(int(used))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    trace.on_request_end.append(on_end)
    return trace
