"""The flatten loop: reduce-only orders per position leg, each leg on its own.

Every pass starts from freshly read positions and sends at most the live size rounded down to
the lot step, reduce-only (or per hedge leg): a retry, a crash or a racing fill can leave a
position smaller, never flipped. One failed lookup or order costs that leg a retry on the next
pass, never the attempt; an order whose outcome is unknown is never resent: the next pass
re-reads the position and sends a new order (new client id) for what is really left.

A retried attempt first finds, by their deterministic client ids, the orders earlier attempts of
this round sent (the legs and id counts they heartbeated, plus a short look-ahead for a beat
that never arrived): their fills are in the positions read, and the report lists them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from temporalio import activity

from activities.errors import (
    AuthFailed,
    BelowMinimum,
    OrderGone,
    OrderRejected,
    OutcomeUnknown,
    ReduceOnlyRejected,
    VenueError,
    VenueUnavailable,
)
from activities.venues import VenueSession
from workflows.shared import FlattenOrder, Position

log = logging.getLogger(__name__)

MAX_FLATTEN_PASSES = 20
"""Partial and racing fills each cost a pass; past this the workflow's next round takes over."""
MAX_READ_FAILURES = 20
"""Failed position reads in a row after which the attempt gives up (Temporal retries it)."""
REQUERY_INTERVAL_S = 0.2
LOOKAHEAD = 2
"""Ids looked up past the last one an earlier attempt is known to have used (its last heartbeat
may not have reached the server)."""

Leg = tuple[str, str | None]


class NotSent(StrEnum):
    """Why a flatten pass has no accepted order for a leg (the next pass re-reads)."""

    DUST = "dust"
    """Below the venue's minimum: reported, never retried."""
    REJECTED_REDUCE_ONLY = "rejected-reduce-only"
    """The venue saw nothing left to reduce."""
    OUTCOME_UNKNOWN = "outcome-unknown"
    """Timed out or failed: maybe applied, so never resent blindly."""
    REFUSED = "refused"
    """The venue refused this order as invalid: not retried in this attempt."""
    LOOKUP_FAILED = "lookup-failed"
    """Earlier attempts' ids could not all be looked up: nothing sent, retried next pass."""


def client_order_id(prefix: str, symbol: str, position_side: str | None, pass_no: int) -> str:
    """Deterministic id of the order a given flatten pass sends for one position (<= 36 chars).

    Binance accepts a client id again once the earlier order is closed, so the id alone does not
    stop a duplicate: the flatten looks the id up before sending and re-reads the position.
    """
    leg = f"{symbol}/{position_side or ''}"
    digest = hashlib.sha256(leg.encode()).hexdigest()[:8]
    return f"{prefix}-{digest}-{pass_no}"


def leg_name(leg: Leg) -> str:
    return f"{leg[0]}/{leg[1] or 'BOTH'}"


def _heartbeat_key(leg: Leg) -> str:
    return f"{leg[0]}|{leg[1] or ''}"


def earlier_legs(details: Sequence[Any]) -> dict[Leg, int]:
    """Legs and id counts an earlier attempt heartbeated (``{"legs": {"SYM|SIDE": n}}``)."""
    legs: dict[Leg, int] = {}
    for detail in details:
        if not isinstance(detail, Mapping) or not isinstance(detail.get("legs"), Mapping):
            continue
        for key, count in detail["legs"].items():
            symbol, _, side = str(key).partition("|")
            if isinstance(count, int):
                legs[(symbol, side or None)] = max(legs.get((symbol, side or None), 0), count)
    return legs


@dataclass
class LegState:
    next_no: int = 0
    known: int = 0
    """Ids an earlier attempt is known (from its heartbeat) to have used."""
    resolved: bool = True
    """Earlier attempts' ids looked up (always true on a first attempt)."""
    checked: dict[int, bool] = field(default_factory=dict)
    """Id number -> found on the venue (resumed attempts only)."""
    stopped: NotSent | None = None
    """Dust or refused: not retried in this attempt."""
    failure: str | None = None


