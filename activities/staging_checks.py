"""Staging checks of a release, each a measurement with a pass/fail (``staging_check``).

They run against the staging environment's accounts (its runbook), on the venue that
environment trades on, through the same venue adapter as production:

- ``feed``: market data (the public mark price) reachable on every check symbol; its
  fetch-and-parse latency and age;
- ``broker``: the integration battery — a resting order is routed and seen open, cancelled and
  seen gone; a minimum market order moves the position by exactly its size and a reduce-only
  order closes it again (every step re-read from the venue);
- ``kill-switch``: orders and a position are opened, then the kill switch's own activities
  (halt, cancel-all, flatten, verify) must leave the account with nothing open and flat.
- ``release``: the release itself trades on staging for a bake window, measured and reconciled
  (``staging_release.py``).

A check that cannot tell (venue down) fails as an error and is retried once by the workflow; a
check that measured a failure returns ``passed=False`` with the reason and the numbers. The
staging account must be clean when a check starts: a check never touches what it did not open.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections.abc import Awaitable, Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.accounts import ConfigError
from activities.errors import VenueError
from activities.heartbeat import heartbeating
from activities.kill import KillActivities, as_application_error
from activities.rollback_plan import find_runbook
from activities.runbooks import Runbook
from activities.staging_release import ReleaseCheck, TargetFor, runbook_target
from activities.venues import VenueGateway, VenueSession
from workflows.deployment_models import CheckRequest, CheckResult
from workflows.shared import (
    AccountRequest,
    CancelAllRequest,
    FlattenRequest,
    HaltRequest,
    Position,
    PositionKind,
)

FEED_SAMPLES = 5
FEED_P99_LIMIT_MS = 500.0
"""A price that takes longer than this to arrive and parse is no feed to trade on."""
FEED_MAX_AGE_S = 5.0
"""A price older than this when it arrives is stale."""
FAR_FROM_MARKET = Decimal("0.8")
"""Resting test orders are priced here (x the mid): they never fill."""

Check = Callable[[Runbook, CheckRequest], Awaitable[CheckResult]]


class NotClean(Exception):
    """The staging account holds orders or positions a check did not open."""


class StagingChecks:
    def __init__(
        self, runbooks_dir: Path, gateway: VenueGateway, target_for: TargetFor = runbook_target
    ) -> None:
        self.runbooks_dir = runbooks_dir
        self.gateway = gateway
        self.kill = KillActivities(gateway)
        self.checks: dict[str, Check] = {
            "feed": self.feed,
            "broker": self.broker,
            "kill-switch": self.kill_switch,
            "release": ReleaseCheck(gateway, self.kill, target_for),
        }

    @activity.defn(name="staging_check")
    async def run(self, request: CheckRequest) -> CheckResult:
        check = self.checks.get(request.check)
        if check is None:
            raise ApplicationError(
                f"no staging check {request.check!r} here (known: {', '.join(self.checks)})",
                type="UnknownCheck",
                non_retryable=True,
            )
        try:
            runbook = await asyncio.to_thread(
                find_runbook, self.runbooks_dir, request.ref.strategy, request.ref.env
            )
        except ConfigError as e:
            raise ApplicationError(str(e), type="ConfigError", non_retryable=True) from None
        async with heartbeating({"check": request.check}):
            try:
                return await check(runbook, request)
            except NotClean as e:
                return CheckResult(check=request.check, passed=False, detail=str(e))
            except VenueError as e:
                raise as_application_error(e, runbook.accounts[0]) from None

    # ------------------------------------------------------------------ the checks

    async def feed(self, runbook: Runbook, request: CheckRequest) -> CheckResult:
        latencies: list[float] = []
        ages: list[float] = []
        for account in runbook.accounts:
            venue = await self.gateway.session(account)
            for symbol in self._symbols(venue, runbook):
                for _ in range(FEED_SAMPLES):
                    started = time.perf_counter()
                    mark = await venue.call(venue.exchange.fetch_mark_price, symbol)
                    latencies.append((time.perf_counter() - started) * 1000)
                    if not mark.get("markPrice"):
                        return CheckResult(
                            check="feed", passed=False, detail=f"{account} {symbol}: no price"
                        )
                    if mark.get("timestamp"):
                        ages.append(max(0.0, time.time() - mark["timestamp"] / 1000))
        p99 = _percentile(latencies, 0.99)
        oldest = max(ages, default=0.0)
        numbers = {
            "samples": float(len(latencies)),
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(p99, 3),
            "max_age_s": round(oldest, 3),
        }
        problems = []
        if p99 > FEED_P99_LIMIT_MS:
            problems.append(f"p99 {p99:.0f} ms > {FEED_P99_LIMIT_MS:.0f} ms")
        if oldest > FEED_MAX_AGE_S:
            problems.append(f"prices {oldest:.1f}s old > {FEED_MAX_AGE_S:.0f}s")
        ok = not problems
        detail = "; ".join(problems) or f"p99 {p99:.1f} ms over {len(latencies)} prices"
        return CheckResult(check="feed", passed=ok, detail=detail, measurements=numbers)

    async def broker(self, runbook: Runbook, request: CheckRequest) -> CheckResult:
        venue = await self.gateway.session(runbook.accounts[0])
        (symbol, *_) = self._symbols(venue, runbook)
        await _require_clean(venue)
        tag = _tag(request)
        numbers: dict[str, float] = {}
        # 1. Route a resting order, see it open, cancel it, see it gone.
        rules = venue.lot_rules(symbol)
        mid = await _mid(venue, symbol)
        price = float(venue.exchange.price_to_precision(symbol, mid * FAR_FROM_MARKET))
        size = _min_size(venue, symbol, Decimal(str(price)))
        started = time.perf_counter()
        order = await venue.call(
            venue.exchange.create_order,
            symbol,
            "limit",
            "buy",
            float(size),
            price,
            {"newClientOrderId": f"{tag}-rest"},
        )
        numbers["order_ack_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if not any(o.client_order_id == f"{tag}-rest" for o in await venue.open_orders()):
            return CheckResult(check="broker", passed=False, detail="routed order not open")
        started = time.perf_counter()
        await venue.call(venue.exchange.cancel_order, order["id"], symbol)
        numbers["cancel_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if await venue.open_orders():
            return CheckResult(check="broker", passed=False, detail="cancelled order still open")
        # 2. A minimum market order moves the position by exactly its size; closing restores it.
        size = max(_min_size(venue, symbol, mid), rules.min_qty)
        started = time.perf_counter()
        await venue.call(
            venue.exchange.create_order,
            symbol,
            "market",
            "buy",
            float(size),
            None,
            {"newClientOrderId": f"{tag}-open"},
        )
        held = _net(await venue.positions(), symbol)
        numbers["position_update_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if held != size:
            return CheckResult(
                check="broker", passed=False, detail=f"position {held} after buying {size}"
            )
        long = Position(symbol=symbol, kind=PositionKind.DERIVATIVE, quantity=held)
        await venue.close_position(long, held, f"{tag}-close")
        left = _net(await venue.positions(), symbol)
        if left != 0:
            return CheckResult(check="broker", passed=False, detail=f"position {left} after close")
        detail = (
            f"routed/seen/cancelled and opened/closed {size} {symbol}: ack "
            f"{numbers['order_ack_ms']:.0f} ms, cancel {numbers['cancel_ms']:.0f} ms"
        )
        return CheckResult(check="broker", passed=True, detail=detail, measurements=numbers)

    async def kill_switch(self, runbook: Runbook, request: CheckRequest) -> CheckResult:
        account = runbook.accounts[0]
        venue = await self.gateway.session(account)
        (symbol, *_) = self._symbols(venue, runbook)
        await _require_clean(venue)
        tag = _tag(request)
        mid = await _mid(venue, symbol)
        price = float(venue.exchange.price_to_precision(symbol, mid * FAR_FROM_MARKET))
        size = _min_size(venue, symbol, Decimal(str(price)))
        for n in range(2):
            await venue.call(
                venue.exchange.create_order,
                symbol,
                "limit",
                "buy",
                float(size),
                price,
                {"newClientOrderId": f"{tag}-r{n}"},
            )
        await venue.call(
            venue.exchange.create_order,
            symbol,
            "market",
            "buy",
            float(_min_size(venue, symbol, mid)),
            None,
            {"newClientOrderId": f"{tag}-pos"},
        )
        started = time.perf_counter()
        await self.kill.halt(HaltRequest(account=account, dead_man_seconds=60))
        await self.kill.cancel_all(CancelAllRequest(account=account))
        await self.kill.flatten(FlattenRequest(account=account, client_id_prefix=f"{tag}k"))
        look = await self.kill.snapshot_venue_state(AccountRequest(account=account))
        await self.kill.halt(HaltRequest(account=account, dead_man_seconds=0, symbols=[symbol]))
        elapsed = time.perf_counter() - started
        ok = not look.open_orders and not look.positions and not look.unread_books
        detail = (
            f"flat with nothing open {elapsed:.2f}s after the kill"
            if ok
            else f"after the kill: {len(look.open_orders)} open, {len(look.positions)} positions"
        )
        return CheckResult(
            check="kill-switch",
            passed=ok,
            detail=detail,
            measurements={"time_to_flat_s": round(elapsed, 3)},
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _symbols(venue: VenueSession, runbook: Runbook) -> list[str]:
        """ccxt symbols of the runbook's check symbols on this venue."""
        by_id = {m["id"]: m["symbol"] for m in venue.exchange.markets.values()}
        missing = [s for s in runbook.deploy.check_symbols if s not in by_id]
        if missing:
            raise ApplicationError(
                f"{venue.name}: no market {', '.join(missing)}",
                type="ConfigError",
                non_retryable=True,
            )
        return [by_id[s] for s in runbook.deploy.check_symbols]


