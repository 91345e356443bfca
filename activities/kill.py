"""Kill-switch activities: halt, cancel everything, flatten, and look at what is left.

Each activity re-reads the venue before acting and verifies by re-reading after: "cancelled" and
"flat" are never assumed. Every item is safe to redo, because after a hard kill Temporal may
replay an activity from an old heartbeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from decimal import Decimal
from enum import StrEnum

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.accounts import ConfigError
from activities.errors import (
    BelowMinimum,
    OrderGone,
    OutcomeUnknown,
    ReduceOnlyRejected,
    VenueError,
    VenueUnavailable,
)
from activities.heartbeat import heartbeating
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
    OpenOrder,
    Position,
    VenueSnapshot,
)

log = logging.getLogger(__name__)

MAX_FLATTEN_PASSES = 20
"""Partial and racing fills each cost a pass; past this the workflow's next round takes over."""
REQUERY_INTERVAL_S = 0.2


class NotSent(StrEnum):
    """Why a flatten pass has no accepted order for a position (the next pass re-reads)."""

    DUST = "dust"
    """Below the venue's minimum: reported, never retried."""
    REJECTED_REDUCE_ONLY = "rejected-reduce-only"
    """The venue saw nothing left to reduce."""
    OUTCOME_UNKNOWN = "outcome-unknown"
    """Timed out or failed: maybe applied, so never resent blindly."""


def client_order_id(prefix: str, symbol: str, position_side: str | None, pass_no: int) -> str:
    """Deterministic id of the order a given flatten pass sends for one position (<= 36 chars).

    Binance accepts a client id again once the earlier order is closed, so the id alone does not
    stop a duplicate: the flatten looks the id up before sending and re-reads the position.
    """
    leg = f"{symbol}/{position_side or ''}"
    digest = hashlib.sha256(leg.encode()).hexdigest()[:8]
    return f"{prefix}-{digest}-{pass_no}"


