"""The strategy process: a quoting loop on ccxt binanceusdm, its database, /healthz and /metrics.

Every loop re-reads the trading state from the database, reads prices, reconciles its orders and
positions with the venue, then acts: ACTIVE quotes both sides within the position caps; REDUCING
cancels entries and only sends reduce-only orders; HALTED cancels what rests and sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt.async_support as ccxt
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from activities.venue_routing import loopback_session
from sandbox.strategy.config import Fault, Release, StrategyConfig
from sandbox.strategy.state import Database, TradingState, get_trading_state, utcnow

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


class PriceFeed:
    """Prices from the sandbox's admin view: the sandbox has no public ticker endpoint."""

    def __init__(self, base_url: str, token: str) -> None:
        self._url = base_url.rstrip("/") + "/admin/prices"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def prices(self) -> dict[str, Decimal]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=2)
            )
        async with self._session.get(self._url) as r:
            r.raise_for_status()
            body = await r.json()
        return {k: Decimal(v) for k, v in body["prices"].items()}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"environment variable {name} is not set")
    return value


class Strategy:
    def __init__(self, config: StrategyConfig, release: Release) -> None:
        self.config = config
        self.release = release
        self.metrics = Metrics(release)
        self.db = Database(config.db)
        self.state = TradingState.ACTIVE
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

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.db.init_schema)
        self.run_id = await asyncio.to_thread(self._record_run)
        session = loopback_session(cfg.exchange_address, cfg.ca_file)
        self.exchange = ccxt.binanceusdm(
            {
                "apiKey": _env(cfg.api_key_env),
                "secret": _env(cfg.secret_env),
                "session": session,
                "enableRateLimit": False,
                "timeout": 5000,
                "options": {
                    "fetchCurrencies": False,
                    "fetchMargins": False,
                    "fetchOpenOrders": {"warnWithoutSymbol": False},
                },
            }
        )
        feed = PriceFeed(cfg.feed_url, _env(cfg.feed_token_env))
        runner = await self._serve()
        try:
            await self.exchange.load_markets()
            while True:
                t0 = time.monotonic()
                await self.loop_once(feed)
                await asyncio.sleep(max(0.0, cfg.loop_interval_s - (time.monotonic() - t0)))
        finally:
            await feed.close()
            await self.exchange.close()
            await session.close()
            await runner.cleanup()

    def _record_run(self) -> int:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO runs (version, pid, started_at) VALUES (?, ?, ?)",
                (self.release.version, os.getpid(), utcnow().isoformat()),
            )
            row = cur.execute("SELECT MAX(id) FROM runs").fetchone()
        return int(row[0]) if row and row[0] is not None else 1

    # ------------------------------------------------------------------ one loop

    async def loop_once(self, feed: PriceFeed) -> None:
        m = self.metrics
        try:
            record = await asyncio.to_thread(get_trading_state, self.db)
            self.state, self.db_ok = record.state, True
        except Exception as e:
            # Cannot read the state: behave as HALTED until the database answers again.
            self.db_ok, self.state = False, TradingState.HALTED
            m.errors.labels("db").inc()
            log.warning("database unreachable: %s", type(e).__name__)
        for s in TradingState:
            m.state.labels(s.value).set(1 if s == self.state else 0)
        try:
            self.prices = await feed.prices()
            self.last_feed = time.monotonic()
        except Exception as e:
            m.errors.labels("feed").inc()
            log.warning("price feed failed: %s", type(e).__name__)
        feed_fresh = (
            self.last_feed is not None
            and time.monotonic() - self.last_feed <= self.config.feed_stale_s
        )
        try:
            positions = await self._reconcile()
            if feed_fresh:
                await self._act(positions)
        except ccxt.BaseError as e:
            m.errors.labels("venue").inc()
            log.warning("venue error: %s: %s", type(e).__name__, e)
        self.loop_no += 1
        self.last_loop = time.monotonic()
        self.last_loop_at = utcnow().isoformat()
        m.loops.inc()

    async def _reconcile(self) -> dict[str, Decimal]:
        """Read open orders and positions; record fills and P&L in the database."""
        ex = self.exchange
        symbols = [self._ccxt(s) for s in self.config.symbols]
        open_lists = await asyncio.gather(*(ex.fetch_open_orders(s) for s in symbols))
        raw_positions = await ex.fetch_positions(symbols)
        open_by_cid = {o["clientOrderId"]: o for lst in open_lists for o in lst}
        known = await asyncio.to_thread(self._known_open)
        finals = {}
        for cid, (order_id, symbol) in known.items():
            if cid not in open_by_cid and order_id:
                finals[cid] = await ex.fetch_order(order_id, self._ccxt(symbol))
        positions = {p["info"]["symbol"]: Decimal(p["info"]["positionAmt"]) for p in raw_positions}
        await asyncio.to_thread(self._store_reconcile, open_by_cid, finals, raw_positions)
        self._open = list(open_by_cid.values())
        return positions

    def _known_open(self) -> dict[str, tuple[str, str]]:
        with self.db.transaction() as cur:
            rows = cur.execute(
                "SELECT client_order_id, order_id, symbol FROM orders "
                "WHERE status IN ('NEW', 'PARTIALLY_FILLED')"
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def _store_reconcile(
        self,
        open_by_cid: dict[str, Any],
        finals: dict[str, Any],
        raw_positions: list[dict[str, Any]],
    ) -> None:
        now = utcnow().isoformat()
        with self.db.transaction() as cur:
            for cid, o in [*open_by_cid.items(), *finals.items()]:
                row = cur.execute(
                    "SELECT filled, symbol, side FROM orders WHERE client_order_id = ?", (cid,)
                ).fetchone()
                if row is None:
                    continue  # not ours (or placed by an earlier database)
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
                    self.metrics.fills.labels(row[1]).inc()
                    if status == "FILLED":
                        self.filled_orders += 1
                cur.execute(
                    "UPDATE orders SET filled = ?, status = ?, updated_at = ? "
                    "WHERE client_order_id = ?",
                    (str(filled), status, now, cid),
                )
            for p in raw_positions:
                info = p["info"]
                cur.execute(
                    "INSERT INTO positions (symbol, qty, entry_price, mark_price, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (symbol) DO UPDATE SET qty = "
                    "excluded.qty, entry_price = excluded.entry_price, "
                    "mark_price = excluded.mark_price, updated_at = excluded.updated_at",
                    (
                        info["symbol"],
                        info["positionAmt"],
                        info["entryPrice"],
                        info["markPrice"],
                        now,
                    ),
                )
            live = {p["info"]["symbol"] for p in raw_positions}
            for sym in self.config.symbols:
                if sym not in live:
                    cur.execute(
                        "UPDATE positions SET qty = '0', updated_at = ? WHERE symbol = ?",
                        (now, sym),
                    )
            # P&L: cash from every fill plus the marked value of what is held.
            cash = Decimal(0)
            for side, qty, price in cur.execute("SELECT side, qty, price FROM fills").fetchall():
                sign = -1 if side == "buy" else 1
                cash += sign * Decimal(qty) * Decimal(price)
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
        if self.accepted:
            self.metrics.fill_rate.set(self.filled_orders / self.accepted)

    # ------------------------------------------------------------------ decide and act

    def _ccxt(self, symbol_id: str) -> str:
        return str(self.exchange.markets_by_id[symbol_id][0]["symbol"])

    def _rules(self, symbol_id: str) -> tuple[Decimal, Decimal]:
        info = self.exchange.markets_by_id[symbol_id][0]["info"]
        filters = {f["filterType"]: f for f in info["filters"]}
        return Decimal(filters["PRICE_FILTER"]["tickSize"]), Decimal(
            filters["LOT_SIZE"]["stepSize"]
        )

    async def _act(self, positions: dict[str, Decimal]) -> None:
        cfg = self.config
        fault = self.release.fault
        if self.state == TradingState.HALTED:
            await self._cancel([o for o in self._open])
            return
        if self.state == TradingState.REDUCING:
            await self._cancel([o for o in self._open if not o["reduceOnly"]])
        decisions: list[tuple[str, str, Decimal, Decimal, bool]] = []
        stale: list[dict[str, Any]] = []
        for sym in cfg.symbols:
            price = self.prices.get(sym)
            if price is None:
                continue
            tick, step = self._rules(sym)
            pos = positions.get(sym, Decimal(0))
            resting = [o for o in self._open if o["info"]["symbol"] == sym]
            offset = price * cfg.quote_offset_bps / Decimal(10000)
            want = {
                "buy": ((price - offset) / tick).to_integral_value(ROUND_DOWN) * tick,
                "sell": -((-(price + offset)) / tick).to_integral_value(ROUND_DOWN) * tick,
            }
            if self.state == TradingState.REDUCING:
                if pos == 0:
                    continue
                side = "sell" if pos > 0 else "buy"
                if any(o["reduceOnly"] for o in resting):
                    continue
                qty = (abs(pos) / step).to_integral_value(ROUND_DOWN) * step
                if qty > 0:
                    decisions.append((sym, side, qty, want[side], True))
                continue
            qty = (cfg.order_notional / price / step).to_integral_value(ROUND_DOWN) * step
            if fault == Fault.REJECT_STORM:
                qty = step  # one lot: below the venue's minimum notional, rejected every time
            elif fault == Fault.OVERSIZED:
                qty = (
                    cfg.max_position_notional * cfg.oversize_factor / price / step
                ).to_integral_value(ROUND_DOWN) * step
            for side, px in want.items():
                mine = [o for o in resting if o["side"] == side and not o["reduceOnly"]]
                drift = cfg.requote_bps * price / Decimal(10000)
                stale += [o for o in mine if abs(Decimal(str(o["price"])) - px) > drift]
                if [o for o in mine if o not in stale] and fault != Fault.REJECT_STORM:
                    continue
                grows = pos >= 0 if side == "buy" else pos <= 0
                after = abs(pos) + qty if grows else abs(abs(pos) - qty)
                if fault != Fault.OVERSIZED and after * price > cfg.max_position_notional:
                    continue  # the cap: never quote what could grow the position beyond it
                decisions.append((sym, side, qty, px, False))
        await self._cancel(stale)
        await asyncio.gather(*(self._place(*d) for d in decisions))

    async def _cancel(self, orders: list[dict[str, Any]]) -> None:
        async def one(o: dict[str, Any]) -> None:
            with contextlib.suppress(ccxt.OrderNotFound):  # already gone: filled or cancelled
                await self.exchange.cancel_order(o["id"], o["symbol"])

        await asyncio.gather(*(one(o) for o in orders))

    async def _place(
        self, sym: str, side: str, qty: Decimal, price: Decimal, reduce_only: bool
    ) -> None:
        decided = time.monotonic()
        if self.release.fault == Fault.LATENCY:
            await asyncio.sleep(self.config.latency_fault_s)  # the slow "model"
        cid = f"{self.config.client_id_prefix}-{self.run_id}-{sym}-{side[0].upper()}-{self.loop_no}"
        params: dict[str, Any] = {"newClientOrderId": cid, "timeInForce": "GTC"}
        if reduce_only:
            params["reduceOnly"] = True
        await asyncio.to_thread(self._store_new, cid, sym, side, qty, price, reduce_only)
        try:
            order = await self.exchange.create_order(
                self._ccxt(sym), "limit", side, float(qty), float(price), params
            )
        except (ccxt.InvalidOrder, ccxt.BadRequest, ccxt.InsufficientFunds) as e:
            self.metrics.rejects.labels(type(e).__name__).inc()
            await asyncio.to_thread(self._store_status, cid, None, "REJECTED")
            return
        self.metrics.latency.observe(time.monotonic() - decided)
        self.metrics.orders.labels(sym).inc()
        self.accepted += 1
        await asyncio.to_thread(self._store_status, cid, str(order["id"]), "NEW")

    def _store_new(
        self, cid: str, sym: str, side: str, qty: Decimal, price: Decimal, reduce_only: bool
    ) -> None:
        now = utcnow().isoformat()
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO orders (client_order_id, order_id, symbol, side, qty, price, "
                "reduce_only, status, filled, version, created_at, updated_at) "
                "VALUES (?, NULL, ?, ?, ?, ?, ?, 'PENDING', '0', ?, ?, ?)",
                (
                    cid,
                    sym,
                    side,
                    str(qty),
                    str(price),
                    int(reduce_only),
                    self.release.version,
                    now,
                    now,
                ),
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
                await asyncio.to_thread(get_trading_state, self.db)
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
        runner = web.AppRunner(app, access_log=None)
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
