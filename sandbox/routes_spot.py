"""Spot REST (``api.binance.com/api/v3/...``): the requests ccxt's binance makes for spot."""

from __future__ import annotations

import secrets
import zlib
from decimal import Decimal

from sandbox.context import Ctx, Route, ping, server_time
from sandbox.engine import Fill, NewOrder, Order, VenueError, now_ms
from sandbox.markets import BY_SYMBOL, spot_exchange_info

E8 = Decimal("0.00000001")


def _f8(d: Decimal) -> str:
    # Spot answers carry 8 decimals, unlike futures.
    return f"{d.quantize(E8):f}"


def render_order(
    o: Order, fills: list[Fill] | None = None, resp: str = "FULL"
) -> dict[str, object]:
    out: dict[str, object] = {
        "symbol": o.symbol,
        "orderId": o.order_id,
        "orderListId": -1,
        "clientOrderId": o.client_order_id,
        "transactTime": o.update_time,
    }
    if resp == "ACK":
        return out
    out.update(
        {
            "price": _f8(o.price or Decimal(0)),
            "origQty": _f8(o.qty),
            "executedQty": _f8(o.filled),
            "origQuoteOrderQty": _f8(Decimal(0)),
            "cummulativeQuoteQty": _f8(o.cum_quote),
            "status": o.status,
            "timeInForce": o.time_in_force,
            "type": o.type,
            "side": o.side,
            "workingTime": o.time,
            "selfTradePreventionMode": "EXPIRE_MAKER",
        }
    )
    if resp == "FULL" and fills is not None:
        quote = BY_SYMBOL[o.symbol].quote
        out["fills"] = [
            {
                "price": _f8(f.price),
                "qty": _f8(f.qty),
                "commission": _f8(Decimal(0)),
                "commissionAsset": quote,
                "tradeId": f.trade_id,
            }
            for f in fills
        ]
    return out


def render_query(o: Order) -> dict[str, object]:
    out = render_order(o, resp="RESULT")
    del out["transactTime"]
    out.update(
        {
            "stopPrice": _f8(Decimal(0)),
            "icebergQty": _f8(Decimal(0)),
            "time": o.time,
            "updateTime": o.update_time,
            "isWorking": True,
        }
    )
    return out


def render_cancel(o: Order, cancel_cid: str) -> dict[str, object]:
    # Binance echoes the cancel request's own id as clientOrderId, the order's as origClientOrderId.
    out = render_order(o, resp="RESULT")
    del out["transactTime"]
    out["origClientOrderId"] = o.client_order_id
    out["clientOrderId"] = cancel_cid
    out["transactTime"] = now_ms()
    return out


def exchange_info(ctx: Ctx) -> object:
    return spot_exchange_info(now_ms(), ctx.weight_limit)


def new_order(ctx: Ctx) -> object:
    sym = ctx.symbol()
    assert sym is not None
    req = NewOrder(
        venue="spot",
        symbol=sym,
        side=ctx.need("side"),
        type=ctx.need("type"),
        qty=ctx.dec("quantity"),
        price=ctx.dec("price"),
        time_in_force=ctx.str("timeInForce"),
        client_order_id=ctx.str("newClientOrderId"),
        reduce_only=ctx.bool("reduceOnly"),
        position_side=ctx.str("positionSide"),
        quote_qty=ctx.dec("quoteOrderQty"),
        liquidity=ctx.liquidity,
    )
    before = len(ctx.acct.fills)
    o = ctx.engine.submit(ctx.acct, req)
    fills = [f for f in ctx.acct.fills[before:] if f.order_id == o.order_id]
    return render_order(o, fills, resp=ctx.str("newOrderRespType") or "FULL")


def _lookup(ctx: Ctx) -> Order | None:
    sym = ctx.symbol()
    assert sym is not None
    oid = ctx.int("orderId")
    cid = ctx.str("origClientOrderId")
    if oid is None and cid is None:
        raise VenueError(
            -1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!"
        )
    return ctx.engine.find_order(ctx.acct, "spot", sym, oid, cid)


def get_order(ctx: Ctx) -> object:
    o = _lookup(ctx)
    if o is None:
        raise VenueError(-2013, "Order does not exist.")
    return render_query(o)


def cancel_order(ctx: Ctx) -> object:
    o = ctx.engine.cancel(ctx.acct, _lookup(ctx), race=ctx.race)
    return render_cancel(o, ctx.str("newClientOrderId") or secrets.token_hex(11))


def open_orders(ctx: Ctx) -> object:
    return [
        render_query(o)
        for o in ctx.engine.open_orders(ctx.acct, "spot", ctx.symbol(required=False))
    ]


def cancel_open(ctx: Ctx) -> object:
    sym = ctx.symbol()
    assert sym is not None
    cancelled = ctx.engine.cancel_symbol(ctx.acct, "spot", sym, race=ctx.race)
    if not cancelled:
        raise VenueError(-2011, "Unknown order sent.")
    return [render_cancel(o, secrets.token_hex(11)) for o in cancelled]


def account(ctx: Ctx) -> object:
    acct = ctx.acct
    return {
        "makerCommission": 10,
        "takerCommission": 10,
        "buyerCommission": 0,
        "sellerCommission": 0,
        "commissionRates": {
            "maker": "0.00100000",
            "taker": "0.00100000",
            "buyer": "0",
            "seller": "0",
        },
        "canTrade": True,
        "canWithdraw": True,
        "canDeposit": True,
        "brokered": False,
        "requireSelfTradePrevention": False,
        "preventSor": False,
        "updateTime": acct.update_time,
        "accountType": "SPOT",
        "balances": [
            {"asset": a, "free": _f8(b[0]), "locked": _f8(b[1])}
            for a, b in sorted(acct.balances.items())
        ],
        "permissions": ["SPOT"],
        "uid": zlib.crc32(acct.api_key.encode()),
    }


ROUTES = [
    Route("GET", "/api/v3/exchangeInfo", exchange_info, signed=False),
    Route("GET", "/api/v3/time", server_time, signed=False),
    Route("GET", "/api/v3/ping", ping, signed=False),
    Route("POST", "/api/v3/order", new_order),
    Route("GET", "/api/v3/order", get_order),
    Route("DELETE", "/api/v3/order", cancel_order),
    Route("GET", "/api/v3/openOrders", open_orders),
    Route("DELETE", "/api/v3/openOrders", cancel_open),
    Route("GET", "/api/v3/account", account),
]
