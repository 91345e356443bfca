"""A rolling-window weight limiter for one venue host: bursts are free, the budget is never passed.

ccxt's own throttle is off (its leaky bucket serialises a concurrent cancel-all into seconds);
this limiter hooks every HTTP request through aiohttp's trace hooks, so every call ccxt makes is
counted, and it also trusts the venue's ``X-MBX-USED-WEIGHT-1M`` answer when that is higher
(other processes on the same IP spend the same budget).

Unwinding goes first: the venue's dead-man arming (``countdownCancelAll``, weight 10 per symbol)
has its own lane, capped at a share of the budget, that never waits and never takes weight an
unwinding request is waiting for. Cancels, flattens and verify reads never queue behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from types import SimpleNamespace

import aiohttp

from activities.errors import RateLimited

WINDOW_S = 60.0
DEAD_MAN_SHARE = 0.3
"""Share of the budget dead-man arming may use per minute (2,160 -> 648: 64 symbols armed a
minute); the rest is always there for cancels, flattens and verify reads."""


class Lane(StrEnum):
    UNWIND = "unwind"
    """Cancels, flattens, reads: waits (briefly) for weight, first in line."""
    DEAD_MAN = "dead-man"
    """Arming/disarming the venue's countdown: admitted only from spare weight, never waits."""


_DEAD_MAN_PATHS = {("POST", "/fapi/v1/countdownCancelAll")}

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


def request_lane(method: str, url: str) -> Lane:
    """Which lane a request waits in: bookkeeping never delays unwinding."""
    path = aiohttp.client.URL(url).path
    return Lane.DEAD_MAN if (method.upper(), path) in _DEAD_MAN_PATHS else Lane.UNWIND


class WeightLimiter:
    """Admits requests while the last minute's weight stays within ``budget``.

    It waits at most ``max_wait_s``: the request it holds is already signed, and a venue refuses
    a timestamp older than its receive window (-1021). Past that it raises :class:`RateLimited`
    so the activity's retry signs afresh, with Temporal's backoff.
    """

    def __init__(
        self,
        budget: int,
        max_wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        dead_man_share: float = DEAD_MAN_SHARE,
    ) -> None:
        self.budget = budget
        self.dead_man_budget = int(budget * dead_man_share)
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._spent: deque[tuple[float, int, Lane]] = deque()
        # Running totals per lane, kept with the deque: summing the window on every request cost
        # O(requests per minute) each, quadratic over a busy minute (4 s of event loop at 5,000).
        self._totals: dict[Lane, int] = dict.fromkeys(Lane, 0)
        self._lock = asyncio.Lock()
        self.waits = 0
        """How many requests had to wait: zero in a healthy run."""
        self.dead_man_refused = 0
        """How many dead-man requests were refused for lack of spare weight."""

    def used(self, lane: Lane | None = None) -> int:
        self._expire()
        return sum(self._totals.values()) if lane is None else self._totals[lane]

    async def acquire(self, weight: int, lane: Lane = Lane.UNWIND) -> None:
        if lane is Lane.DEAD_MAN:
            self._admit_dead_man(weight)
            return
        async with self._lock:  # FIFO: a heavy request is not starved by light ones
            deadline = self._clock() + self.max_wait_s
            while True:
                self._expire()
                used = self.used()
                if used + weight <= self.budget or not self._spent:
                    self._spend(weight, lane)
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

    def _admit_dead_man(self, weight: int) -> None:
        """Spare weight only: within the lane's share, and not while an unwinding request waits
        (it would take the weight that request is waiting for). Refused at once, never queued:
        an arming that waits would hold a signed request and delay nothing useful."""
        self._expire()
        lane_used = self.used(Lane.DEAD_MAN)
        if self._lock.locked():
            why = "an unwinding request is waiting for weight"
        elif lane_used + weight > self.dead_man_budget:
            why = f"dead-man share {self.dead_man_budget}/min spent ({lane_used} used)"
        elif self.used() + weight > self.budget:
            why = f"weight budget {self.budget}/min spent ({self.used()} used)"
        else:
            self._spend(weight, Lane.DEAD_MAN)
            return
        self.dead_man_refused += 1
        raise RateLimited(f"dead-man arming refused by our weight limiter: {why}")

    def observe(self, venue_used: int) -> None:
        """Account for weight the venue says was spent that this process did not send."""
        missing = venue_used - self.used()
        if missing > 0:
            self._spend(missing, Lane.UNWIND)

    def _spend(self, weight: int, lane: Lane) -> None:
        self._spent.append((self._clock(), weight, lane))
        self._totals[lane] += weight

    def _expire(self) -> None:
        cutoff = self._clock() - WINDOW_S
        while self._spent and self._spent[0][0] <= cutoff:
            _, weight, lane = self._spent.popleft()
            self._totals[lane] -= weight


def limiter_trace(limiter_for: Callable[[str], WeightLimiter | None]) -> aiohttp.TraceConfig:
    """aiohttp hooks that make every request wait for its weight and read the venue's count."""

    async def on_start(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        limiter = limiter_for(params.url.host or "")
        if limiter is not None:
            url = str(params.url)
            await limiter.acquire(
                request_weight(params.method, url), request_lane(params.method, url)
            )

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
