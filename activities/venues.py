"""The venue adapter: the one module that owns ccxt.

It opens one ccxt instance per account (markets loaded once, kept for the worker's life), turns
ccxt's own retries and throttle off (Temporal retries; our weight limiter admits bursts), reads the
account's secret from the environment, and returns plain domain models. Every ccxt exception is
translated here, once, by :func:`activities.errors.translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import ccxt.async_support as ccxt

from activities.accounts import Account, AccountsFile, ApiCredentials, Route, read_credentials
from activities.errors import (
    OrderGone,
    translate,
)
from activities.ratelimit import WeightLimiter, limiter_trace
from activities.venue_routing import loopback_session
from workflows.shared import FlattenOrder, OpenOrder, Position, PositionKind

T = TypeVar("T")

# ccxt logs request headers (the API key) at DEBUG: keep it quiet whatever the root level is.
logging.getLogger("ccxt").setLevel(logging.WARNING)

VENUE_WEIGHT_BUDGETS = {"fapi.binance.com": 2400, "api.binance.com": 6000}
BUDGET_SHARE = 0.9
"""Share of the venue's weight budget we allow ourselves; the rest absorbs other clients' use."""


@dataclass(frozen=True)
class LotRules:
    """A market's size rules, read from the venue's own filters (exact decimal strings)."""

    step: Decimal
    min_qty: Decimal
    max_qty: Decimal | None
    min_notional: Decimal

    def round_down(self, quantity: Decimal) -> Decimal:
        """Largest multiple of the step not above ``quantity``: a flatten never rounds up."""
        if self.step <= 0:
            return quantity
        return (quantity / self.step).to_integral_value(rounding=ROUND_DOWN) * self.step


def _decimal(value: Any) -> Decimal:
    return Decimal(str(value)) if value not in (None, "") else Decimal(0)


class VenueSession:
    """One account's connection: a ccxt instance with markets loaded, behind domain methods."""

    def __init__(
        self,
        name: str,
        account: Account,
        credentials: ApiCredentials,
        session: aiohttp.ClientSession,
    ) -> None:
        self.name = name
        self.account = account
        self.is_spot = account.exchange == "binance"
        self._secrets = (
            credentials.api_key.get_secret_value(),
            credentials.secret.get_secret_value(),
        )
        options: dict[str, Any] = {
            "fetchCurrencies": False,
            "fetchMargins": False,
            "fetchOpenOrders": {"warnWithoutSymbol": False},
            "warnOnFetchOpenOrdersWithoutSymbol": False,
        }
        if self.is_spot:
            options["fetchMarkets"] = {"types": ["spot"]}
        exchange_class = getattr(ccxt, account.exchange)
        self.exchange: ccxt.Exchange = exchange_class(
            {
                "apiKey": self._secrets[0],
                "secret": self._secrets[1],
                "session": session,
                # Temporal owns retries and the weight limiter owns pacing (see ratelimit.py).
                "enableRateLimit": False,
                "options": options,
                "timeout": 10_000,
            }
        )
        self._session = session
        self._markets_loaded = asyncio.Lock()
        self._plain_read: asyncio.Task[list[dict[str, Any]]] | None = None
        self._armed: dict[str, tuple[float, int]] = {}
        """symbol -> (monotonic time, seconds) of the last countdown the venue accepted from us."""

    # ------------------------------------------------------------------ plumbing

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run one ccxt call, translating its exceptions into domain errors."""
        try:
            return await fn(*args, **kwargs)
        except ccxt.BaseError as e:
            raise translate(e, *self._secrets) from None

    async def ensure_markets(self) -> None:
        async with self._markets_loaded:
            if not self.exchange.markets:
                await self.call(self.exchange.load_markets)

    async def close(self) -> None:
        await self.exchange.close()
        await self._session.close()

    def exchange_symbol(self, symbol: str) -> str:
        """The venue's own name of a ccxt symbol (``BTC/USDT:USDT`` -> ``BTCUSDT``): what a
        strategy's records use."""
        return str(self.exchange.market(symbol)["id"])

    def lot_rules(self, symbol: str) -> LotRules:
        """Size rules for market orders (MARKET_LOT_SIZE where present, else LOT_SIZE)."""
        market = self.exchange.market(symbol)
        filters = {f["filterType"]: f for f in market["info"].get("filters", [])}
        lot = filters.get("MARKET_LOT_SIZE") or filters.get("LOT_SIZE") or {}
        if _decimal(lot.get("stepSize")) == 0:
            lot = filters.get("LOT_SIZE", {})
        notional = filters.get("MIN_NOTIONAL") or filters.get("NOTIONAL") or {}
        max_qty = _decimal(lot.get("maxQty"))
        return LotRules(
            step=_decimal(lot.get("stepSize")),
            min_qty=_decimal(lot.get("minQty")),
            max_qty=max_qty if max_qty > 0 else None,
            min_notional=_decimal(notional.get("notional") or notional.get("minNotional")),
        )

    def _order(self, raw: dict[str, Any], conditional: bool = False) -> OpenOrder:
        return OpenOrder(
            id=str(raw.get("id")),
            client_order_id=raw.get("clientOrderId"),
            symbol=raw["symbol"],
            side=str(raw.get("side")),
            type=str(raw.get("type")),
            amount=_decimal(raw.get("amount")),
            filled=_decimal(raw.get("filled")),
            price=_decimal(raw["price"]) if raw.get("price") else None,
            conditional=conditional,
        )

    # ------------------------------------------------------------------ reads

    async def open_orders(self) -> list[OpenOrder]:
        """Every open order of the account, conditional (algo) orders included, in one look.

        Raises if either book cannot be read; callers that must go on with the book they could
        read use :meth:`plain_open_orders` and :meth:`conditional_open_orders`.
        """
        plain, conditional = await asyncio.gather(
            self.plain_open_orders(), self.conditional_open_orders()
        )
        return plain + conditional

    async def plain_open_orders(self, join_in_flight: bool = False) -> list[OpenOrder]:
        """Open plain (non-conditional) orders of the whole account."""
        return self.parse_open_orders(await self.open_order_rows(False, join_in_flight))

    async def conditional_open_orders(self) -> list[OpenOrder]:
        """Open conditional (algo: stop/take-profit) orders; spot has no such book here."""
        if self.is_spot:
            return []
        return self.parse_open_orders(await self.open_order_rows(True), conditional=True)

    async def open_order_rows(
        self, conditional: bool, join_in_flight: bool = False
    ) -> list[dict[str, Any]]:
        """One account-wide listing of a book, as the venue's raw rows.

        Raw, because ccxt's order parser costs ~0.5 ms per order: 500 open orders are 250 ms
        of CPU before the first cancel could go out. :meth:`symbols_of` names the symbols to
        cancel at once; :meth:`parse_open_orders` makes the models afterwards.
        ``join_in_flight`` (plain book) shares an account-wide read already on its way (the
        halt and the cancel-all of one kill start together): one request, weight 40, instead
        of two. Never for a re-query, which must start after the cancels it checks.
        """
        await self.ensure_markets()
        if conditional:
            return await self._read_rows(True)
        task = self._plain_read
        if not join_in_flight or task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._read_rows(False))
            # Retrieve the outcome even if every waiter was cancelled (no "never retrieved").
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._plain_read = task
        return list(await asyncio.shield(task))

    async def _read_rows(self, conditional: bool) -> list[dict[str, Any]]:
        # The endpoints ccxt's fetch_open_orders picks for these two account kinds.
        if self.is_spot:
            fetch = self.exchange.privateGetOpenOrders
        elif conditional:
            fetch = self.exchange.fapiPrivateGetOpenAlgoOrders
        else:
            fetch = self.exchange.fapiPrivateGetOpenOrders
        rows = await self.call(fetch, {})
        return list(rows) if isinstance(rows, list) else []

    def symbols_of(self, rows: list[dict[str, Any]]) -> set[str]:
        """Unified symbols of raw order rows, resolved as ccxt's parser resolves them."""
        kind = "spot" if self.is_spot else "contract"
        return {self.exchange.safe_symbol(r.get("symbol"), None, None, kind) for r in rows}

    def parse_open_orders(
        self, rows: list[dict[str, Any]], conditional: bool = False
    ) -> list[OpenOrder]:
        try:
            parsed = self.exchange.parse_orders(rows)
        except ccxt.BaseError as e:
            raise translate(e, *self._secrets) from None
        return [self._order(o, conditional) for o in parsed]

    async def positions(self) -> list[Position]:
        """Non-zero positions, fresh from the venue (spot: sellable base-asset balances)."""
        await self.ensure_markets()
        if self.is_spot:
            return await self._spot_balances()
        raw = await self.call(self.exchange.fetch_positions)
        result = []
        for p in raw:
            info = p.get("info", {})
            quantity = _decimal(info.get("positionAmt"))
            if quantity == 0:
                continue
            side = info.get("positionSide")
            result.append(
                Position(
                    symbol=p["symbol"],
                    kind=PositionKind.DERIVATIVE,
                    quantity=quantity,
                    position_side=side if side in ("LONG", "SHORT") else None,
                    mark_price=_decimal(info.get("markPrice")) or None,
                )
            )
        return sorted(result, key=lambda p: (p.symbol, p.position_side or ""))

    async def _spot_balances(self) -> list[Position]:
        balance = await self.call(self.exchange.fetch_balance)
        keep = {self.account.quote_asset, *self.account.keep_assets}
        result = []
        for asset, free in (balance.get("free") or {}).items():
            quantity = _decimal(free)
            symbol = f"{asset}/{self.account.quote_asset}"
            if asset in keep or quantity <= 0 or symbol not in self.exchange.markets:
                continue
            result.append(
                Position(symbol=symbol, kind=PositionKind.SPOT_BALANCE, quantity=quantity)
            )
        return sorted(result, key=lambda p: p.symbol)

    async def order_by_client_id(self, symbol: str, client_order_id: str) -> FlattenOrder | None:
        """Look an order up by our client id; None when the venue never accepted it."""
        try:
            raw = await self.call(
                self.exchange.fetch_order, None, symbol, {"origClientOrderId": client_order_id}
            )
        except OrderGone:
            return None
        return FlattenOrder(
            client_order_id=client_order_id,
            symbol=symbol,
            side=str(raw.get("side")),
            amount=_decimal(raw.get("amount")),
            filled=_decimal(raw.get("filled")),
            status=str(raw.get("status")),
        )

    # ------------------------------------------------------------------ writes

    async def cancel_all_in(self, symbol: str, conditional: bool) -> None:
        """Cancel every open (or conditional) order in one symbol; nothing open is success."""
        params = {"trigger": True} if conditional else {}
        # Spot answers -2011 when nothing is open: that is the state we want.
        with contextlib.suppress(OrderGone):
            await self.call(self.exchange.cancel_all_orders, symbol, params)

    async def arm_dead_man(self, symbol: str, seconds: int) -> None:
        """Venue-side countdown cancel-all for one symbol (futures only); 0 disarms it."""
        try:
            market_id = self.exchange.market(symbol)["id"]
        except ccxt.BaseError as e:
            raise translate(e, *self._secrets) from None
        await self.call(
            self.exchange.fapiPrivatePostCountdownCancelAll,
            {"symbol": market_id, "countdownTime": seconds * 1000},
        )
        if seconds > 0:
            self._armed[symbol] = (time.monotonic(), seconds)
        else:
            self._armed.pop(symbol, None)

    def dead_man_running(self, symbol: str, seconds: int, within_s: float) -> bool:
        """Whether a countdown of at least ``seconds`` that we armed less than ``within_s`` ago
        still has half its time or more to run: re-arming it now would spend weight for nothing.
        Only this process's own arming counts (a fresh worker re-arms)."""
        armed = self._armed.get(symbol)
        if armed is None:
            return False
        at, armed_seconds = armed
        age = time.monotonic() - at
        return armed_seconds >= seconds and age < within_s and age < armed_seconds - seconds / 2

    async def close_position(
        self, position: Position, quantity: Decimal, client_order_id: str
    ) -> FlattenOrder:
        """Send one market order that can only reduce ``position`` by at most ``quantity``."""
        side = "sell" if position.quantity > 0 else "buy"
        params: dict[str, Any] = {"newClientOrderId": client_order_id}
        if position.kind is PositionKind.DERIVATIVE:
            if position.position_side:
                # Hedge mode: closing is expressed by the leg; reduceOnly is refused there (-1106).
                params["positionSide"] = position.position_side
            else:
                params["reduceOnly"] = True
        if not self.is_spot:
            params["newOrderRespType"] = "RESULT"
        raw = await self.call(
            self.exchange.create_order,
            position.symbol,
            "market",
            side,
            float(quantity),
            None,
            params,
        )
        return FlattenOrder(
            client_order_id=client_order_id,
            symbol=position.symbol,
            side=side,
            amount=quantity,
            filled=_decimal(raw.get("filled")),
            status=str(raw.get("status")),
        )


