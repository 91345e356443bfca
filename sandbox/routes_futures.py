"""USDⓈ-M futures REST (``fapi.binance.com/fapi/...``): the requests ccxt's binanceusdm makes."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from sandbox.context import Ctx, Route, ping, server_time
from sandbox.engine import Account, NewOrder, Order, Position, VenueError, now_ms
from sandbox.markets import BY_SYMBOL, MARKETS, fmt, futures_exchange_info

LEVERAGE = Decimal(20)
MAX_BATCH_CANCEL = 10
FUNDING_INTERVAL_MS = 8 * 3600 * 1000
FUNDING_RATE = "0.00010000"
"""The sandbox has no funding: every perpetual shows Binance's default interest rate."""


def render_order(o: Order) -> dict[str, object]:
    return {
        "orderId": o.order_id,
        "symbol": o.symbol,
        "status": o.status,
        "clientOrderId": o.client_order_id,
        "price": fmt(o.price or Decimal(0)),
        "avgPrice": fmt(o.avg_price),
        "origQty": fmt(o.qty),
        "executedQty": fmt(o.filled),
        "cumQty": fmt(o.filled),
        "cumQuote": fmt(o.cum_quote),
        "timeInForce": o.time_in_force,
        "type": o.type,
        "reduceOnly": o.reduce_only,
        "closePosition": o.close_position,
        "side": o.side,
        "positionSide": o.position_side,
        "stopPrice": "0",
        "workingType": "CONTRACT_PRICE",
        "priceProtect": False,
        "origType": o.type,
        "priceMatch": "NONE",
        "selfTradePreventionMode": "EXPIRE_MAKER",
        "goodTillDate": 0,
        "time": o.time,
        "updateTime": o.update_time,
    }


def render_algo(o: Order) -> dict[str, object]:
    return {
        "algoId": o.order_id,
        "clientAlgoId": o.client_order_id,
        "algoType": "CONDITIONAL",
        "orderType": o.type,
        "symbol": o.symbol,
        "side": o.side,
        "positionSide": o.position_side,
        "timeInForce": o.time_in_force,
        "quantity": fmt(o.qty),
        "algoStatus": o.status,
        "actualOrderId": str(o.actual_order_id or ""),
        "triggerPrice": fmt(o.trigger_price or Decimal(0)),
        "price": fmt(o.price or Decimal(0)),
        "icebergQuantity": None,
        "selfTradePreventionMode": "EXPIRE_MAKER",
        "workingType": "CONTRACT_PRICE",
        "priceMatch": "NONE",
        "closePosition": o.close_position,
        "priceProtect": False,
        "reduceOnly": o.reduce_only,
        "createTime": o.time,
        "updateTime": o.update_time,
        "triggerTime": 0,
        "goodTillDate": 0,
    }


def exchange_info(ctx: Ctx) -> object:
    return futures_exchange_info(now_ms(), ctx.weight_limit)


def _one_or_all(ctx: Ctx, row: Callable[[str], dict[str, object]]) -> object:
    """Binance's public tickers: an object for ``symbol``, else a list over every symbol."""
    sym = ctx.symbol(required=False)
    return row(sym) if sym is not None else [row(m.symbol) for m in MARKETS]


