"""Accounts, orders, positions and matching: the venue's true state.

Everything here is synchronous and runs on the server's single event loop, so a request is applied
atomically. Routes translate HTTP params into calls here; the admin API reads the same objects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Literal

from sandbox.markets import BY_SYMBOL, Market
from sandbox.prices import PriceProcess

Venue = Literal["spot", "futures"]
OPEN_STATUSES = ("NEW", "PARTIALLY_FILLED")
ZERO = Decimal(0)
# Resting orders fill this fraction of their remainder per tick once the price crosses them, so
# PARTIALLY_FILLED orders exist for a few ticks, as on a real book with thin depth at the level.
PARTIAL_FRACTION = Decimal("0.4")


class VenueError(Exception):
    """A Binance error answer: ``{"code": code, "msg": msg}`` with HTTP ``status``."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.status = status


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Order:
    order_id: int
    account: str
    venue: Venue
    symbol: str
    side: str  # BUY / SELL
    type: str  # LIMIT, MARKET, STOP_MARKET, ...
    qty: Decimal
    price: Decimal | None
    client_order_id: str
    time_in_force: str = "GTC"
    reduce_only: bool = False
    position_side: str = "BOTH"
    close_position: bool = False
    trigger_price: Decimal | None = None
    is_algo: bool = False
    filled: Decimal = ZERO
    cum_quote: Decimal = ZERO
    status: str = "NEW"
    time: int = field(default_factory=now_ms)
    update_time: int = field(default_factory=now_ms)
    locked: Decimal = ZERO  # spot: funds still locked by the remainder (quote for buys)
    actual_order_id: int | None = None  # algo: the order it turned into when triggered
    liquidity: Decimal | None = None  # fault injection: share of a market order that fills

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def remaining(self) -> Decimal:
        return self.qty - self.filled

    @property
    def avg_price(self) -> Decimal:
        return self.cum_quote / self.filled if self.filled else ZERO


@dataclass
class Fill:
    trade_id: int
    order_id: int
    account: str
    venue: Venue
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    position_side: str
    time: int
    maker: bool


@dataclass
class Position:
    symbol: str
    position_side: str  # BOTH (one-way), LONG or SHORT (hedge legs)
    qty: Decimal = ZERO  # signed; SHORT legs are negative as in positionRisk
    entry_price: Decimal = ZERO
    update_time: int = 0
    last_sign: int = 0
    flipped: bool = False
    sign_history: list[int] = field(default_factory=list)

    def record_sign(self, by_fill: bool) -> None:
        """Track sign changes so tests can assert a flatten never overshot through zero."""
        sign = (self.qty > 0) - (self.qty < 0)
        if not self.sign_history or self.sign_history[-1] != sign:
            self.sign_history.append(sign)
        if sign != 0:
            if by_fill and self.last_sign != 0 and sign != self.last_sign:
                self.flipped = True
            self.last_sign = sign


@dataclass
class Account:
    api_key: str
    secret: str
    hedge_mode: bool = False
    futures_wallet: Decimal = Decimal("100000")
    # asset -> [free, locked]
    balances: dict[str, list[Decimal]] = field(default_factory=dict)
    positions: dict[tuple[str, str], Position] = field(default_factory=dict)
    orders: dict[int, Order] = field(default_factory=dict)  # every order ever accepted
    fills: list[Fill] = field(default_factory=list)
    countdowns: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    update_time: int = field(default_factory=now_ms)

    def position(self, symbol: str, side: str) -> Position:
        key = (symbol, side)
        if key not in self.positions:
            self.positions[key] = Position(symbol, side)
        return self.positions[key]

    def balance(self, asset: str) -> list[Decimal]:
        return self.balances.setdefault(asset, [ZERO, ZERO])


@dataclass
class NewOrder:
    """A parsed order request, independent of the HTTP dialect it came from."""

    venue: Venue
    symbol: str
    side: str
    type: str
    qty: Decimal | None
    price: Decimal | None = None
    time_in_force: str | None = None
    client_order_id: str | None = None
    reduce_only: bool | None = None  # None = parameter not sent
    position_side: str | None = None
    close_position: bool = False
    trigger_price: Decimal | None = None
    quote_qty: Decimal | None = None  # spot market buys by cost
    liquidity: Decimal | None = None
    """Share of a market order the book can fill (fault injection); the rest expires."""


