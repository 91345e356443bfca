"""The strategy process: a quoting loop on ccxt binanceusdm, its database, /healthz and /metrics.

Every loop re-reads the trading state, its trading lease and its share of capital from the
database, reads mark prices from the venue's public endpoint, reconciles its orders and positions
with the venue, then acts: ACTIVE quotes both sides within the position caps; REDUCING cancels
entries and only sends reduce-only orders; HALTED cancels what rests and sends nothing.

Two versions may run side by side during a deployment; only the holder of the account's lease
(``lease.py``) sends, and only intents recorded under the epoch it read. The other one is a shadow:
it reads the venue and decides, logs its decisions, and neither sends nor cancels nor writes the
venue's view (the holder records orders, fills and positions). Each version acknowledges the epoch
it read once its sends of the loop are done. No lease row: the single running version sends.

SIGTERM (how supervisord stops a version) ends the loop: a read in flight is dropped, orders being
sent are sent and recorded first, nothing new starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import ccxt.async_support as ccxt
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from activities.venue_routing import loopback_session
from sandbox.strategy import lease as contract
from sandbox.strategy.allocation import capital_of
from sandbox.strategy.config import Fault, Release, StrategyConfig
from sandbox.strategy.decisions import init_decisions, record_decisions
from sandbox.strategy.state import (
    Database,
    TradingState,
    fold_cash,
    get_trading_state,
    is_db_error,
    missing_table,
    utcnow,
)

log = logging.getLogger("sandbox.strategy")
logging.getLogger("ccxt").setLevel(logging.WARNING)  # ccxt logs the API key at DEBUG


class Metrics:
    def __init__(self, release: Release) -> None:
        self.registry = r = CollectorRegistry()
        self.orders = Counter(
            "strategy_orders_placed", "Orders the venue accepted", ["symbol"], registry=r
        )
        self.fills = Counter("strategy_fills", "Fill events seen", ["symbol"], registry=r)
        self.fill_rate = Gauge("strategy_fill_rate", "Filled orders per accepted order", registry=r)
        self.rejects = Counter(
            "strategy_order_rejects", "Orders the venue rejected", ["reason"], registry=r
        )
        self.latency = Histogram(
            "strategy_order_latency_seconds",
            "Decision start to venue acknowledgement",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.decision = Histogram(
            "strategy_decision_seconds",
            "Deciding one order: the decision and the model's think time, the venue excluded",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.pnl = Gauge("strategy_pnl_usdt", "Realised plus unrealised P&L", registry=r)
        self.feed_staleness = Gauge(
            "strategy_feed_staleness_seconds", "Age of the last price", registry=r
        )
        self.errors = Counter("strategy_errors", "Loop errors", ["kind"], registry=r)
        self.loops = Counter("strategy_loops", "Finished loops", registry=r)
        self.state = Gauge(
            "strategy_trading_state", "1 for the state in force", ["state"], registry=r
        )
        info = Gauge(
            "strategy_release_info", "The running release", ["version", "fault"], registry=r
        )
        info.labels(release.version, release.fault.value).set(1)


T = TypeVar("T")
MAX_BACK_OFF_S = 300.0
CID_MAX = 36
"""Binance's limit on ``newClientOrderId`` (allowed: letters, digits and ``.:/_-``)."""
VERSION_TAG_MAX = 10


def client_order_id(
    prefix: str, version: str, run_id: int, symbol: str, side: str, loop_no: int
) -> str:
    """``<prefix>-<version tag>-<run>-<symbol>-<B|S>-<loop>``: the venue's own records tell which
    version placed an order. Too long for the venue, everything after the tag is hashed."""
    tag = version_tag(version)
    cid = f"{prefix}-{tag}-{run_id}-{symbol}-{side[0].upper()}-{loop_no}"
    if len(cid) > CID_MAX:
        digest = hashlib.sha256(cid.encode()).hexdigest()
        cid = f"{prefix}-{tag}-{digest}"[:CID_MAX]
    return cid


