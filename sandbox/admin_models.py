"""Requests and answers of the admin API, shared by the server (admin.py) and admin_client.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaultRule(_Model):
    """One injected fault. ``match`` is ``"METHOD /path/glob"`` or a bare path glob (any method)."""

    kind: Literal[
        "latency",
        "http_error",
        "no_answer",
        "error_1007",
        "burst_429",
        "fill_races_cancel",
        "thin_book",
    ]
    match: str = "*"
    probability: float = Field(1.0, ge=0.0, le=1.0)
    """Chance that a matching request is hit, drawn from the fault RNG seeded by --seed."""
    max_count: int | None = None
    """Stop after this many hits (``1`` = only the next matching request); None = forever."""
    latency_ms: int = 0
    """latency: delay before the request is processed."""
    status: int = 503
    """http_error: HTTP status answered (plain-text body, request NOT applied)."""
    hold_s: float = 5.0
    """no_answer: the request is applied, then the connection is held this long and closed."""
    applied: bool = False
    """error_1007: whether the request was applied before answering -1007."""
    fill: Literal["full", "partial"] = "full"
    """fill_races_cancel: the order fills fully (cancel gets -2011) or half (rest cancelled)."""
    liquidity: float = Field(0.5, gt=0.0, le=1.0)
    """thin_book: share of a market order that fills (at least one lot); the rest expires."""
    api_key: str | None = None
    """Only requests signed by this account (None = every account)."""
    hits: int = 0
    """Read-only: how many requests this rule has hit so far."""


class FaultSet(_Model):
    rules: list[FaultRule]


class AccountCreate(_Model):
    """One account holds both spot balances and a USDⓈ-M futures wallet with positions."""

    api_key: str
    secret: str
    hedge_mode: bool = False
    spot_balances: dict[str, Decimal] = Field(default_factory=lambda: {"USDT": Decimal(100000)})
    futures_wallet: Decimal = Decimal(100000)


class SeedOrder(_Model):
    venue: Literal["spot", "futures"] = "futures"
    symbol: str
    side: Literal["BUY", "SELL"]
    qty: Decimal
    price: Decimal | None = None
    type: str = "LIMIT"
    """LIMIT, or STOP_MARKET / TAKE_PROFIT_MARKET / STOP / TAKE_PROFIT (futures conditional)."""
    trigger_price: Decimal | None = None
    filled_qty: Decimal = Decimal(0)
    """Makes the order PARTIALLY_FILLED without touching positions or balances."""
    client_order_id: str | None = None
    reduce_only: bool = False
    position_side: Literal["BOTH", "LONG", "SHORT"] | None = None
    close_position: bool = False


class SeedOrders(_Model):
    orders: list[SeedOrder]


class SeededIds(_Model):
    order_ids: list[int]


class PositionSet(_Model):
    symbol: str
    qty: Decimal
    """Signed: negative is short. Hedge-mode SHORT legs take a negative qty too."""
    entry_price: Decimal | None = None
    """Defaults to the current price."""
    position_side: Literal["BOTH", "LONG", "SHORT"] = "BOTH"


class PositionsSet(_Model):
    positions: list[PositionSet]


class BalancesSet(_Model):
    spot_balances: dict[str, Decimal] = Field(default_factory=dict)
    futures_wallet: Decimal | None = None


class PriceSet(_Model):
    symbol: str
    price: Decimal


class PriceControl(_Model):
    frozen: bool | None = None
    """Stop (True) or resume (False) the 200 ms ticker."""
    reset_seed: int | None = None
    """Restart every symbol's random walk from its start price with this seed."""
    step: int = 0
    """Advance the walk this many ticks now (matching runs after each), e.g. while frozen."""


class Prices(_Model):
    frozen: bool
    ticks: int
    prices: dict[str, Decimal]


class Limits(_Model):
    spot_weight_limit: int | None = None
    fapi_weight_limit: int | None = None
    ban_after: int | None = None
    ban_s: float | None = None


class OrderView(_Model):
    order_id: int
    client_order_id: str
    venue: Literal["spot", "futures"]
    symbol: str
    side: str
    type: str
    qty: Decimal
    price: Decimal | None
    filled_qty: Decimal
    avg_price: Decimal
    status: str
    reduce_only: bool
    position_side: str
    trigger_price: Decimal | None
    conditional: bool
    time: int
    update_time: int


class FillView(_Model):
    trade_id: int
    order_id: int
    venue: Literal["spot", "futures"]
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    position_side: str
    time: int
    maker: bool


class PositionView(_Model):
    symbol: str
    position_side: str
    qty: Decimal
    entry_price: Decimal
    flipped: bool
    """True if a fill EVER moved this position from one sign to the other."""
    sign_history: list[int]


class BalanceView(_Model):
    free: Decimal
    locked: Decimal


class AccountState(_Model):
    api_key: str
    hedge_mode: bool
    futures_wallet: Decimal
    spot_balances: dict[str, BalanceView]
    positions: list[PositionView]
    """Every position ever touched, including flat ones (their flags still matter)."""
    open_orders: list[OrderView]
    open_conditional_orders: list[OrderView]
    orders: list[OrderView]
    """Every order ever accepted, in acceptance order."""
    fills: list[FillView]
    countdowns: list[str]
    """Symbols with an armed countdownCancelAll timer."""


class RequestRecord(_Model):
    """One trading-API request as the venue saw it; times are wall-clock seconds (time.time())."""

    arrived: float
    """When it reached the venue, before any injected latency."""
    answered: float
    """When its answer was ready: a cancel or an order was applied by then."""
    method: str
    path: str
    status: int
    api_key: str | None


class RequestLog(_Model):
    records: list[RequestRecord]
    """Oldest first; the sandbox keeps the last 100,000 (cleared by ``POST /admin/stats/reset``)."""


class Stats(_Model):
    requests_by_endpoint: dict[str, int]
    requests_by_status: dict[str, int]
    count_429: int
    count_418: int
    used_weight: dict[str, int]
    """``"<ip> <pool>"`` -> weight used in the current minute."""
    limits: Limits
