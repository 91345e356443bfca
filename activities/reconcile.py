"""Reconcile the strategy's database with the venue before it may trade again: the venue wins.

After a restore the database holds the snapshot's view of the world (positions and open orders
of that time) while the venue was cancelled and flattened since. A strategy that trusted those
rows would trade against positions it does not have. So, with the strategy still HALTED:

1. read the venue (every account of the runbook): open orders and positions;
2. correct the database to it: position rows get the venue's net size per exchange symbol,
   orders the database thinks open but the venue does not are closed, orders open on the venue
   but unknown (or closed) in the database are recorded as open;
3. read the venue *again* and the database, and report whatever still differs.

The tables are the strategy-database contract whose reference implementation is
``sandbox/strategy/state.py`` (``positions``, ``orders``). Positions are derivative positions
netted over hedge legs and accounts; spot balances are not positions in that contract and are
left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal

import psycopg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import VenueError
from activities.heartbeat import heartbeating
from activities.kill import as_application_error
from activities.trading_state import db_target
from activities.venues import VenueGateway
from sandbox.strategy.state import Database, utcnow
from workflows.rollback_models import Correction, ReconcileRequest, ReconcileResult
from workflows.shared import PositionKind

OPEN_STATUSES = ("PENDING", "NEW", "PARTIALLY_FILLED")
"""Statuses the strategy treats as "may still be on the book"."""
CLOSED_BY_RECONCILE = "CANCELED"


class VenueView:
    """What the venue says, keyed like the database: exchange symbols and client order ids."""

    def __init__(self) -> None:
        self.positions: dict[str, Decimal] = defaultdict(Decimal)
        self.marks: dict[str, Decimal] = {}
        self.open_orders: dict[str, tuple[str, str, str, Decimal, Decimal | None]] = {}
        """client id -> (order id, exchange symbol, side, amount, price)."""
        self.anonymous_orders: list[str] = []
        """Open orders without a client id: nothing in the database can match them."""


class ReconcileActivities:
    def __init__(self, gateway: VenueGateway) -> None:
        self.gateway = gateway

    @activity.defn(name="reconcile_state_db")
    async def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        progress: dict[str, object] = {"phase": "reading the venue"}
        async with heartbeating(progress):
            venue = await self._read_venue(request.accounts)
            progress["phase"] = "correcting the database"
            database = Database(db_target(request.database))
            corrections = await asyncio.to_thread(_correct, database, venue)
            progress["phase"] = "checking"
            again = await self._read_venue(request.accounts)  # verified, never assumed
            positions, open_orders = await asyncio.to_thread(_read_database, database)
        for c in corrections:
            activity.logger.info(
                "reconcile %s %s %s: database %s, venue %s (%s)",
                request.database.label,
                c.table,
                c.key,
                c.database,
                c.venue,
                request.why,
            )
        return ReconcileResult(
            corrections=corrections,
            positions={s: str(q) for s, q in sorted(positions.items()) if q != 0},
            open_orders=sorted(open_orders),
            disagreements=_differences(again, positions, open_orders),
        )

    async def _read_venue(self, accounts: list[str]) -> VenueView:
        view = VenueView()
        for account in accounts:
            try:
                venue = await self.gateway.session(account)
                orders, positions = await asyncio.gather(venue.open_orders(), venue.positions())
            except VenueError as e:
                raise as_application_error(e, account) from None
            for p in positions:
                if p.kind is not PositionKind.DERIVATIVE:
                    continue
                symbol = venue.exchange_symbol(p.symbol)
                view.positions[symbol] += p.quantity
                if p.mark_price is not None:
                    view.marks[symbol] = p.mark_price
            for o in orders:
                if not o.client_order_id:
                    view.anonymous_orders.append(f"{account}:{o.id}")
                    continue
                view.open_orders[o.client_order_id] = (
                    o.id,
                    venue.exchange_symbol(o.symbol),
                    o.side,
                    o.amount,
                    o.price,
                )
        return view


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """A database without the strategy's tables is a wrong runbook (final); an unreachable one
    is retried within the workflow's policy."""
    try:
        yield
    except (sqlite3.OperationalError, psycopg.errors.UndefinedTable) as e:
        if isinstance(e, psycopg.errors.UndefinedTable) or "no such table" in str(e):
            raise ApplicationError(
                f"not a strategy database (no positions/orders tables): {e}",
                type="BadDatabase",
                non_retryable=True,
            ) from None
        raise ApplicationError(f"state database: {e}", type="DatabaseUnavailable") from None
    except (OSError, psycopg.OperationalError) as e:
        raise ApplicationError(f"state database: {e}", type="DatabaseUnavailable") from None