def version_tag(version: str) -> str:
    """The version as it appears in client order ids (``-`` and ``+`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._]", "_", version)[:VERSION_TAG_MAX]


@dataclass(frozen=True)
class Mandate:
    """What this version may do in one loop, as its database says at the loop's start."""

    state: TradingState
    lease: contract.Lease | None
    """The lease it sends under; None: a shadow (decides, sends nothing)."""
    epoch: int
    """The account's lease epoch it saw, acknowledged once its sends of the loop are done."""
    capital: Decimal
    """Share of ``order_notional`` and ``max_position_notional`` it trades."""

    @property
    def sending(self) -> bool:
        return self.lease is not None

    @property
    def effective(self) -> TradingState:
        """The trading state, made REDUCING by a lease being handed over (its holder may only
        shrink positions until it is fenced)."""
        handing_over = self.lease is not None and self.lease.mode is contract.LeaseMode.REDUCING
        if self.state is TradingState.ACTIVE and handing_over:
            return TradingState.REDUCING
        return self.state


NO_MANDATE = Mandate(TradingState.HALTED, None, 0, Decimal(0))
"""Before the database was first read: send nothing, cancel nothing."""


async def off_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a daemon thread, awaited. Unlike ``asyncio.to_thread``, a stopping process
    does not wait for a call it no longer needs: each database call here is one transaction, so
    one left behind at exit commits or rolls back whole."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(error: BaseException | None, value: Any) -> None:
        if done.done():
            return  # the awaiting task was cancelled
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def work() -> None:
        try:
            outcome: tuple[BaseException | None, Any] = (None, fn(*args))
        except BaseException as e:
            outcome = (e, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name=f"db-{fn.__name__}", daemon=True).start()
    return await done


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"environment variable {name} is not set")
    return value


Book = dict[str, Decimal]
"""Net position per exchange symbol."""