def premium_index(ctx: Ctx) -> object:
    """``GET /fapi/v1/premiumIndex``: mark price and funding (ccxt ``fetch_mark_price(s)``).

    The sandbox's one price per symbol is its mark; index and settle prices equal it.
    """
    now = now_ms()

    def row(sym: str) -> dict[str, object]:
        mark = fmt(ctx.engine.mark(sym))
        return {
            "symbol": sym,
            "markPrice": mark,
            "indexPrice": mark,
            "estimatedSettlePrice": mark,
            "lastFundingRate": FUNDING_RATE,
            "interestRate": FUNDING_RATE,
            "nextFundingTime": (now // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS,
            "time": now,
        }

    return _one_or_all(ctx, row)


def ticker_price(ctx: Ctx) -> object:
    """``GET /fapi/v1/ticker/price`` and ``/fapi/v2/ticker/price`` (ccxt ``fetch_last_prices``):
    the last price, which in the sandbox is the mark."""
    now = now_ms()
    return _one_or_all(
        ctx, lambda sym: {"symbol": sym, "price": fmt(ctx.engine.mark(sym)), "time": now}
    )


def _new_order(ctx: Ctx, algo: bool) -> NewOrder:
    sym = ctx.symbol()
    assert sym is not None
    key = "orderType" if algo and ctx.str("orderType") else "type"
    return NewOrder(
        venue="futures",
        symbol=sym,
        side=ctx.need("side"),
        type=ctx.need(key),
        qty=ctx.dec("quantity"),
        price=ctx.dec("price"),
        time_in_force=ctx.str("timeInForce"),
        client_order_id=ctx.str("clientAlgoId" if algo else "newClientOrderId"),
        reduce_only=ctx.bool("reduceOnly"),
        position_side=ctx.str("positionSide"),
        close_position=bool(ctx.bool("closePosition")),
        trigger_price=ctx.dec("triggerPrice") if algo else None,
        liquidity=ctx.liquidity,
    )


def new_order(ctx: Ctx) -> object:
    req = _new_order(ctx, algo=False)
    if req.type not in ("LIMIT", "MARKET"):
        # Since late 2025 Binance only accepts conditional orders on /fapi/v1/algoOrder.
        raise VenueError(
            -4120,
            "Order type not supported for this endpoint. "
            "Please use the Algo Order API endpoints instead.",
        )
    o = ctx.engine.submit(ctx.acct, req)
    if ctx.str("newOrderRespType") == "ACK":
        out = render_order(o)
        return {k: out[k] for k in ("orderId", "symbol", "status", "clientOrderId", "updateTime")}
    return render_order(o)


def _lookup(ctx: Ctx, algo: bool = False) -> Order | None:
    sym = ctx.symbol()
    assert sym is not None
    oid = ctx.int("algoId" if algo else "orderId")
    cid = ctx.str("clientAlgoId" if algo else "origClientOrderId")
    if oid is None and cid is None:
        raise VenueError(-1102, "Either orderId or origClientOrderId must be sent.")
    return ctx.engine.find_order(ctx.acct, "futures", sym, oid, cid, algo=algo)


def get_order(ctx: Ctx) -> object:
    o = _lookup(ctx)
    if o is None:
        raise VenueError(-2013, "Order does not exist.")
    return render_order(o)


def cancel_order(ctx: Ctx) -> object:
    return render_order(ctx.engine.cancel(ctx.acct, _lookup(ctx), race=ctx.race))


def batch_cancel(ctx: Ctx) -> object:
    sym = ctx.symbol()
    assert sym is not None
    ids = ctx.json_list("orderidlist") or ctx.json_list("orderIdList")
    cids = ctx.json_list("origclientorderidlist") or ctx.json_list("origClientOrderIdList")
    keys: list[tuple[int | None, str | None]] = [(int(i), None) for i in ids or []]
    keys += [(None, str(c)) for c in cids or []]
    if not keys:
        raise VenueError(
            -1102, "Mandatory parameter 'orderidlist' was not sent, was empty/null, or malformed."
        )
    if len(keys) > MAX_BATCH_CANCEL:
        raise VenueError(-4054, "The number of orders in a batch exceeds the limit of 10.")
    out: list[object] = []
    for oid, cid in keys:
        try:
            o = ctx.engine.find_order(ctx.acct, "futures", sym, oid, cid)
            out.append(render_order(ctx.engine.cancel(ctx.acct, o, race=ctx.race)))
        except VenueError as e:
            out.append({"code": e.code, "msg": e.msg})
    return out


def cancel_all(ctx: Ctx) -> object:
    sym = ctx.symbol()
    assert sym is not None
    ctx.engine.cancel_symbol(ctx.acct, "futures", sym, race=ctx.race)
    return {"code": 200, "msg": "The operation of cancel all open order is done."}


def open_orders(ctx: Ctx) -> object:
    return [
        render_order(o)
        for o in ctx.engine.open_orders(ctx.acct, "futures", ctx.symbol(required=False))
    ]


def _position_row(ctx: Ctx, p: Position) -> dict[str, object]:
    mark = ctx.engine.mark(p.symbol)
    notional = p.qty * mark
    upnl = (mark - p.entry_price) * p.qty
    im = abs(notional) / LEVERAGE
    return {
        "symbol": p.symbol,
        "positionSide": p.position_side,
        "positionAmt": fmt(p.qty),
        "entryPrice": fmt(p.entry_price),
        "breakEvenPrice": fmt(p.entry_price),
        "markPrice": fmt(mark),
        "unRealizedProfit": fmt(upnl.quantize(Decimal("0.00000001"))),
        "liquidationPrice": "0",
        "isolatedMargin": "0",
        "notional": fmt(notional.quantize(Decimal("0.00000001"))),
        "marginAsset": "USDT",
        "isolatedWallet": "0",
        "initialMargin": fmt(im.quantize(Decimal("0.00000001"))),
        "maintMargin": fmt((abs(notional) * Decimal("0.004")).quantize(Decimal("0.00000001"))),
        "positionInitialMargin": fmt(im.quantize(Decimal("0.00000001"))),
        "openOrderInitialMargin": "0",
        "adl": 0,
        "bidNotional": "0",
        "askNotional": "0",
        "updateTime": p.update_time,
    }


def _live_positions(acct: Account, symbol: str | None) -> list[Position]:
    return [
        p
        for (sym, _), p in sorted(acct.positions.items())
        if p.qty != 0 and (symbol is None or sym == symbol)
    ]


def position_risk(ctx: Ctx) -> object:
    sym = ctx.symbol(required=False)
    return [_position_row(ctx, p) for p in _live_positions(ctx.acct, sym)]


def account(ctx: Ctx) -> object:
    acct = ctx.acct
    rows = [_position_row(ctx, p) for p in _live_positions(acct, None)]
    upnl = sum((Decimal(str(r["unRealizedProfit"])) for r in rows), Decimal(0))
    im = sum((Decimal(str(r["initialMargin"])) for r in rows), Decimal(0))
    wallet = acct.futures_wallet
    avail = wallet + upnl - im
    asset = {
        "asset": "USDT",
        "walletBalance": fmt(wallet),
        "unrealizedProfit": fmt(upnl),
        "marginBalance": fmt(wallet + upnl),
        "maintMargin": "0",
        "initialMargin": fmt(im),
        "positionInitialMargin": fmt(im),
        "openOrderInitialMargin": "0",
        "crossWalletBalance": fmt(wallet),
        "crossUnPnl": fmt(upnl),
        "availableBalance": fmt(avail),
        "maxWithdrawAmount": fmt(avail),
        # ccxt skips assets whose updateTime is 0, so it must be a real timestamp.
        "updateTime": acct.update_time,
    }
    return {
        "totalInitialMargin": fmt(im),
        "totalMaintMargin": "0",
        "totalWalletBalance": fmt(wallet),
        "totalUnrealizedProfit": fmt(upnl),
        "totalMarginBalance": fmt(wallet + upnl),
        "totalPositionInitialMargin": fmt(im),
        "totalOpenOrderInitialMargin": "0",
        "totalCrossWalletBalance": fmt(wallet),
        "totalCrossUnPnl": fmt(upnl),
        "availableBalance": fmt(avail),
        "maxWithdrawAmount": fmt(avail),
        "assets": [asset],
        "positions": [
            {
                k: r[k]
                for k in (
                    "symbol",
                    "positionSide",
                    "positionAmt",
                    "unRealizedProfit",
                    "isolatedMargin",
                    "notional",
                    "isolatedWallet",
                    "initialMargin",
                    "maintMargin",
                    "updateTime",
                )
            }
            for r in rows
        ],
    }


def leverage_bracket(ctx: Ctx) -> object:
    sym = ctx.symbol(required=False)
    tiers = [
        (1, 50, 50_000, 0, "0.004"),
        (2, 25, 250_000, 50_000, "0.005"),
        (3, 10, 3_000_000, 250_000, "0.01"),
        (4, 5, 20_000_000, 3_000_000, "0.025"),
    ]
    brackets = [
        {
            "bracket": b,
            "initialLeverage": lev,
            "notionalCap": cap,
            "notionalFloor": floor,
            "maintMarginRatio": float(mmr),
            "cum": 0.0,
        }
        for b, lev, cap, floor, mmr in tiers
    ]
    syms = [sym] if sym else list(BY_SYMBOL)
    return [{"symbol": s, "notionalCoef": 1.0, "brackets": brackets} for s in syms]


def get_dual(ctx: Ctx) -> object:
    return {"dualSidePosition": ctx.acct.hedge_mode}


def set_dual(ctx: Ctx) -> object:
    want = ctx.bool("dualSidePosition")
    if want is None:
        raise VenueError(
            -1102,
            "Mandatory parameter 'dualSidePosition' was not sent, was empty/null, or malformed.",
        )
    acct = ctx.acct
    if want == acct.hedge_mode:
        raise VenueError(-4059, "No need to change position side.")
    if _live_positions(acct, None) or ctx.engine.open_orders(acct, "futures", None):
        raise VenueError(-4068, "Position side cannot be changed if there exists position.")
    acct.hedge_mode = want
    return {"code": 200, "msg": "success"}


def countdown(ctx: Ctx) -> object:
    sym = ctx.symbol()
    assert sym is not None
    ms = ctx.int("countdownTime")
    if ms is None or ms < 0:
        raise VenueError(
            -1102, "Mandatory parameter 'countdownTime' was not sent, was empty/null, or malformed."
        )
    ctx.engine.set_countdown(ctx.acct, sym, ms)
    return {"symbol": sym, "countdownTime": str(ms)}


def new_algo(ctx: Ctx) -> object:
    if ctx.str("algoType") != "CONDITIONAL":
        raise VenueError(
            -1102, "Mandatory parameter 'algoType' was not sent, was empty/null, or malformed."
        )
    req = _new_order(ctx, algo=True)
    if req.type in ("LIMIT", "MARKET"):
        raise VenueError(-1116, "Invalid orderType.")
    if req.trigger_price is None:
        raise VenueError(
            -1102, "Mandatory parameter 'triggerPrice' was not sent, was empty/null, or malformed."
        )
    return render_algo(ctx.engine.submit(ctx.acct, req))


def get_algo(ctx: Ctx) -> object:
    o = _lookup(ctx, algo=True)
    if o is None:
        raise VenueError(-2013, "Order does not exist.")
    return render_algo(o)


def cancel_algo(ctx: Ctx) -> object:
    o = ctx.engine.cancel(ctx.acct, _lookup(ctx, algo=True))
    return {
        "algoId": o.order_id,
        "clientAlgoId": o.client_order_id,
        "code": "200",
        "msg": "success",
    }


def open_algos(ctx: Ctx) -> object:
    sym = ctx.symbol(required=False)
    return [render_algo(o) for o in ctx.engine.open_orders(ctx.acct, "futures", sym, algo=True)]


def cancel_all_algos(ctx: Ctx) -> object:
    sym = ctx.symbol()
    assert sym is not None
    ctx.engine.cancel_symbol(ctx.acct, "futures", sym, algo=True)
    return {"code": 200, "msg": "The operation of cancel all open order is done."}


ROUTES = [
    Route("GET", "/fapi/v1/exchangeInfo", exchange_info, signed=False),
    Route("GET", "/fapi/v1/time", server_time, signed=False),
    Route("GET", "/fapi/v1/ping", ping, signed=False),
    Route("GET", "/fapi/v1/premiumIndex", premium_index, signed=False),
    Route("GET", "/fapi/v1/ticker/price", ticker_price, signed=False),
    Route("GET", "/fapi/v2/ticker/price", ticker_price, signed=False),
    Route("POST", "/fapi/v1/order", new_order),
    Route("GET", "/fapi/v1/order", get_order),
    Route("DELETE", "/fapi/v1/order", cancel_order),
    Route("DELETE", "/fapi/v1/batchOrders", batch_cancel),
    Route("DELETE", "/fapi/v1/allOpenOrders", cancel_all),
    Route("GET", "/fapi/v1/openOrders", open_orders),
    Route("GET", "/fapi/v3/positionRisk", position_risk),
    Route("GET", "/fapi/v2/positionRisk", position_risk),
    Route("GET", "/fapi/v3/account", account),
    Route("GET", "/fapi/v2/account", account),
    Route("GET", "/fapi/v1/leverageBracket", leverage_bracket),
    Route("GET", "/fapi/v1/positionSide/dual", get_dual),
    Route("POST", "/fapi/v1/positionSide/dual", set_dual),
    Route("POST", "/fapi/v1/countdownCancelAll", countdown),
    Route("POST", "/fapi/v1/algoOrder", new_algo),
    Route("GET", "/fapi/v1/algoOrder", get_algo),
    Route("DELETE", "/fapi/v1/algoOrder", cancel_algo),
    Route("GET", "/fapi/v1/openAlgoOrders", open_algos),
    Route("DELETE", "/fapi/v1/algoOpenOrders", cancel_all_algos),
]
