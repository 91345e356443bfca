"""The instrument table: ~30 USDT pairs listed both as spot pairs and as USDⓈ-M perpetuals."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Market:
    """One base asset against USDT; spot and perpetual share tick/step so tests can reuse sizes."""

    base: str
    start_price: Decimal
    tick: Decimal
    step: Decimal
    futures_min_notional: Decimal
    spot_min_notional: Decimal = Decimal("5")
    quote: str = "USDT"

    @property
    def symbol(self) -> str:
        return f"{self.base}{self.quote}"

    @property
    def min_qty(self) -> Decimal:
        return self.step

    @property
    def price_precision(self) -> int:
        return _decimals(self.tick)

    @property
    def qty_precision(self) -> int:
        return _decimals(self.step)


def _decimals(d: Decimal) -> int:
    return max(0, -d.normalize().as_tuple().exponent)  # type: ignore[operator]


def _m(base: str, price: str, tick: str, step: str, fut_notional: str = "5") -> Market:
    return Market(base, Decimal(price), Decimal(tick), Decimal(step), Decimal(fut_notional))


# Sizes follow Binance's real filters closely enough that precision bugs show up here first.
MARKETS: tuple[Market, ...] = (
    _m("BTC", "65000", "0.1", "0.001", "100"),
    _m("ETH", "3200", "0.01", "0.001", "20"),
    _m("SOL", "150", "0.01", "0.01"),
    _m("BNB", "580", "0.01", "0.01"),
    _m("XRP", "0.52", "0.0001", "0.1"),
    _m("DOGE", "0.12", "0.00001", "1"),
    _m("ADA", "0.45", "0.0001", "1"),
    _m("AVAX", "28", "0.001", "0.1"),
    _m("LINK", "14", "0.001", "0.01"),
    _m("DOT", "6.5", "0.001", "0.1"),
    _m("TRX", "0.12", "0.00001", "1"),
    _m("LTC", "75", "0.01", "0.001"),
    _m("BCH", "380", "0.01", "0.001"),
    _m("NEAR", "5", "0.001", "1"),
    _m("ATOM", "7", "0.001", "0.01"),
    _m("UNI", "8", "0.001", "1"),
    _m("ETC", "22", "0.001", "0.01"),
    _m("FIL", "4.5", "0.001", "0.1"),
    _m("APT", "8", "0.0001", "0.1"),
    _m("ARB", "0.8", "0.0001", "0.1"),
    _m("OP", "1.6", "0.0001", "0.1"),
    _m("SUI", "1.2", "0.0001", "0.1"),
    _m("INJ", "22", "0.001", "0.1"),
    _m("AAVE", "150", "0.01", "0.1"),
    _m("XLM", "0.1", "0.00001", "1"),
    _m("HBAR", "0.07", "0.00001", "1"),
    _m("ICP", "9", "0.001", "1"),
    _m("TON", "5", "0.0001", "0.1"),
    _m("WLD", "2", "0.0001", "0.1"),
    _m("SEI", "0.4", "0.0001", "1"),
)

BY_SYMBOL: dict[str, Market] = {m.symbol: m for m in MARKETS}

SPOT_ORDER_TYPES = [
    "LIMIT",
    "LIMIT_MAKER",
    "MARKET",
    "STOP_LOSS",
    "STOP_LOSS_LIMIT",
    "TAKE_PROFIT",
    "TAKE_PROFIT_LIMIT",
]
FUTURES_ORDER_TYPES = [
    "LIMIT",
    "MARKET",
    "STOP",
    "STOP_MARKET",
    "TAKE_PROFIT",
    "TAKE_PROFIT_MARKET",
    "TRAILING_STOP_MARKET",
]


def fmt(d: Decimal) -> str:
    """Binance sends decimals as plain strings, never in exponent form."""
    s = f"{d.normalize():f}"
    return "0" if s in ("-0", "") else s


def _rate_limits(weight: int) -> list[dict[str, object]]:
    return [
        {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": weight,
        },
        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300},
        {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
    ]


def spot_exchange_info(now_ms: int, weight_limit: int) -> dict[str, object]:
    symbols = []
    for m in MARKETS:
        symbols.append(
            {
                "symbol": m.symbol,
                "status": "TRADING",
                "baseAsset": m.base,
                "baseAssetPrecision": 8,
                "quoteAsset": m.quote,
                "quotePrecision": 8,
                "quoteAssetPrecision": 8,
                "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8,
                "orderTypes": SPOT_ORDER_TYPES,
                "icebergAllowed": True,
                "ocoAllowed": True,
                "quoteOrderQtyMarketAllowed": True,
                "allowTrailingStop": True,
                "cancelReplaceAllowed": True,
                "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False,
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": fmt(m.tick),
                        "maxPrice": "1000000",
                        "tickSize": fmt(m.tick),
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "minQty": fmt(m.min_qty),
                        "maxQty": "9000000",
                        "stepSize": fmt(m.step),
                    },
                    {
                        "filterType": "MARKET_LOT_SIZE",
                        "minQty": "0",
                        "maxQty": "900000",
                        "stepSize": "0",
                    },
                    {
                        "filterType": "NOTIONAL",
                        "minNotional": fmt(m.spot_min_notional),
                        "applyMinToMarket": True,
                        "maxNotional": "9000000",
                        "applyMaxToMarket": False,
                        "avgPriceMins": 5,
                    },
                    {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
                ],
                "permissions": [],
                "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
            }
        )
    return {
        "timezone": "UTC",
        "serverTime": now_ms,
        "rateLimits": _rate_limits(weight_limit),
        "exchangeFilters": [],
        "symbols": symbols,
    }


def futures_exchange_info(now_ms: int, weight_limit: int) -> dict[str, object]:
    symbols = []
    for m in MARKETS:
        symbols.append(
            {
                "symbol": m.symbol,
                "pair": m.symbol,
                "contractType": "PERPETUAL",
                "deliveryDate": 4133404800000,
                "onboardDate": 1569398400000,
                "status": "TRADING",
                "maintMarginPercent": "2.5000",
                "requiredMarginPercent": "5.0000",
                "baseAsset": m.base,
                "quoteAsset": m.quote,
                "marginAsset": m.quote,
                "pricePrecision": m.price_precision,
                "quantityPrecision": m.qty_precision,
                "baseAssetPrecision": 8,
                "quotePrecision": 8,
                "underlyingType": "COIN",
                "underlyingSubType": [],
                "settlePlan": 0,
                "triggerProtect": "0.0500",
                "liquidationFee": "0.012500",
                "marketTakeBound": "0.05",
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": fmt(m.tick),
                        "maxPrice": "4529764",
                        "tickSize": fmt(m.tick),
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "minQty": fmt(m.min_qty),
                        "maxQty": "1000000",
                        "stepSize": fmt(m.step),
                    },
                    {
                        "filterType": "MARKET_LOT_SIZE",
                        "minQty": fmt(m.min_qty),
                        "maxQty": "120000",
                        "stepSize": fmt(m.step),
                    },
                    {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                    {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
                    {"filterType": "MIN_NOTIONAL", "notional": fmt(m.futures_min_notional)},
                    {
                        "filterType": "PERCENT_PRICE",
                        "multiplierUp": "1.0500",
                        "multiplierDown": "0.9500",
                        "multiplierDecimal": "4",
                    },
                ],
                "orderTypes": FUTURES_ORDER_TYPES,
                "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
            }
        )
    return {
        "timezone": "UTC",
        "serverTime": now_ms,
        "futuresType": "U_MARGINED",
        "rateLimits": _rate_limits(weight_limit),
        "exchangeFilters": [],
        "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
        "symbols": symbols,
    }