@dataclass
class FlattenRun:
    venue: VenueSession
    prefix: str
    resumed: bool
    progress: dict[str, object]
    legs: dict[Leg, LegState] = field(default_factory=dict)
    orders: list[FlattenOrder] = field(default_factory=list)
    recovered: dict[str, FlattenOrder] = field(default_factory=dict)
    unknown: list[tuple[Leg, str]] = field(default_factory=list)
    """Orders whose outcome is unknown (client id): looked up at the end for the report."""
    read_failure: str | None = None

    def leg(self, leg: Leg) -> LegState:
        if leg not in self.legs:
            self.legs[leg] = LegState(resolved=not self.resumed)
        return self.legs[leg]

    def remember(self, earlier: dict[Leg, int]) -> None:
        for leg, count in earlier.items():
            state = self.leg(leg)
            state.known = max(state.known, count)

    def heartbeat_legs(self) -> dict[str, int]:
        """Every leg known so far with the ids it has used (0: none yet, but it may)."""
        return {_heartbeat_key(k): max(v.next_no, v.known) for k, v in self.legs.items()}

    def beat(self) -> None:
        """Heartbeat the ids used so far at once: a retry after a crash starts from them."""
        self.progress["legs"] = self.heartbeat_legs()
        activity.heartbeat(dict(self.progress))

    # ------------------------------------------------------------------ earlier attempts

    async def resolve(self, leg: Leg) -> bool:
        """Look up this leg's ids of earlier attempts (concurrently); False if some lookup
        failed (the ones that answered are kept, the rest retried on the next pass)."""
        state = self.leg(leg)
        while not state.resolved:
            found = [n for n, hit in state.checked.items() if hit]
            used = max(state.known, max(found, default=-1) + 1)
            todo = [n for n in range(used + LOOKAHEAD) if n not in state.checked]
            if not todo:
                state.resolved = True
                state.next_no = max(state.next_no, used)
                break
            cids = [client_order_id(self.prefix, leg[0], leg[1], n) for n in todo]
            answers = await asyncio.gather(
                *(self.venue.order_by_client_id(leg[0], cid) for cid in cids),
                return_exceptions=True,
            )
            failed: BaseException | None = None
            for n, cid, answer in zip(todo, cids, answers, strict=True):
                if isinstance(answer, AuthFailed) or not isinstance(
                    answer, FlattenOrder | VenueError | None
                ):
                    raise answer
                if isinstance(answer, VenueError):
                    failed = answer
                    continue
                state.checked[n] = answer is not None
                if answer is not None:
                    self.recovered[cid] = answer
            if failed is not None:
                state.failure = f"looking up earlier orders: {failed}"
                return False
        return True

    # ------------------------------------------------------------------ one leg, one pass

    async def close_one(self, position: Position, quantity: Decimal) -> FlattenOrder | NotSent:
        leg = (position.symbol, position.position_side)
        state = self.leg(leg)
        if not await self.resolve(leg):
            return NotSent.LOOKUP_FAILED
        cid = client_order_id(self.prefix, leg[0], leg[1], state.next_no)
        state.next_no += 1
        self.beat()
        try:
            order = await self.venue.close_position(position, quantity, cid)
        except BelowMinimum:
            state.stopped = NotSent.DUST
            return NotSent.DUST
        except (ReduceOnlyRejected, OrderGone):
            return NotSent.REJECTED_REDUCE_ONLY  # most likely flat already: re-read
        except (OutcomeUnknown, VenueUnavailable) as e:
            # Maybe applied: never resend this order; the next pass re-reads and decides.
            log.info("flatten %s %s: %s (re-reading)", self.venue.name, cid, e)
            state.failure = f"order {cid}: {e}"
            self.unknown.append((leg, cid))
            return NotSent.OUTCOME_UNKNOWN
        except AuthFailed:
            raise
        except OrderRejected as e:
            state.failure = f"order {cid} refused: {e}"
            state.stopped = NotSent.REFUSED
            return NotSent.REFUSED
        state.failure = None
        return order

    async def find_unknown(self) -> None:
        """Orders whose answer never came: the report lists those the venue accepted."""
        if not self.unknown:
            return
        answers = await asyncio.gather(
            *(self.venue.order_by_client_id(leg[0], cid) for leg, cid in self.unknown),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, FlattenOrder):
                self.orders.append(answer)

    def failures(self, left: list[Position], passes_spent: bool) -> list[str]:
        """Failures that still matter: legs with a position left (also those the passes ran out
        on), and earlier orders that could not be looked up (the audit trail is incomplete)."""
        open_legs = {(p.symbol, p.position_side) for p in left}
        out = []
        for leg, state in sorted(self.legs.items(), key=lambda kv: leg_name(kv[0])):
            if state.failure and (leg in open_legs or not state.resolved):
                out.append(f"{leg_name(leg)}: {state.failure}")
            elif passes_spent and leg in open_legs and state.stopped is None:
                out.append(f"{leg_name(leg)}: still open after {MAX_FLATTEN_PASSES} passes")
        return out