class VenueGateway:
    """Builds and keeps one :class:`VenueSession` per account for the worker's lifetime."""

    def __init__(
        self,
        accounts: AccountsFile,
        *,
        sandbox_address: str,
        sandbox_ca_file: Path,
    ) -> None:
        self._accounts = accounts
        self._sandbox_address = sandbox_address
        self._sandbox_ca_file = sandbox_ca_file
        self._sessions: dict[str, VenueSession] = {}
        self._lock = asyncio.Lock()
        self.limiters = {
            host: WeightLimiter(int(budget * BUDGET_SHARE))
            for host, budget in VENUE_WEIGHT_BUDGETS.items()
        }
        self._trace = limiter_trace(self.limiters.get)

    async def session(self, name: str) -> VenueSession:
        async with self._lock:
            if name not in self._sessions:
                account = self._accounts.get(name)
                credentials = read_credentials(name, account)
                self._sessions[name] = VenueSession(
                    name, account, credentials, self._http_session(account)
                )
        venue = self._sessions[name]
        await venue.ensure_markets()
        return venue

    def _http_session(self, account: Account) -> aiohttp.ClientSession:
        if account.route is Route.SANDBOX:
            return loopback_session(
                self._sandbox_address, self._sandbox_ca_file, trace_configs=[self._trace]
            )
        return aiohttp.ClientSession(trace_configs=[self._trace])

    async def close(self) -> None:
        for venue in self._sessions.values():
            await venue.close()
        self._sessions.clear()


def utcnow() -> datetime:
    return datetime.now(UTC)