def _read_database(database: Database) -> tuple[dict[str, Decimal], set[str]]:
    with _database_errors(), database.transaction() as cur:
        positions = {
            s: Decimal(q) for s, q in cur.execute("SELECT symbol, qty FROM positions").fetchall()
        }
        marks = ", ".join("?" for _ in OPEN_STATUSES)
        rows = cur.execute(
            f"SELECT client_order_id FROM orders WHERE status IN ({marks})", OPEN_STATUSES
        ).fetchall()
    return positions, {r[0] for r in rows}


def _correct(database: Database, venue: VenueView) -> list[Correction]:
    """One transaction: the database ends up saying what the venue said."""
    corrections: list[Correction] = []
    now = utcnow().isoformat()
    with _database_errors(), database.transaction() as cur:
        held = {
            s: Decimal(q) for s, q in cur.execute("SELECT symbol, qty FROM positions").fetchall()
        }
        for symbol in sorted(set(held) | set(venue.positions)):
            ours, theirs = held.get(symbol, Decimal(0)), venue.positions.get(symbol, Decimal(0))
            if ours == theirs:
                continue
            corrections.append(
                Correction(table="positions", key=symbol, database=str(ours), venue=str(theirs))
            )
            mark = str(venue.marks.get(symbol, Decimal(0)))
            cur.execute(
                "INSERT INTO positions (symbol, qty, entry_price, mark_price, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (symbol) DO UPDATE SET qty = excluded.qty, "
                "mark_price = excluded.mark_price, updated_at = excluded.updated_at",
                (symbol, str(theirs), mark, mark, now),
            )
        rows = cur.execute("SELECT client_order_id, status FROM orders").fetchall()
        status = {r[0]: r[1] for r in rows}
        for cid, was in sorted(status.items()):
            if was in OPEN_STATUSES and cid not in venue.open_orders:
                corrections.append(
                    Correction(table="orders", key=cid, database=was, venue="not open")
                )
                cur.execute(
                    "UPDATE orders SET status = ?, updated_at = ? WHERE client_order_id = ?",
                    (CLOSED_BY_RECONCILE, now, cid),
                )
        for cid, (order_id, symbol, side, amount, price) in sorted(venue.open_orders.items()):
            was = status.get(cid)
            if was in OPEN_STATUSES:
                continue
            corrections.append(
                Correction(table="orders", key=cid, database=was or "unknown", venue="open")
            )
            cur.execute(
                "INSERT INTO orders (client_order_id, order_id, symbol, side, qty, price, "
                "reduce_only, status, filled, version, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 0, 'NEW', '0', 'reconciled', ?, ?) "
                "ON CONFLICT (client_order_id) DO UPDATE SET status = 'NEW', "
                "order_id = excluded.order_id, updated_at = excluded.updated_at",
                (cid, order_id, symbol, side, str(amount), str(price or ""), now, now),
            )
    return corrections


def _differences(
    venue: VenueView, positions: dict[str, Decimal], open_orders: set[str]
) -> list[str]:
    found = []
    for symbol in sorted(set(positions) | set(venue.positions)):
        ours, theirs = positions.get(symbol, Decimal(0)), venue.positions.get(symbol, Decimal(0))
        if ours != theirs:
            found.append(f"position {symbol}: database {ours}, venue {theirs}")
    for cid in sorted(open_orders ^ set(venue.open_orders)):
        where = "database" if cid in open_orders else "venue"
        found.append(f"order {cid}: open only in the {where}")
    found += [f"order {o}: open on the venue without a client id" for o in venue.anonymous_orders]
    return found