def as_application_error(error: VenueError | ConfigError, account: str) -> ApplicationError:
    """Temporal sees the domain class name and whether a retry can help; never a secret."""
    if isinstance(error, ConfigError):
        return ApplicationError(f"{account}: {error}", type="ConfigError", non_retryable=True)
    kind = type(error).__name__
    return ApplicationError(
        f"{account}: {kind}: {error}", type=kind, non_retryable=not error.retryable
    )


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
        """Arm the venue's dead-man switch on every symbol with open orders.

        If this worker dies mid-kill, the venue still cancels those orders when the timer runs
        out. With ``dead_man_seconds=0`` it disarms the given symbols instead (after a verified
        kill). Spot has no such switch: reported, not faked.
        """
        venue = await self._venue(request.account)
        if venue.is_spot:
            return HaltResult(account=request.account, supported=False)
        seconds = request.dead_man_seconds
        if seconds is None:
            seconds = venue.account.dead_man_seconds
            if seconds == 0:
                return HaltResult(account=request.account, supported=True)
        try:
            symbols = request.symbols
            if symbols is None:
                symbols = sorted({o.symbol for o in await venue.open_orders() if not o.conditional})
            await asyncio.gather(*(venue.arm_dead_man(s, seconds) for s in symbols))
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        return HaltResult(account=request.account, symbols_armed=symbols)

    # ------------------------------------------------------------------ cancel all

    @activity.defn(name="cancel_all")
    async def cancel_all(self, request: CancelAllRequest) -> CancelAllResult:
        """Cancel every open order, per symbol and concurrently, until the venue shows none."""
        venue = await self._venue(request.account)
        started = time.monotonic()
        deadline = started + request.verify_deadline_s
        progress: dict[str, object] = {"queries": 0}
        try:
            async with heartbeating(progress):
                first = await venue.open_orders()
                seen: dict[str, OpenOrder] = {o.id: o for o in first}
                remaining = first
                queries = 1
                while remaining:
                    await self._cancel_symbols(venue, remaining)
                    remaining = await venue.open_orders()
                    queries += 1
                    progress.update(queries=queries, open=len(remaining))
                    seen.update((o.id, o) for o in remaining)
                    if remaining and time.monotonic() >= deadline:
                        break
                    if remaining:
                        await asyncio.sleep(REQUERY_INTERVAL_S)
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        still_open_ids = {o.id for o in remaining}
        return CancelAllResult(
            account=request.account,
            orders_found=len(seen),
            orders_cancelled=len(set(seen) - still_open_ids),
            still_open=remaining,
            symbols=sorted({o.symbol for o in seen.values()}),
            queries=queries,
            elapsed_s=round(time.monotonic() - started, 4),
        )

    async def _cancel_symbols(self, venue: VenueSession, orders: list[OpenOrder]) -> None:
        """One cancel-all per (symbol, book), all at once; failures are judged by the re-query."""
        books = sorted({(o.symbol, o.conditional) for o in orders})
        results = await asyncio.gather(
            *(venue.cancel_all_in(symbol, conditional) for symbol, conditional in books),
            return_exceptions=True,
        )
        for (symbol, _), result in zip(books, results, strict=True):
            if isinstance(result, VenueError) and not result.retryable:
                raise result
            if isinstance(result, BaseException) and not isinstance(result, VenueError):
                raise result
            if isinstance(result, VenueError):
                # Unknown outcome or a passing failure: the re-query decides, not this answer.
                log.info("cancel-all %s %s: %s (re-querying)", venue.name, symbol, result)

    # ------------------------------------------------------------------ flatten

    @activity.defn(name="flatten")
    async def flatten(self, request: FlattenRequest) -> FlattenResult:
        """Close every position with orders that can only reduce it, until only dust is left.

        Every pass starts from freshly read positions and sends at most the live size rounded
        down to the lot step, reduce-only (or per hedge leg): a retry, a crash or a racing fill
        can leave a position smaller, never flipped.
        """
        venue = await self._venue(request.account)
        started = time.monotonic()
        info = activity.info()
        # After a retry, earlier attempts may have used this prefix's ids: look them up first.
        resumed = info.attempt > 1
        progress: dict[str, object] = {"pass": 0}
        orders: list[FlattenOrder] = []
        venue_said_dust: set[tuple[str, str | None]] = set()
        pass_no: dict[tuple[str, str | None], int] = {}
        before: list[Position] | None = None
        passes = 0
        try:
            async with heartbeating(progress):
                while passes < MAX_FLATTEN_PASSES:
                    positions = await venue.positions()
                    if before is None:
                        before = positions
                    work = [
                        (p, q)
                        for p in positions
                        if (p.symbol, p.position_side) not in venue_said_dust
                        and (q := self._closable(venue, p)) is not None
                    ]
                    if not work:
                        break
                    passes += 1
                    progress["pass"] = passes
                    sent = await asyncio.gather(
                        *(
                            self._close_one(venue, request.client_id_prefix, p, q, pass_no, resumed)
                            for p, q in work
                        )
                    )
                    for (position, _), outcome in zip(work, sent, strict=True):
                        if isinstance(outcome, FlattenOrder):
                            orders.append(outcome)
                        elif outcome is NotSent.DUST:
                            venue_said_dust.add((position.symbol, position.position_side))
                    if not any(isinstance(o, FlattenOrder) for o in sent):
                        await asyncio.sleep(REQUERY_INTERVAL_S)  # let an unknown outcome settle
                after = await venue.positions() if passes else (before or [])
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        return FlattenResult(
            account=request.account,
            positions_before=before or [],
            positions_after=after,
            dust=[
                p
                for p in after
                if (p.symbol, p.position_side) in venue_said_dust
                or self._closable(venue, p) is None
            ],
            orders=orders,
            passes=passes,
            elapsed_s=round(time.monotonic() - started, 4),
        )

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

    async def _close_one(
        self,
        venue: VenueSession,
        prefix: str,
        position: Position,
        quantity: Decimal,
        pass_no: dict[tuple[str, str | None], int],
        resumed: bool,
    ) -> FlattenOrder | NotSent:
        """Send (at most) one closing order for one position; returns the order, or why not."""
        key = (position.symbol, position.position_side)
        number = pass_no.get(key, 0)
        cid = client_order_id(prefix, position.symbol, position.position_side, number)
        if resumed:
            # Skip ids an earlier attempt already used: their fills are in the positions we read.
            while await venue.order_by_client_id(position.symbol, cid) is not None:
                number += 1
                cid = client_order_id(prefix, position.symbol, position.position_side, number)
        pass_no[key] = number + 1
        try:
            return await venue.close_position(position, quantity, cid)
        except BelowMinimum:
            return NotSent.DUST
        except (ReduceOnlyRejected, OrderGone):
            return NotSent.REJECTED_REDUCE_ONLY  # most likely flat already: re-read
        except (OutcomeUnknown, VenueUnavailable) as e:
            # Maybe applied: never resend this order; the next pass re-reads and decides.
            log.info("flatten %s %s: %s (re-reading)", venue.name, cid, e)
            return NotSent.OUTCOME_UNKNOWN

    # ------------------------------------------------------------------ look

    @activity.defn(name="snapshot_venue_state")
    async def snapshot_venue_state(self, request: AccountRequest) -> VenueSnapshot:
        """Open orders and positions as the venue reports them now (for verify and reports)."""
        venue = await self._venue(request.account)
        try:
            orders, positions = await asyncio.gather(venue.open_orders(), venue.positions())
        except VenueError as e:
            raise as_application_error(e, request.account) from None
        return VenueSnapshot(
            account=request.account,
            taken_at=utcnow(),
            open_orders=orders,
            positions=[p for p in positions if self._closable(venue, p) is not None],
            dust=[p for p in positions if self._closable(venue, p) is None],
        )