class Engine:
    def __init__(self, prices: PriceProcess, id_seed: int = 0) -> None:
        self.prices = prices
        self.accounts: dict[str, Account] = {}
        # Ids start at a seed-dependent offset so they look like a venue's, yet stay deterministic.
        self._next_id = 4_000_000_000 + id_seed * 1_000_000
        self._next_trade = 100_000_000 + id_seed * 1_000_000
        self._open: dict[tuple[Venue, str], dict[int, Order]] = {}
        self._client_seq = 0
        # (account, venue, algo) -> client id -> order: the "unique among open orders" rule.
        self._open_cids: dict[tuple[str, Venue, bool], dict[str, Order]] = {}

    # ---- ids -------------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _gen_client_id(self, prefix: str) -> str:
        self._client_seq += 1
        return f"{prefix}{self._client_seq:022d}"

    # ---- accounts --------------------------------------------------------------------------
    def add_account(self, account: Account) -> Account:
        if account.api_key in self.accounts:
            raise VenueError(-1, "account exists", 409)
        self.accounts[account.api_key] = account
        return account

    def account(self, api_key: str) -> Account:
        try:
            return self.accounts[api_key]
        except KeyError:
            raise VenueError(
                -2015, "Invalid API-key, IP, or permissions for action.", 401
            ) from None

    # ---- queries ---------------------------------------------------------------------------
    def open_orders(
        self, acct: Account, venue: Venue, symbol: str | None, algo: bool = False
    ) -> list[Order]:
        books: Iterable[dict[int, Order]]
        if symbol is not None:
            books = [self._open.get((venue, symbol), {})]
        else:
            books = [b for (v, _), b in self._open.items() if v == venue]
        out = [
            o for b in books for o in b.values() if o.account == acct.api_key and o.is_algo == algo
        ]
        return sorted(out, key=lambda o: o.order_id)

    def find_order(
        self,
        acct: Account,
        venue: Venue,
        symbol: str,
        order_id: int | None,
        client_id: str | None,
        algo: bool = False,
    ) -> Order | None:
        if order_id is not None:
            o = acct.orders.get(order_id)
            if o and o.venue == venue and o.symbol == symbol and o.is_algo == algo:
                return o
            return None
        # Client ids may be reused once closed: the most recent order with the id wins.
        for o in reversed(acct.orders.values()):
            if (
                o.client_order_id == client_id
                and o.venue == venue
                and o.symbol == symbol
                and o.is_algo == algo
            ):
                return o
        return None

    # ---- order entry -----------------------------------------------------------------------
    def market(self, symbol: str) -> Market:
        m = BY_SYMBOL.get(symbol)
        if m is None:
            raise VenueError(-1121, "Invalid symbol.")
        return m

    def submit(
        self, acct: Account, req: NewOrder, *, seeded: bool = False, seeded_filled: Decimal = ZERO
    ) -> Order:
        """Validate like Binance, accept, and match immediately if marketable.

        ``seeded`` (admin): spot funds are locked without being taken from free balances.
        """
        m = self.market(req.symbol)
        if req.side not in ("BUY", "SELL"):
            raise VenueError(-1117, "Invalid side.")
        if req.venue == "futures":
            self._check_futures(acct, m, req)
        else:
            self._check_spot(acct, m, req)
        algo = req.trigger_price is not None and req.venue == "futures"
        prefix = ("x-algo" if algo else "x-fut") if req.venue == "futures" else "x-spot"
        cid = req.client_order_id or self._gen_client_id(prefix)
        if cid in self._open_cids.get((acct.api_key, req.venue, algo), {}):
            if req.venue == "futures":
                raise VenueError(-4116, "ClientOrderId is duplicated.")
            raise VenueError(-2010, "Duplicate order sent.")
        order = Order(
            order_id=self._new_id(),
            account=acct.api_key,
            venue=req.venue,
            symbol=req.symbol,
            side=req.side,
            type=req.type,
            qty=req.qty or ZERO,
            price=req.price,
            client_order_id=cid,
            time_in_force=req.time_in_force or "GTC",
            reduce_only=bool(req.reduce_only),
            position_side=req.position_side or "BOTH",
            close_position=req.close_position,
            trigger_price=req.trigger_price,
            is_algo=algo,
            liquidity=req.liquidity,
        )
        if req.venue == "spot":
            self._lock_spot(acct, m, order, req, seeded=seeded)
        acct.orders[order.order_id] = order
        if seeded_filled > 0:
            order.filled = min(seeded_filled, order.qty)
            order.cum_quote = order.filled * (order.price or ZERO)
            order.status = "PARTIALLY_FILLED" if order.filled < order.qty else "FILLED"
            if order.venue == "spot" and order.side == "BUY":
                order.locked = order.remaining * (order.price or ZERO)
        if order.is_open:
            self._open.setdefault((order.venue, order.symbol), {})[order.order_id] = order
            self._open_cids.setdefault((acct.api_key, order.venue, algo), {})[cid] = order
        if not algo and order.status == "NEW":
            self._match_new(acct, m, order)
        return order

    def _check_lot(self, m: Market, qty: Decimal, venue: Venue) -> None:
        if qty <= 0:
            raise VenueError(
                -4003 if venue == "futures" else -1013, "Quantity less than or equal to zero."
            )
        if qty % m.step != 0:
            if venue == "futures":
                raise VenueError(-1111, "Precision is over the maximum defined for this asset.")
            raise VenueError(-1013, "Filter failure: LOT_SIZE")
        if qty < m.min_qty:
            raise VenueError(-1013, "Filter failure: LOT_SIZE")

    def _check_price(self, m: Market, price: Decimal, venue: Venue) -> None:
        if price <= 0 or price % m.tick != 0:
            if venue == "futures":
                raise VenueError(-4014, "Price not increased by tick size.")
            raise VenueError(-1013, "Filter failure: PRICE_FILTER")

    def _check_futures(self, acct: Account, m: Market, req: NewOrder) -> None:
        if req.type not in (
            "LIMIT",
            "MARKET",
            "STOP",
            "STOP_MARKET",
            "TAKE_PROFIT",
            "TAKE_PROFIT_MARKET",
        ):
            raise VenueError(-1116, "Invalid orderType.")
        if acct.hedge_mode:
            if req.reduce_only is not None:
                raise VenueError(-1106, "Parameter 'reduceonly' sent when not required.")
            if req.position_side not in ("LONG", "SHORT"):
                raise VenueError(-4061, "Order's position side does not match user's setting.")
        elif req.position_side not in (None, "BOTH"):
            raise VenueError(-4061, "Order's position side does not match user's setting.")
        if req.qty is None and not req.close_position:
            raise VenueError(
                -1102, "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed."
            )
        if req.qty is not None:
            self._check_lot(m, req.qty, "futures")
        if req.type in ("LIMIT", "STOP", "TAKE_PROFIT"):
            if req.price is None:
                raise VenueError(
                    -1102, "Mandatory parameter 'price' was not sent, was empty/null, or malformed."
                )
            self._check_price(m, req.price, "futures")
            if req.type == "LIMIT" and req.time_in_force is None:
                raise VenueError(
                    -1102,
                    "Mandatory parameter 'timeinforce' was not sent, was empty/null, or malformed.",
                )
        if req.type != "LIMIT" and req.type != "MARKET" and req.trigger_price is None:
            raise VenueError(
                -1102,
                "Mandatory parameter 'triggerprice' was not sent, was empty/null, or malformed.",
            )
        if req.trigger_price is not None:
            return  # conditional orders are checked again when they trigger
        closing = self._closing_qty(acct, req)
        if closing is not None and closing == 0:
            raise VenueError(-2022, "ReduceOnly Order is rejected.")
        if closing is None:
            ref = req.price or self.prices.prices[m.symbol]
            if (req.qty or ZERO) * ref < m.futures_min_notional:
                raise VenueError(
                    -4164,
                    f"Order's notional must be no smaller than {m.futures_min_notional} "
                    "(unless you choose reduce only).",
                )

    def _closing_qty(self, acct: Account, req: NewOrder | Order) -> Decimal | None:
        """How much this order may trade if it is position-reducing; None if it may open."""
        if acct.hedge_mode:
            side = req.position_side
            closing = (side == "LONG" and req.side == "SELL") or (
                side == "SHORT" and req.side == "BUY"
            )
            if not closing:
                return None
            return abs(acct.position(req.symbol, side or "BOTH").qty)
        if not req.reduce_only:
            return None
        pos = acct.position(req.symbol, "BOTH").qty
        reduces = (pos > 0 and req.side == "SELL") or (pos < 0 and req.side == "BUY")
        return abs(pos) if reduces else ZERO

    def _check_spot(self, acct: Account, m: Market, req: NewOrder) -> None:
        if req.type not in ("LIMIT", "MARKET", "LIMIT_MAKER"):
            raise VenueError(-1116, "Invalid orderType.")
        if req.reduce_only is not None or req.position_side is not None:
            raise VenueError(
                -1104, "Not all sent parameters were read; read 8 parameter(s) but was sent 9."
            )
        if req.type == "MARKET" and req.quote_qty is not None and req.side == "BUY":
            if req.quote_qty < m.spot_min_notional:
                raise VenueError(-1013, "Filter failure: NOTIONAL")
            return
        if req.qty is None:
            raise VenueError(
                -1102, "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed."
            )
        self._check_lot(m, req.qty, "spot")
        if req.type != "MARKET":
            if req.price is None:
                raise VenueError(
                    -1102, "Mandatory parameter 'price' was not sent, was empty/null, or malformed."
                )
            self._check_price(m, req.price, "spot")
            if req.type == "LIMIT" and req.time_in_force is None:
                raise VenueError(
                    -1102,
                    "Mandatory parameter 'timeInForce' was not sent, was empty/null, or malformed.",
                )
        ref = req.price or self.prices.prices[m.symbol]
        if req.qty * ref < m.spot_min_notional:
            raise VenueError(-1013, "Filter failure: NOTIONAL")

    def _lock_spot(
        self, acct: Account, m: Market, order: Order, req: NewOrder, seeded: bool
    ) -> None:
        """Lock what the order may spend; seeded orders bring their own locked funds."""
        if order.type == "MARKET" and order.side == "BUY" and req.quote_qty is not None:
            ask = self._ask(m)
            order.qty = (req.quote_qty / ask).quantize(m.step, ROUND_DOWN)
            self._check_lot(m, order.qty, "spot")
        if order.side == "BUY":
            need = order.qty * (
                order.price if order.type != "MARKET" and order.price else self._ask(m)
            )
            asset = m.quote
        else:
            need = order.qty
            asset = m.base
        bal = acct.balance(asset)
        if not seeded and bal[0] < need:
            raise VenueError(-2010, "Account has insufficient balance for requested action.")
        if not seeded:
            bal[0] -= need
        bal[1] += need
        order.locked = need

    # ---- matching --------------------------------------------------------------------------
    def _ask(self, m: Market) -> Decimal:
        p = self.prices.prices[m.symbol]
        return p + self.prices.half_spread(m.symbol, m.tick)

    def _bid(self, m: Market) -> Decimal:
        p = self.prices.prices[m.symbol]
        return max(m.tick, p - self.prices.half_spread(m.symbol, m.tick))

    def _match_new(self, acct: Account, m: Market, order: Order) -> None:
        touch = self._ask(m) if order.side == "BUY" else self._bid(m)
        if order.type == "MARKET":
            qty = order.remaining
            if order.liquidity is not None:
                # A thin book: only part fills and the rest expires, as on Binance.
                qty = max(m.step, (qty * order.liquidity).quantize(m.step, ROUND_DOWN))
            self._fill(acct, m, order, min(qty, order.remaining), touch, maker=False)
            if order.is_open:  # capped by reduce-only: the rest expires, as Binance does
                self._close(order, "EXPIRED")
            return
        assert order.price is not None
        marketable = order.price >= touch if order.side == "BUY" else order.price <= touch
        if marketable and order.type == "LIMIT_MAKER":
            self._close(order, "EXPIRED")
            raise VenueError(-2010, "Order would immediately match and take.")
        if marketable and order.time_in_force == "GTX":
            self._close(order, "EXPIRED")
            raise VenueError(
                -5022,
                "Due to the order could not be executed as maker, "
                "the Post Only order will be rejected.",
            )
        if marketable:
            self._fill(acct, m, order, order.remaining, touch, maker=False)
        if order.is_open and order.time_in_force in ("IOC", "FOK"):
            self._close(order, "EXPIRED")

    def on_price(self, symbol: str, price: Decimal) -> None:
        """Called for every tick: rest orders fill partially once crossed, triggers fire."""
        m = BY_SYMBOL[symbol]
        for venue in ("spot", "futures"):
            book = self._open.get((venue, symbol))
            if not book:
                continue
            for order in sorted(book.values(), key=lambda o: o.order_id):
                if not order.is_open:
                    continue
                acct = self.accounts[order.account]
                if order.is_algo:
                    self._maybe_trigger(acct, m, order, price)
                    continue
                if order.price is None:
                    continue
                crossed = price <= order.price if order.side == "BUY" else price >= order.price
                if crossed:
                    part = (order.remaining * PARTIAL_FRACTION).quantize(m.step, ROUND_DOWN)
                    self._fill(acct, m, order, max(part, m.step), order.price, maker=True)

    def _maybe_trigger(self, acct: Account, m: Market, algo: Order, price: Decimal) -> None:
        assert algo.trigger_price is not None
        up = price >= algo.trigger_price
        down = price <= algo.trigger_price
        stop = algo.type in ("STOP", "STOP_MARKET")
        fire = (
            (up if algo.side == "BUY" else down) if stop else (down if algo.side == "BUY" else up)
        )
        if not fire:
            return
        qty = algo.qty
        if algo.close_position:
            qty = abs(acct.position(algo.symbol, algo.position_side).qty)
        child = NewOrder(
            venue="futures",
            symbol=algo.symbol,
            side=algo.side,
            type="MARKET" if algo.type.endswith("MARKET") else "LIMIT",
            qty=qty,
            price=None if algo.type.endswith("MARKET") else algo.price,
            time_in_force=None if algo.type.endswith("MARKET") else "GTC",
            reduce_only=(algo.reduce_only or algo.close_position) if not acct.hedge_mode else None,
            position_side=algo.position_side if acct.hedge_mode else None,
        )
        self._close(algo, "FINISHED")
        try:
            algo.actual_order_id = self.submit(acct, child).order_id
        except VenueError:
            algo.status = "REJECTED"

    def _fill(
        self, acct: Account, m: Market, order: Order, qty: Decimal, price: Decimal, maker: bool
    ) -> None:
        qty = min(qty, order.remaining)
        if order.venue == "futures":
            cap = self._closing_qty(acct, order)
            if cap is not None:
                qty = min(qty, cap)
            if qty <= 0:
                # A reduce-only order with nothing left to reduce is expired by the venue.
                self._close(order, "EXPIRED")
                return
            self._move_position(acct, order, qty, price)
        else:
            self._move_balances(acct, m, order, qty, price)
        order.filled += qty
        order.cum_quote += qty * price
        order.update_time = now_ms()
        order.status = "FILLED" if order.remaining <= 0 else "PARTIALLY_FILLED"
        self._next_trade += 1
        acct.fills.append(
            Fill(
                self._next_trade,
                order.order_id,
                acct.api_key,
                order.venue,
                order.symbol,
                order.side,
                qty,
                price,
                order.position_side,
                order.update_time,
                maker,
            )
        )
        if not order.is_open:
            self._close(order, order.status)

    def _move_position(self, acct: Account, order: Order, qty: Decimal, price: Decimal) -> None:
        pos = acct.position(order.symbol, order.position_side)
        delta = qty if order.side == "BUY" else -qty
        old = pos.qty
        new = old + delta
        if old == 0 or (old > 0) == (delta > 0):
            pos.entry_price = (abs(old) * pos.entry_price + qty * price) / abs(new)
        else:
            closed = min(abs(delta), abs(old))
            pnl = (price - pos.entry_price) * closed * (1 if old > 0 else -1)
            acct.futures_wallet += pnl
            if new == 0:
                pos.entry_price = ZERO
            elif (new > 0) != (old > 0):
                pos.entry_price = price
        pos.qty = new
        pos.update_time = now_ms()
        pos.record_sign(by_fill=True)

    def _move_balances(
        self, acct: Account, m: Market, order: Order, qty: Decimal, price: Decimal
    ) -> None:
        base, quote = acct.balance(m.base), acct.balance(m.quote)
        if order.side == "BUY":
            reserved = qty * (order.price if order.type != "MARKET" and order.price else price)
            reserved = min(reserved, order.locked)
            quote[1] -= reserved
            order.locked -= reserved
            quote[0] += reserved - qty * price  # price improvement goes back to free
            base[0] += qty
        else:
            base[1] -= qty
            order.locked -= qty
            quote[0] += qty * price
        acct.update_time = now_ms()

    def _close(self, order: Order, status: str) -> None:
        order.status = status
        order.update_time = now_ms()
        self._open.get((order.venue, order.symbol), {}).pop(order.order_id, None)
        cids = self._open_cids.get((order.account, order.venue, order.is_algo), {})
        if cids.get(order.client_order_id) is order:
            del cids[order.client_order_id]
        if order.venue == "spot" and order.locked > 0:
            m = BY_SYMBOL[order.symbol]
            bal = self.accounts[order.account].balance(m.quote if order.side == "BUY" else m.base)
            bal[1] -= order.locked
            bal[0] += order.locked
            order.locked = ZERO

    # ---- cancels ---------------------------------------------------------------------------
    def cancel(self, acct: Account, order: Order | None, race: str | None = None) -> Order:
        """Cancel one open order; ``race`` lets a fill land first (fault injection)."""
        if order is None or not order.is_open:
            raise VenueError(-2011, "Unknown order sent.")
        if race and not order.is_algo:
            m = BY_SYMBOL[order.symbol]
            px = order.price or self.prices.prices[order.symbol]
            qty = order.remaining
            if race == "partial":
                qty = max(m.step, (qty / 2).quantize(m.step, ROUND_DOWN))
            self._fill(acct, m, order, qty, px, maker=True)
            if not order.is_open:
                raise VenueError(-2011, "Unknown order sent.")
        self._close(order, "CANCELED")
        return order

    def cancel_symbol(
        self, acct: Account, venue: Venue, symbol: str, algo: bool = False, race: str | None = None
    ) -> list[Order]:
        """Cancel every open order of the symbol; orders a racing fill completed are skipped."""
        done = []
        for o in self.open_orders(acct, venue, symbol, algo=algo):
            try:
                done.append(self.cancel(acct, o, race=race))
            except VenueError:
                continue
        return done

    def set_countdown(self, acct: Account, symbol: str, ms: int) -> None:
        """Binance's dead-man switch: every call re-arms; 0 disarms."""
        old = acct.countdowns.pop(symbol, None)
        if old is not None:
            old.cancel()
        if ms > 0:
            loop = asyncio.get_running_loop()
            acct.countdowns[symbol] = loop.call_later(
                ms / 1000, self._countdown_fired, acct, symbol
            )

    def _countdown_fired(self, acct: Account, symbol: str) -> None:
        acct.countdowns.pop(symbol, None)
        self.cancel_symbol(acct, "futures", symbol)

    # ---- admin -----------------------------------------------------------------------------
    def set_position(
        self, acct: Account, symbol: str, side: str, qty: Decimal, entry: Decimal
    ) -> Position:
        self.market(symbol)
        pos = acct.position(symbol, side)
        pos.qty = qty
        pos.entry_price = entry if qty != 0 else ZERO
        pos.update_time = now_ms()
        pos.record_sign(by_fill=False)
        return pos

    def tick(self) -> None:
        self.prices.step(self.on_price)

    def mark(self, symbol: str) -> Decimal:
        return self.prices.prices[symbol]