class Strategy:
    """One process of one release.

    Request weight per loop (Binance USDⓈ-M): 1 for every symbol's mark price (one
    ``premiumIndex`` request), 1 per quoted symbol for its open orders, 1 per order placed or
    cancelled, 1 per order that left the book without us cancelling it (its fills), and
    ``positionRisk`` (5) only every ``positions_refresh_s``: in between, the fills the strategy
    records move its book. A cancel's answer already is the order's final state.
    """

    def __init__(self, config: StrategyConfig, release: Release) -> None:
        self.config = config
        self.release = release
        self.metrics = Metrics(release)
        self.db = Database(config.db)
        self.account = config.lease_account
        self.state = TradingState.ACTIVE
        self.mandate = NO_MANDATE
        self.last_loop: float | None = None
        self.last_loop_at: str | None = None
        self.last_feed: float | None = None
        self.db_ok = False
        self.run_id = 0
        self.loop_no = 0
        self.accepted = 0
        self.filled_orders = 0
        self.prices: dict[str, Decimal] = {}
        self.exchange: Any = None
        self.positions: Book = {}
        self._positions_at: float | None = None
        """When positions were last read from the venue (None: read them next loop)."""
        self._positions_state: TradingState | None = None
        self._open: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._acting = False
        """True while orders are being sent and recorded: a stop waits for that to finish."""
        self._quiet_until = 0.0
        """Rate-limited by the venue: no request before this (monotonic) time."""
        self._started = time.monotonic()

    @property
    def fault(self) -> Fault:
        """The release's fault, once ``fault_after_s`` have passed since the process started."""
        if time.monotonic() - self._started < self.config.fault_after_s:
            return Fault.NONE
        return self.release.fault

    # ------------------------------------------------------------------ lifecycle

    def stop(self, why: str = "SIGTERM") -> None:
        """Stop after the step in flight: reads are abandoned, sending and recording orders is
        finished first, and no new order starts."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        log.info("stopping (%s)%s", why, ": finishing the orders in flight" if self._acting else "")
        if not self._acting and self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        try:
            await self._run()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        log.info("stopped")

    async def _run(self) -> None:
        cfg = self.config
        session: aiohttp.ClientSession | None = None
        runner: web.AppRunner | None = None
        try:
            await off_thread(self._init_schema)
            self.run_id = await off_thread(self._record_run)
            session = loopback_session(cfg.exchange_address, cfg.ca_file)
            self.exchange = ccxt.binanceusdm(
                {
                    "apiKey": _env(cfg.api_key_env),
                    "secret": _env(cfg.secret_env),
                    "session": session,
                    "enableRateLimit": False,
                    "timeout": 5000,
                    # ccxt sleeps this long in close() for the TLS connections of a session it
                    # owns; this one is ours, closed right after: don't spend 250 ms of a stop.
                    "timeout_on_exit": 0,
                    "options": {
                        "fetchCurrencies": False,
                        "fetchMargins": False,
                        "fetchOpenOrders": {"warnWithoutSymbol": False},
                    },
                }
            )
            runner = await self._serve()
            await self.exchange.load_markets()
            while not self._stopping:
                t0 = time.monotonic()
                await self.loop_once()
                if not self._stopping:
                    await asyncio.sleep(max(0.0, cfg.loop_interval_s - (time.monotonic() - t0)))
        finally:
            await self._close(session, runner)

    async def _close(
        self, session: aiohttp.ClientSession | None, runner: web.AppRunner | None
    ) -> None:
        if self.exchange is not None:
            await self.exchange.close()
        if session is not None:
            await session.close()
        if runner is not None:
            await runner.cleanup()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (one transaction) off the loop. A database restored under the running
        process from a snapshot older than one of its tables gets the schema, and the call is
        retried once."""
        try:
            return await off_thread(fn, *args)
        except Exception as e:
            if not missing_table(e):
                raise
            log.warning("the database lacks a table (%s): creating the schema", e)
            await off_thread(self._init_schema)
            return await off_thread(fn, *args)

    def _init_schema(self) -> None:
        """The strategy's own tables and the deployment contract's (lease, decision log)."""
        self.db.init_schema()
        contract.init_lease_schema(self.db)
        init_decisions(self.db)

    def _record_run(self) -> int:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO runs (version, pid, started_at) VALUES (?, ?, ?)",
                (self.release.version, os.getpid(), utcnow().isoformat()),
            )
            row = cur.execute("SELECT MAX(id) FROM runs").fetchone()
        return int(row[0]) if row and row[0] is not None else 1

    # ------------------------------------------------------------------ one loop

    async def loop_once(self) -> None:
        m = self.metrics
        before = self.mandate
        try:
            self.mandate, self.db_ok = await self._db(self._read_mandate), True
        except Exception as e:
            # Cannot read the database: behave as HALTED until it answers again (the holder
            # cancels what rests, a shadow still touches nothing).
            self.mandate = Mandate(TradingState.HALTED, before.lease, before.epoch, before.capital)
            self.db_ok = False
            m.errors.labels("db").inc()
            log.warning("database unreachable: %s", type(e).__name__)
        self.state = self.mandate.state
        if self.mandate.sending != before.sending:
            self._positions_at = None  # a new role: read the venue's positions afresh
            log.info(
                "%s on %s (epoch %d)",
                "sending" if self.mandate.sending else "shadow: sending nothing",
                self.account,
                self.mandate.epoch,
            )
        for s in TradingState:
            m.state.labels(s.value).set(1 if s == self.state else 0)
        if time.monotonic() >= self._quiet_until:
            await self._trade()
        if self.db_ok:
            # Every send of this loop has ended: nothing is in flight under an older epoch.
            await self._acknowledge(self.mandate.epoch)
        self.loop_no += 1
        self.last_loop = time.monotonic()
        self.last_loop_at = utcnow().isoformat()
        m.loops.inc()

    def _read_mandate(self) -> Mandate:
        state = get_trading_state(self.db).state
        version = self.release.version
        mine = contract.may_send(self.db, self.account, version)
        if mine is not None:
            epoch = mine.epoch
        else:
            current = contract.read_lease(self.db, self.account)
            epoch = current.epoch if current is not None else 0
        capital = Decimal(repr(capital_of(self.db, version)))
        return Mandate(state, mine, epoch, capital)

    async def _acknowledge(self, epoch: int) -> None:
        try:
            await self._db(contract.acknowledge, self.db, self.account, self.release.version, epoch)
        except Exception as e:
            if not is_db_error(e):
                raise
            self.db_ok = False
            self.metrics.errors.labels("db").inc()
            log.warning("database error acknowledging epoch %d: %s", epoch, type(e).__name__)

    async def _trade(self) -> None:
        m = self.metrics
        await self._read_prices()
        if time.monotonic() < self._quiet_until:
            return
        feed_fresh = (
            self.last_feed is not None
            and time.monotonic() - self.last_feed <= self.config.feed_stale_s
        )
        try:
            await self._reconcile()
            if feed_fresh and not self._stopping:
                self._acting = True
                try:
                    await self._act()
                finally:
                    self._acting = False
        except ccxt.BaseError as e:
            m.errors.labels("venue").inc()
            self._positions_at = None  # whatever happened, read the venue's positions again
            log.warning("venue error: %s: %s", type(e).__name__, e)
            self._back_off(e)
        except Exception as e:
            if not is_db_error(e):
                raise
            # The next loop reads the venue and the database again; nothing is lost meanwhile.
            self.db_ok = False
            self._positions_at = None
            m.errors.labels("db").inc()
            log.warning("database error: %s: %s", type(e).__name__, e)

    async def _read_prices(self) -> None:
        """Every symbol's mark price from the venue's public ``premiumIndex`` (weight 1)."""
        try:
            tickers = await self.exchange.fetch_mark_prices()
            self.prices = {
                t["info"]["symbol"]: Decimal(t["info"]["markPrice"]) for t in tickers.values()
            }
            self.last_feed = time.monotonic()
        except Exception as e:
            self.metrics.errors.labels("feed").inc()
            log.warning("price feed failed: %s", type(e).__name__)
            self._back_off(e)

    def _back_off(self, e: Exception) -> None:
        """429/418: the weight budget is per IP, shared with the kill switch on this host, and
        requests sent while limited get the IP banned (418) for everyone. Send nothing until the
        venue's Retry-After (else the minute window's end)."""
        if not isinstance(e, ccxt.DDoSProtection):
            return
        headers = getattr(self.exchange, "last_response_headers", None) or {}
        retry = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
        try:
            wait = float(retry or "")
        except (TypeError, ValueError):
            wait = 60 - time.time() % 60
        wait = min(max(wait, 1.0), MAX_BACK_OFF_S)
        self._quiet_until = max(self._quiet_until, time.monotonic() + wait)
        log.warning("rate-limited by the venue: no request for %.0f s", wait)

    def _positions_due(self) -> bool:
        return (
            self._positions_at is None
            or self.state != self._positions_state
            or time.monotonic() - self._positions_at >= self.config.positions_refresh_s
        )

    async def _reconcile(self) -> None:
        """Read open orders (and positions when due); record fills, positions and P&L. A shadow
        only reads: the holder of the lease records the venue's view."""
        ex = self.exchange
        symbols = [self._ccxt(s) for s in self.config.symbols]
        open_lists = await asyncio.gather(*(ex.fetch_open_orders(s) for s in symbols))
        open_by_cid = {o["clientOrderId"]: o for lst in open_lists for o in lst}
        if not self.mandate.sending:
            if self._positions_due():
                raw = await ex.fetch_positions(symbols)
                self._positions_at, self._positions_state = time.monotonic(), self.state
                self.positions = self._venue_book(raw)[0]
            self._open = list(open_by_cid.values())
            return
        known = await self._db(self._known_open)
        gone = [(cid, oid, sym) for cid, (oid, sym) in known.items() if cid not in open_by_cid]
        finals = await asyncio.gather(*(self._final_state(oid, sym) for _, oid, sym in gone))
        raw_positions = None
        if self._positions_due():
            # Read after the orders: every fill those showed is in these positions already.
            raw_positions = await ex.fetch_positions(symbols)
            self._positions_at, self._positions_state = time.monotonic(), self.state
        updates = {**open_by_cid, **{cid: o for (cid, _, _), o in zip(gone, finals, strict=True)}}
        self.positions = await self._db(self._store_reconcile, updates, raw_positions)
        self._open = list(open_by_cid.values())

    async def _final_state(self, order_id: str, symbol: str) -> dict[str, Any] | None:
        """An order that left the book without us cancelling it: its fills (None: the venue no
        longer knows it)."""
        try:
            order: dict[str, Any] = await self.exchange.fetch_order(order_id, self._ccxt(symbol))
        except ccxt.OrderNotFound:
            return None
        return order

    def _known_open(self) -> dict[str, tuple[str, str]]:
        with self.db.transaction() as cur:
            rows = cur.execute(
                "SELECT client_order_id, order_id, symbol FROM orders "
                "WHERE status IN ('NEW', 'PARTIALLY_FILLED') AND order_id IS NOT NULL"
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def _record_orders(
        self, cur: Any, updates: dict[str, dict[str, Any] | None], now: str
    ) -> list[tuple[str, str, Decimal]]:
        """Store the venue's view of our orders; returns the new fills (symbol, side, qty)."""
        fills: list[tuple[str, str, Decimal]] = []
        for cid, o in updates.items():
            row = cur.execute(
                "SELECT filled, symbol, side FROM orders WHERE client_order_id = ?", (cid,)
            ).fetchone()
            if row is None:
                continue  # not ours (or placed by an earlier database)
            if o is None:
                cur.execute(
                    "UPDATE orders SET status = 'NOT_FOUND', updated_at = ? "
                    "WHERE client_order_id = ?",
                    (now, cid),
                )
                log.warning("order %s: the venue no longer knows it", cid)
                continue
            filled = Decimal(str(o.get("filled") or 0))
            delta = filled - Decimal(row[0])
            status = str(o["info"].get("status") or "NEW")
            if delta > 0:
                price = Decimal(str(o.get("average") or o.get("price") or 0))
                cur.execute(
                    "INSERT INTO fills (client_order_id, symbol, side, qty, price, at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (cid, row[1], row[2], str(delta), str(price), now),
                )
                fills.append((row[1], row[2], delta))
                self.metrics.fills.labels(row[1]).inc()
                if status == "FILLED":
                    self.filled_orders += 1
            # The order id too: an order sent whose acknowledgement was never recorded (the
            # process died in between) is PENDING without one until the venue shows it.
            cur.execute(
                "UPDATE orders SET filled = ?, status = ?, order_id = COALESCE(order_id, ?), "
                "updated_at = ? WHERE client_order_id = ?",
                (str(filled), status, str(o["id"]) if o.get("id") else None, now, cid),
            )
        return fills

    def _store_reconcile(
        self, updates: dict[str, dict[str, Any] | None], raw_positions: list[dict[str, Any]] | None
    ) -> Book:
        """One transaction: orders, fills, positions and P&L; returns the new book."""
        now = utcnow().isoformat()
        with self.db.transaction() as cur:
            fills = self._record_orders(cur, updates, now)
            venue: dict[str, dict[str, Any]] = {}
            if raw_positions is None:
                book = _moved(self.positions, fills)
            else:
                book, venue = self._venue_book(raw_positions)
            self._write_positions(cur, book, venue, now)
            self._store_pnl(cur, now)
        if self.accepted:
            self.metrics.fill_rate.set(self.filled_orders / self.accepted)
        return book

    def _venue_book(
        self, raw_positions: list[dict[str, Any]]
    ) -> tuple[Book, dict[str, dict[str, Any]]]:
        """The venue's positions as a book, and its rows by symbol."""
        book = {s: Decimal(0) for s in self.config.symbols}
        venue: dict[str, dict[str, Any]] = {}
        for p in raw_positions:
            info = venue[p["info"]["symbol"]] = p["info"]
            book[info["symbol"]] = book.get(info["symbol"], Decimal(0)) + Decimal(
                info["positionAmt"]
            )
        return book, venue

    def _write_positions(
        self, cur: Any, book: Book, venue: dict[str, dict[str, Any]], now: str
    ) -> None:
        """The book's sizes; entry and mark prices from the venue's rows where read, else the
        mark from the feed (the entry price stays what the venue said last)."""
        for sym, qty in book.items():
            info = venue.get(sym)
            if info is not None:
                entry, mark = info["entryPrice"], info["markPrice"]
            else:
                entry, mark = None, str(self.prices.get(sym, Decimal(0)))
            cur.execute(
                "INSERT INTO positions (symbol, qty, entry_price, mark_price, updated_at) "
                "VALUES (?, ?, COALESCE(?, '0'), ?, ?) ON CONFLICT (symbol) DO UPDATE SET "
                "qty = excluded.qty, entry_price = COALESCE(?, positions.entry_price), "
                "mark_price = excluded.mark_price, updated_at = excluded.updated_at",
                (sym, str(qty), entry, mark, now, entry),
            )

    def _store_pnl(self, cur: Any, now: str) -> None:
        """P&L: cash from every fill (kept incrementally, see ``fold_cash``) plus the marked value
        of what is held."""
        cash = fold_cash(cur)
        held = Decimal(0)
        for sym, qty in cur.execute("SELECT symbol, qty FROM positions").fetchall():
            held += Decimal(qty) * self.prices.get(sym, Decimal(0))
        total = cash + held
        cur.execute(
            "INSERT INTO pnl (id, total, updated_at) VALUES (1, ?, ?) ON CONFLICT (id) "
            "DO UPDATE SET total = excluded.total, updated_at = excluded.updated_at",
            (str(total), now),
        )
        self.metrics.pnl.set(float(total))

    def _store_cancelled(self, cancelled: dict[str, dict[str, Any] | None]) -> Book:
        """A cancel answers with the order's final state: recorded now, never looked up."""
        now = utcnow().isoformat()
        with self.db.transaction() as cur:
            fills = self._record_orders(cur, cancelled, now)
            book = _moved(self.positions, fills)
            if fills:
                moved = {f[0] for f in fills}
                self._write_positions(cur, {s: q for s, q in book.items() if s in moved}, {}, now)
                self._store_pnl(cur, now)
        return book

    # ------------------------------------------------------------------ decide and act

    def _ccxt(self, symbol_id: str) -> str:
        return str(self.exchange.markets_by_id[symbol_id][0]["symbol"])

    def _rules(self, symbol_id: str) -> tuple[Decimal, Decimal, Decimal]:
        """Tick size, lot step and minimum notional of a symbol."""
        info = self.exchange.markets_by_id[symbol_id][0]["info"]
        filters = {f["filterType"]: f for f in info["filters"]}
        return (
            Decimal(filters["PRICE_FILTER"]["tickSize"]),
            Decimal(filters["LOT_SIZE"]["stepSize"]),
            Decimal(filters.get("MIN_NOTIONAL", {}).get("notional", "0")),
        )

    async def _act(self) -> None:
        mandate = self.mandate
        state = mandate.effective
        if not mandate.sending:
            # A shadow decides as if the book were its own and empty, and only logs it: the
            # orders resting there are the holder's (it cancels none), and deciding around the
            # holder's fresh requotes would hide its own decisions from the comparison.
            if state is not TradingState.HALTED:
                decided = self._decide(state, mandate.capital, resting=[])[0]
                await self._log_decisions(decided, sent=False)
            return
        if state == TradingState.HALTED:
            await self._cancel([o for o in self._open])
            return
        if state == TradingState.REDUCING:
            await self._cancel([o for o in self._open if not o["reduceOnly"]])
        started = time.monotonic()
        decisions, stale = self._decide(state, mandate.capital, self._open)
        thought_s = time.monotonic() - started
        await self._log_decisions(decisions, sent=True)
        await self._cancel(stale)
        lease = mandate.lease
        assert lease is not None
        # Every order runs to its end (sent and recorded) before an error of another surfaces.
        _raise_first(
            await asyncio.gather(
                *(self._place(lease, *d, thought_s=thought_s) for d in decisions),
                return_exceptions=True,
            )
        )

    def _decide(
        self, state: TradingState, capital: Decimal, resting: list[dict[str, Any]]
    ) -> tuple[list[tuple[str, str, Decimal, Decimal, bool]], list[dict[str, Any]]]:
        """The orders to send (symbol, side, qty, price, reduce-only) and the ``resting`` quotes
        gone stale, quoting ``capital`` of the configured notional and position caps."""
        cfg = self.config
        positions = self.positions
        fault = self.fault
        notional = cfg.order_notional * capital
        cap = cfg.max_position_notional * capital
        decisions: list[tuple[str, str, Decimal, Decimal, bool]] = []
        stale: list[dict[str, Any]] = []
        for sym in cfg.symbols:
            price = self.prices.get(sym)
            if price is None:
                continue
            tick, step, min_notional = self._rules(sym)
            pos = positions.get(sym, Decimal(0))
            here = [o for o in resting if o["info"]["symbol"] == sym]
            offset = price * cfg.quote_offset_bps / Decimal(10000)
            want = {
                "buy": ((price - offset) / tick).to_integral_value(ROUND_DOWN) * tick,
                "sell": -((-(price + offset)) / tick).to_integral_value(ROUND_DOWN) * tick,
            }
            if state == TradingState.REDUCING:
                if pos == 0:
                    continue
                side = "sell" if pos > 0 else "buy"
                if any(o["reduceOnly"] for o in here):
                    continue
                qty = (abs(pos) / step).to_integral_value(ROUND_DOWN) * step
                if qty > 0:
                    decisions.append((sym, side, qty, want[side], True))
                continue
            qty = (notional / price / step).to_integral_value(ROUND_DOWN) * step
            # Never below the venue's minimum: a small share of capital is no reject storm.
            least = (min_notional / want["buy"] / step).to_integral_value(ROUND_CEILING) * step
            qty = max(qty, least)
            if fault == Fault.REJECT_STORM:
                qty = step  # one lot: below the venue's minimum notional, rejected every time
            elif fault == Fault.OVERSIZED:
                qty = (cap * cfg.oversize_factor / price / step).to_integral_value(
                    ROUND_DOWN
                ) * step
            for side, px in want.items():
                mine = [o for o in here if o["side"] == side and not o["reduceOnly"]]
                drift = cfg.requote_bps * price / Decimal(10000)
                stale += [o for o in mine if abs(Decimal(str(o["price"])) - px) > drift]
                if [o for o in mine if o not in stale] and fault != Fault.REJECT_STORM:
                    continue
                grows = pos >= 0 if side == "buy" else pos <= 0
                after = abs(pos) + qty if grows else abs(abs(pos) - qty)
                if fault != Fault.OVERSIZED and after * price > cap and after >= abs(pos):
                    # The cap: never quote what could grow the position beyond it. One that
                    # shrinks it is quoted (a smaller share of capital may start above the cap).
                    continue
                decisions.append((sym, side, qty, px, False))
        return decisions, stale

    async def _log_decisions(
        self, decisions: list[tuple[str, str, Decimal, Decimal, bool]], *, sent: bool
    ) -> None:
        """The decision log a deployment compares a shadow's decisions with (``decisions.py``)."""
        if decisions:
            logged = [(sym, side, px, qty) for sym, side, qty, px, _ in decisions]
            await self._db(self._record_decisions, logged, sent)

    def _record_decisions(
        self, logged: list[tuple[str, str, Decimal, Decimal]], sent: bool
    ) -> None:
        record_decisions(self.db, self.release.version, logged, sent=sent)

    async def _cancel(self, orders: list[dict[str, Any]]) -> None:
        async def one(o: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
            try:
                return o["clientOrderId"], await self.exchange.cancel_order(o["id"], o["symbol"])
            except ccxt.OrderNotFound:  # already gone: filled or cancelled; looked up next loop
                return o["clientOrderId"], None

        answers = await asyncio.gather(*(one(o) for o in orders), return_exceptions=True)
        cancelled: dict[str, dict[str, Any] | None] = {}
        for answer in answers:
            if not isinstance(answer, BaseException) and answer[1] is not None:
                cancelled[answer[0]] = answer[1]
        if cancelled:
            self.positions = await self._db(self._store_cancelled, cancelled)
        _raise_first(answers)

    async def _place(
        self,
        lease: contract.Lease,
        sym: str,
        side: str,
        qty: Decimal,
        price: Decimal,
        reduce_only: bool,
        thought_s: float = 0.0,
    ) -> None:
        """Send one decided order; ``thought_s``: what deciding the loop's orders took."""
        decided = time.monotonic()
        if self.fault == Fault.LATENCY:
            # The slow "model"; a stop cuts it short (nothing is sent after it).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.config.latency_fault_s)
        if self._stopping:
            return  # decided but not sent: nothing to record
        self.metrics.decision.observe(thought_s + time.monotonic() - decided)
        cid = client_order_id(
            self.config.client_id_prefix, self.release.version, self.run_id, sym, side, self.loop_no
        )
        params: dict[str, Any] = {"newClientOrderId": cid, "timeInForce": "GTC"}
        if reduce_only:
            params["reduceOnly"] = True
        if not await self._db(self._store_intent, lease, cid, sym, side, qty, price, reduce_only):
            log.info("lease epoch %d fenced meanwhile: %s not sent", lease.epoch, cid)
            return
        try:
            order = await self.exchange.create_order(
                self._ccxt(sym), "limit", side, float(qty), float(price), params
            )
        except (ccxt.InvalidOrder, ccxt.BadRequest, ccxt.InsufficientFunds) as e:
            self.metrics.rejects.labels(type(e).__name__).inc()
            await self._db(self._store_status, cid, None, "REJECTED")
            return
        self.metrics.latency.observe(time.monotonic() - decided)
        self.metrics.orders.labels(sym).inc()
        self.accepted += 1
        await self._db(self._store_status, cid, str(order["id"]), "NEW")

    def _store_intent(
        self,
        lease: contract.Lease,
        cid: str,
        sym: str,
        side: str,
        qty: Decimal,
        price: Decimal,
        reduce_only: bool,
    ) -> bool:
        """The order's PENDING row, written only while ``lease`` still holds (False: fenced,
        do not send)."""
        now = utcnow().isoformat()
        row = (cid, sym, side, str(qty), str(price), int(reduce_only), self.release.version)
        return contract.record_intent(
            self.db,
            lease,
            "INSERT INTO orders (client_order_id, order_id, symbol, side, qty, price, "
            "reduce_only, status, filled, version, created_at, updated_at) "
            "VALUES (?, NULL, ?, ?, ?, ?, ?, 'PENDING', '0', ?, ?, ?)",
            (*row, now, now),
        )

    def _store_status(self, cid: str, order_id: str | None, status: str) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE orders SET order_id = COALESCE(?, order_id), status = ?, updated_at = ? "
                "WHERE client_order_id = ?",
                (order_id, status, utcnow().isoformat(), cid),
            )

    # ------------------------------------------------------------------ HTTP

    def health(self) -> tuple[bool, dict[str, object]]:
        now = time.monotonic()
        feed_age = None if self.last_feed is None else round(now - self.last_feed, 3)
        loop_alive = self.last_loop is not None and now - self.last_loop <= self.config.loop_stale_s
        feed_fresh = feed_age is not None and feed_age <= self.config.feed_stale_s
        healthy = bool(loop_alive and feed_fresh and self.db_ok)
        return healthy, {
            "healthy": healthy,
            "strategy": self.config.name,
            "version": self.release.version,
            "fault": self.release.fault.value,
            "trading_state": self.state.value,
            "sending": self.mandate.sending,
            "lease_epoch": self.mandate.epoch,
            "capital": float(self.mandate.capital),
            "last_loop_at": self.last_loop_at,
            "loop_alive": loop_alive,
            "feed_age_s": feed_age,
            "feed_fresh": feed_fresh,
            "db_ok": self.db_ok,
            "pid": os.getpid(),
        }

    async def _serve(self) -> web.AppRunner:
        async def healthz(request: web.Request) -> web.Response:
            try:
                await off_thread(get_trading_state, self.db)
                self.db_ok = True
            except Exception:
                self.db_ok = False
            healthy, body = self.health()
            return web.json_response(body, status=200 if healthy else 503)

        async def metrics(request: web.Request) -> web.Response:
            if self.last_feed is not None:
                self.metrics.feed_staleness.set(time.monotonic() - self.last_feed)
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        # A stop does not wait for a /healthz whose database read is slow.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.config.http_host, self.config.http_port)
        await site.start()
        port = runner.addresses[0][1]
        if self.config.port_file is not None:
            tmp = self.config.port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, self.config.port_file)
        log.info("serving /healthz and /metrics on %s:%s", self.config.http_host, port)
        return runner


def _raise_first(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _moved(book: Book, fills: list[tuple[str, str, Decimal]]) -> Book:
    out = dict(book)
    for symbol, side, qty in fills:
        out[symbol] = out.get(symbol, Decimal(0)) + (qty if side == "buy" else -qty)
    return out


def main(release_dir: Path, config_path: Path) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    release = Release.load(release_dir)
    config = StrategyConfig.load(config_path)
    log.info("starting %s %s (fault: %s)", config.name, release.version, release.fault.value)
    try:
        asyncio.run(Strategy(config, release).run())
    except KeyboardInterrupt:
        return 0
    return 0
