"""Kill-switch activities: halt, cancel everything, flatten, and look at what is left.

Each activity re-reads the venue before acting and verifies by re-reading after: "cancelled" and
"flat" are never assumed. Every item is safe to redo, because after a hard kill Temporal may
replay an activity from an old heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.accounts import ConfigError
from activities.errors import AuthFailed, OutcomeUnknown, RateLimited, VenueError
from activities.heartbeat import heartbeating
from activities.kill_cancel import CancelSweep
from activities.kill_flatten import (
    MAX_FLATTEN_PASSES,
    MAX_READ_FAILURES,
    REQUERY_INTERVAL_S,
    FlattenRun,
    Leg,
    NotSent,
    earlier_legs,
)
from activities.venues import VenueGateway, VenueSession, utcnow
from workflows.shared import (
    AccountRequest,
    CancelAllRequest,
    CancelAllResult,
    FlattenOrder,
    FlattenRequest,
    FlattenResult,
    HaltRequest,
    HaltResult,
    Position,
    VenueSnapshot,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEAD_MAN_TRIES = 3
"""Tries per symbol for a countdown the venue answered 5xx to (quick, inside the halt: it runs
beside the cancels and a retry of the whole activity would re-arm every symbol)."""
DEAD_MAN_CONCURRENCY = 16
"""Countdown calls in flight at once per halt (aiohttp pools 100 connections per session)."""
DEAD_MAN_REARM_WITHIN_S = 60.0
"""A countdown this process armed less than this long ago (and still past half its time) is
not armed again: a second kill within the minute spends no weight on it."""
UNREAD = ("orders", "conditional-orders", "positions")
READ_TRIES = 3
"""Tries of one read in the verify look (and the halt's listing) before it counts as unread."""


def as_application_error(error: VenueError | ConfigError, account: str) -> ApplicationError:
    """Temporal sees the domain class name and whether a retry can help; never a secret."""
    if isinstance(error, ConfigError):
        return ApplicationError(f"{account}: {error}", type="ConfigError", non_retryable=True)
    kind = type(error).__name__
    return ApplicationError(
        f"{account}: {kind}: {error}", type=kind, non_retryable=not error.retryable
    )


async def _read_again(read: Callable[[], Awaitable[T]]) -> T:
    """A read, tried again at once after a passing failure (5xx, connection): a flaky venue
    should not turn one unlucky answer into an unverified book. Rate limits are not hammered."""
    for attempt in range(READ_TRIES):
        try:
            return await read()
        except VenueError as e:
            if not e.retryable or isinstance(e, RateLimited) or attempt == READ_TRIES - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


class KillActivities:
    """The kill switch's side effects; the worker wires one instance with its venue gateway."""

    def __init__(self, gateway: VenueGateway) -> None:
        self.gateway = gateway

    async def _venue(self, account: str) -> VenueSession:
        try:
            return await self.gateway.session(account)
        except (VenueError, ConfigError) as e:
            raise as_application_error(e, account) from None

    # ------------------------------------------------------------------ halt

    @activity.defn(name="halt_account")
    async def halt(self, request: HaltRequest) -> HaltResult:
        """Arm the venue's dead-man switch, symbol by symbol, on every symbol with open orders.

        If this worker dies mid-kill, the venue still cancels those orders when the timer runs
        out. With ``dead_man_seconds=0`` it disarms the given symbols instead (after a verified
        kill). Spot has no such switch: reported, not faked.

        Per symbol: ``symbols_armed`` (or ``symbols_released``) lists exactly what the venue
        accepted, ``symbols_failed`` what it did not and why (a 5xx after a few quick tries, or
        our own weight limiter refusing the arming so that cancels go first). It raises only
        when nothing can be done: auth/config (non-retryable), or, with ``symbols=None``, when
        the open orders cannot be read (retryable: nothing is known to arm).
        """
        venue = await self._venue(request.account)
        if venue.is_spot:
            return HaltResult(account=request.account, supported=False)
        seconds = request.dead_man_seconds
        if seconds is None:
            seconds = venue.account.dead_man_seconds
            if seconds == 0:
                return HaltResult(account=request.account, supported=True)
        symbols = request.symbols
        try:
            if symbols is None:
                # Plain orders only: the conditional listing failing must not stop the arming.
                # Symbols only: parsing every order would hold the event loop the cancels share.
                rows = await _read_again(lambda: venue.open_order_rows(False, join_in_flight=True))
                symbols = sorted(venue.symbols_of(rows))
            failed = await self._countdowns(venue, symbols, seconds)
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        done = [s for s in symbols if s not in failed]
        if seconds == 0:
            return HaltResult(account=request.account, symbols_released=done, symbols_failed=failed)
        return HaltResult(account=request.account, symbols_armed=done, symbols_failed=failed)

    async def _countdowns(
        self, venue: VenueSession, symbols: list[str], seconds: int
    ) -> dict[str, str]:
        """Arm (or disarm) every symbol on its own; returns symbol -> why it failed."""

        # A few at a time: the halt runs beside the cancels, and must not take every pooled
        # connection to the venue while they wait for one.
        slots = asyncio.Semaphore(DEAD_MAN_CONCURRENCY)

        async def one(symbol: str) -> str | None:
            if seconds > 0 and venue.dead_man_running(symbol, seconds, DEAD_MAN_REARM_WITHIN_S):
                return None
            for attempt in range(DEAD_MAN_TRIES):
                try:
                    async with slots:
                        await venue.arm_dead_man(symbol, seconds)
                    return None
                except AuthFailed:
                    raise
                except RateLimited as e:
                    return str(e)  # ours or the venue's: backing off is the point
                except OutcomeUnknown as e:
                    # Maybe applied: the caller releases failed symbols too (harmless if not).
                    if attempt == DEAD_MAN_TRIES - 1:
                        return f"outcome unknown (may be armed): {e}"
                    await asyncio.sleep(0.1 * (attempt + 1))
                except VenueError as e:
                    if not e.retryable or attempt == DEAD_MAN_TRIES - 1:
                        return str(e)
                    await asyncio.sleep(0.1 * (attempt + 1))
            return "not tried"  # unreachable: the loop always returns

        reasons = await asyncio.gather(*(one(s) for s in symbols))
        return {s: r for s, r in zip(symbols, reasons, strict=True) if r is not None}

    # ------------------------------------------------------------------ cancel all

    @activity.defn(name="cancel_all")
    async def cancel_all(self, request: CancelAllRequest) -> CancelAllResult:
        """Cancel every open order, per symbol and per book, until the venue shows none.

        Each book goes on its own (see :mod:`activities.kill_cancel`): one the venue cannot
        list or cancel is reported in ``failed_books`` with ``complete=False`` and blocks nothing
        else. Raises only for auth/config (non-retryable) or when no book could be read at all
        (retryable, after the blind cancels went out).
        """
        venue = await self._venue(request.account)
        started = time.monotonic()
        progress: dict[str, object] = {"queries": 0}
        sweep = CancelSweep(venue, started + request.verify_deadline_s, progress)
        try:
            async with heartbeating(progress):
                outcome = await sweep.run()
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        still_open_ids = {o.id for o in outcome.still_open}
        return CancelAllResult(
            account=request.account,
            orders_found=len(outcome.seen),
            orders_cancelled=len(set(outcome.seen) - still_open_ids),
            still_open=outcome.still_open,
            symbols=sorted({o.symbol for o in outcome.seen.values()}),
            queries=outcome.queries,
            elapsed_s=round(time.monotonic() - started, 4),
            failed_books=outcome.failures,
            complete=not outcome.failures,
        )

    # ------------------------------------------------------------------ flatten

    @activity.defn(name="flatten")
    async def flatten(self, request: FlattenRequest) -> FlattenResult:
        """Close every position with orders that can only reduce it, until only dust is left
        (see :mod:`activities.kill_flatten`). Every leg goes on its own: a failed lookup or
        order is listed in ``failures`` and retried on the next pass; orders earlier attempts
        sent are in ``recovered_orders``. Raises only for auth/config, or when the positions
        cannot be read at all (retryable)."""
        venue = await self._venue(request.account)
        started = time.monotonic()
        info = activity.info()
        progress: dict[str, object] = {"pass": 0}
        run = FlattenRun(venue, request.client_id_prefix, info.attempt > 1, progress)
        if run.resumed:
            run.remember(earlier_legs(info.heartbeat_details))
            run.remember({(p.symbol, p.position_side): 0 for p in request.known_positions})
        try:
            # The first read comes before the first heartbeat, so that beat (the one the SDK
            # sends at once; later ones are throttled) names every leg this attempt may send
            # on: a retry after a crash looks their ids up even where the position is flat.
            first = await _read_again(venue.positions)
            run.remember({(p.symbol, p.position_side): 0 for p in first})
            progress["legs"] = run.heartbeat_legs()
            async with heartbeating(progress):
                before, after, passes, dust = await self._flatten_passes(run, first)
                await run.find_unknown()
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        left_dust = [
            p
            for p in after
            if (p.symbol, p.position_side) in dust or self._closable(venue, p) is None
        ]
        return FlattenResult(
            account=request.account,
            positions_before=before,
            positions_after=after,
            dust=left_dust,
            orders=run.orders,
            passes=passes,
            elapsed_s=round(time.monotonic() - started, 4),
            failures=run.failures(
                [p for p in after if p not in left_dust],
                passes_spent=passes >= MAX_FLATTEN_PASSES,
            ),
            recovered_orders=sorted(run.recovered.values(), key=lambda o: o.client_order_id),
        )

    async def _flatten_passes(
        self, run: FlattenRun, first: list[Position]
    ) -> tuple[list[Position], list[Position], int, set[Leg]]:
        """Pass after pass from fresh positions; returns (before, after, passes, dust legs)."""
        venue = run.venue
        # Earlier attempts' legs are looked up even where the position is flat now: the report
        # lists every order sent under this prefix.
        await asyncio.gather(*(run.resolve(leg) for leg in list(run.legs)))
        before: list[Position] | None = None
        after: list[Position] | None = None
        passes = read_failures = 0
        fresh: list[Position] | None = first
        while passes < MAX_FLATTEN_PASSES:
            try:
                positions = fresh if fresh is not None else await venue.positions()
                fresh = None
            except VenueError as e:
                if isinstance(e, AuthFailed) or read_failures + 1 >= MAX_READ_FAILURES:
                    raise
                read_failures += 1
                await asyncio.sleep(REQUERY_INTERVAL_S)
                continue
            read_failures = 0
            if before is None:
                before = positions
            after = positions  # read after every earlier pass's answers: the state now
            work = [
                (p, q)
                for p in positions
                if run.leg((p.symbol, p.position_side)).stopped is None
                and (q := self._closable(venue, p)) is not None
            ]
            if not work:
                break
            passes += 1
            run.progress["pass"] = passes
            sent = await asyncio.gather(*(run.close_one(p, q) for p, q in work))
            run.orders.extend(o for o in sent if isinstance(o, FlattenOrder))
            after = None
            if not any(isinstance(o, FlattenOrder) for o in sent):
                await asyncio.sleep(REQUERY_INTERVAL_S)  # let an unknown outcome settle
        if after is None:
            after = await self._final_positions(venue)
        # Unresolved earlier legs (lookups kept failing) get one more try for the report.
        await asyncio.gather(*(run.resolve(leg) for leg, s in run.legs.items() if not s.resolved))
        dust = {leg for leg, s in run.legs.items() if s.stopped is NotSent.DUST}
        return before or [], after, passes, dust

    @staticmethod
    async def _final_positions(venue: VenueSession) -> list[Position]:
        for attempt in range(MAX_READ_FAILURES):
            try:
                return await venue.positions()
            except VenueError as e:
                if isinstance(e, AuthFailed) or attempt == MAX_READ_FAILURES - 1:
                    raise
                await asyncio.sleep(REQUERY_INTERVAL_S)
        raise AssertionError("unreachable")

    @staticmethod
    def _closable(venue: VenueSession, position: Position) -> Decimal | None:
        """Size one order may close now (capped by the venue's max), or None for dust."""
        rules = venue.lot_rules(position.symbol)
        quantity = rules.round_down(abs(position.quantity))
        if rules.max_qty is not None:
            quantity = min(quantity, rules.max_qty)  # larger positions take more passes
        if quantity <= 0 or quantity < rules.min_qty:
            return None
        if (
            venue.is_spot
            and position.mark_price
            and quantity * position.mark_price < rules.min_notional
        ):
            return None
        return quantity

    # ------------------------------------------------------------------ look

    @activity.defn(name="snapshot_venue_state")
    async def snapshot_venue_state(self, request: AccountRequest) -> VenueSnapshot:
        """Open orders and positions as the venue reports them now (for verify and reports).

        Each book is read on its own: one the venue cannot read is named in ``unread_books``
        (not verified) instead of hiding what the others show. Raises only for auth/config or
        when nothing at all could be read (retryable).
        """
        venue = await self._venue(request.account)
        reads = await asyncio.gather(
            _read_again(venue.plain_open_orders),
            _read_again(venue.conditional_open_orders),
            _read_again(venue.positions),
            return_exceptions=True,
        )
        unread: list[str] = []
        for name, read in zip(UNREAD, reads, strict=True):
            if isinstance(read, AuthFailed) or (
                isinstance(read, BaseException) and not isinstance(read, VenueError)
            ):
                if isinstance(read, VenueError):
                    raise as_application_error(read, request.account) from None
                raise read
            if isinstance(read, VenueError):
                unread.append(name)
        if len(unread) == len(UNREAD):
            error = reads[0]
            assert isinstance(error, VenueError)
            raise as_application_error(error, request.account) from None
        plain, conditional, positions = reads
        positions = positions if isinstance(positions, list) else []
        orders = [
            *(plain if isinstance(plain, list) else []),
            *(conditional if isinstance(conditional, list) else []),
        ]
        return VenueSnapshot(
            account=request.account,
            taken_at=utcnow(),
            open_orders=orders,
            positions=[p for p in positions if self._closable(venue, p) is not None],
            dust=[p for p in positions if self._closable(venue, p) is None],
            unread_books=unread,
        )