def _tag(request: CheckRequest) -> str:
    """Client-id prefix of one check attempt (deterministic; attempts never share ids)."""
    info = activity.info()
    digest = hashlib.sha256(f"{info.workflow_id}/{request.check}".encode()).hexdigest()[:10]
    return f"bgchk{digest}a{info.attempt}"


async def _require_clean(venue: VenueSession) -> None:
    orders, positions = await asyncio.gather(venue.open_orders(), venue.positions())
    if orders or positions:
        raise NotClean(
            f"staging account {venue.name} is not clean ({len(orders)} open orders, "
            f"{len(positions)} positions): a check only touches what it opened"
        )


async def _mid(venue: VenueSession, symbol: str) -> Decimal:
    mark = await venue.call(venue.exchange.fetch_mark_price, symbol)
    return Decimal(str(mark["markPrice"]))


def _min_size(venue: VenueSession, symbol: str, price: Decimal) -> Decimal:
    """The smallest order the venue takes at ``price`` (lot step and minimum notional)."""
    rules = venue.lot_rules(symbol)
    steps = (rules.min_notional * Decimal("1.1") / price / rules.step).to_integral_value(
        rounding=ROUND_CEILING
    )
    return max(rules.min_qty, steps * rules.step)


def _net(positions: list[Position], symbol: str) -> Decimal:
    return sum((p.quantity for p in positions if p.symbol == symbol), Decimal(0))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
