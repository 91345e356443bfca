"""The weight limiter on a fake clock: bursts pass, the budget is never exceeded, a long wait
turns into a retryable RateLimited, and the venue's own count is trusted when higher."""

from __future__ import annotations

import asyncio

import pytest

from activities.errors import RateLimited
from activities.ratelimit import (
    DEAD_MAN_SHARE,
    WINDOW_S,
    Lane,
    WeightLimiter,
    request_lane,
    request_weight,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_burst_within_the_budget_passes_at_once() -> None:
    clock = FakeClock()
    limiter = WeightLimiter(100, clock=clock)
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire(1) for _ in range(100))), 1)
    assert limiter.used() == 100 and limiter.waits == 0


async def test_past_the_budget_it_waits_for_the_window_then_admits() -> None:
    clock = FakeClock()
    limiter = WeightLimiter(10, max_wait_s=WINDOW_S, clock=clock)
    await limiter.acquire(10)
    waiting = asyncio.ensure_future(limiter.acquire(5))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # never more than the budget in one window
    clock.now += WINDOW_S + 0.001
    await asyncio.wait_for(waiting, 1)
    assert limiter.used() == 5


async def test_a_wait_longer_than_a_signed_request_survives_is_refused() -> None:
    clock = FakeClock()
    limiter = WeightLimiter(10, max_wait_s=2.0, clock=clock)
    await limiter.acquire(10)
    with pytest.raises(RateLimited, match="backing off"):
        await limiter.acquire(1)
    assert limiter.used() == 10


async def test_the_venues_count_is_trusted_when_higher() -> None:
    clock = FakeClock()
    limiter = WeightLimiter(100, clock=clock)
    await limiter.acquire(10)
    limiter.observe(95)  # someone else on this IP spent weight too
    assert limiter.used() == 95
    limiter.observe(50)  # lower than ours: nothing to add
    assert limiter.used() == 95
    with pytest.raises(RateLimited):
        await limiter.acquire(10)


@pytest.mark.parametrize(
    ("method", "url", "weight"),
    [
        ("GET", "https://fapi.binance.com/fapi/v1/openOrders?timestamp=1&signature=x", 40),
        ("GET", "https://fapi.binance.com/fapi/v1/openOrders?symbol=BTCUSDT&timestamp=1", 1),
        ("GET", "https://api.binance.com/api/v3/openOrders?timestamp=1", 80),
        ("POST", "https://fapi.binance.com/fapi/v1/countdownCancelAll", 10),
        ("DELETE", "https://fapi.binance.com/fapi/v1/allOpenOrders?symbol=BTCUSDT", 1),
        ("GET", "https://fapi.binance.com/fapi/v3/positionRisk?timestamp=1", 5),
    ],
)
def test_request_weights_follow_binance(method: str, url: str, weight: int) -> None:
    assert request_weight(method, url) == weight


async def test_a_cancel_is_admitted_at_once_while_the_dead_man_lane_is_spent() -> None:
    clock = FakeClock()
    limiter = WeightLimiter(100, clock=clock)
    admitted = 0
    with pytest.raises(RateLimited, match="dead-man"):
        while True:  # arm until the dead-man lane refuses: it never waits
            await asyncio.wait_for(limiter.acquire(10, Lane.DEAD_MAN), 0.05)
            admitted += 1
    assert 0 < admitted * 10 <= 100 * DEAD_MAN_SHARE
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire(1) for _ in range(50))), 0.05)
    assert limiter.waits == 0


async def test_a_waiting_unwind_request_goes_before_any_arming() -> None:
    clock = FakeClock()
    limiter = WeightLimiter(100, max_wait_s=WINDOW_S, clock=clock)
    await limiter.acquire(95)
    cancel = asyncio.ensure_future(limiter.acquire(10))
    await asyncio.sleep(0.02)
    clock.now += WINDOW_S + 0.001  # weight frees up: the waiting cancel gets it, not the arming
    with pytest.raises(RateLimited):
        await limiter.acquire(10, Lane.DEAD_MAN)
    await asyncio.wait_for(cancel, 1)


def test_countdown_cancel_all_is_the_dead_man_lane() -> None:
    assert request_lane("POST", "https://fapi.binance.com/fapi/v1/countdownCancelAll") is (
        Lane.DEAD_MAN
    )
    assert request_lane("DELETE", "https://fapi.binance.com/fapi/v1/allOpenOrders") is Lane.UNWIND


async def test_running_totals_match_the_window_as_it_moves() -> None:
    """The per-lane totals (kept so a busy minute is not summed on every request) always equal
    the weight still inside the window, per lane and in all."""
    clock = FakeClock()
    limiter = WeightLimiter(10_000, clock=clock, dead_man_share=0.5)
    sent: list[tuple[float, int, Lane]] = []
    for i in range(600):
        clock.now += 0.37
        lane = Lane.DEAD_MAN if i % 7 == 0 else Lane.UNWIND
        weight = 10 if lane is Lane.DEAD_MAN else 1 + i % 5
        try:
            await limiter.acquire(weight, lane)
        except RateLimited:
            continue
        sent.append((clock.now, weight, lane))
        live = [(t, w, ln) for t, w, ln in sent if t > clock.now - WINDOW_S]
        assert limiter.used() == sum(w for _, w, _ in live)
        assert limiter.used(Lane.DEAD_MAN) == sum(w for _, w, ln in live if ln is Lane.DEAD_MAN)
