"""The admin API (plain HTTP, own port, bearer token): seed state, set faults, read true state.

Trading API keys are not accepted here and none of these paths exist on the trading port.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from decimal import Decimal

from aiohttp import web
from pydantic import BaseModel, ValidationError

from sandbox.admin_models import (
    AccountCreate,
    AccountState,
    BalancesSet,
    BalanceView,
    FaultSet,
    FillView,
    Limits,
    OrderView,
    PositionsSet,
    PositionView,
    PriceControl,
    Prices,
    PriceSet,
    RequestLog,
    RequestRecord,
    SeededIds,
    SeedOrders,
    Stats,
)
from sandbox.engine import Account, NewOrder, Order, VenueError
from sandbox.server import Sandbox

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def _order_view(o: Order) -> OrderView:
    return OrderView(
        order_id=o.order_id,
        client_order_id=o.client_order_id,
        venue=o.venue,
        symbol=o.symbol,
        side=o.side,
        type=o.type,
        qty=o.qty,
        price=o.price,
        filled_qty=o.filled,
        avg_price=o.avg_price,
        status=o.status,
        reduce_only=o.reduce_only,
        position_side=o.position_side,
        trigger_price=o.trigger_price,
        conditional=o.is_algo,
        time=o.time,
        update_time=o.update_time,
    )


def account_state(sb: Sandbox, acct: Account) -> AccountState:
    eng = sb.engine
    return AccountState(
        api_key=acct.api_key,
        hedge_mode=acct.hedge_mode,
        futures_wallet=acct.futures_wallet,
        spot_balances={a: BalanceView(free=b[0], locked=b[1]) for a, b in acct.balances.items()},
        positions=[
            PositionView(
                symbol=p.symbol,
                position_side=p.position_side,
                qty=p.qty,
                entry_price=p.entry_price,
                flipped=p.flipped,
                sign_history=p.sign_history,
            )
            for _, p in sorted(acct.positions.items())
        ],
        open_orders=[
            _order_view(o)
            for v in ("futures", "spot")
            for o in eng.open_orders(acct, v, None)  # type: ignore[arg-type]
        ],
        open_conditional_orders=[
            _order_view(o) for o in eng.open_orders(acct, "futures", None, True)
        ],
        orders=[_order_view(o) for o in acct.orders.values()],
        fills=[
            FillView(
                trade_id=f.trade_id,
                order_id=f.order_id,
                venue=f.venue,
                symbol=f.symbol,
                side=f.side,
                qty=f.qty,
                price=f.price,
                position_side=f.position_side,
                time=f.time,
                maker=f.maker,
            )
            for f in acct.fills
        ],
        countdowns=sorted(acct.countdowns),
    )


def build_admin_app(sb: Sandbox, token: str) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            return await handler(request)
        except ValidationError as e:
            return web.json_response({"error": e.errors(include_url=False)}, status=422)
        except VenueError as e:
            return web.json_response({"error": e.msg, "code": e.code}, status=400)
        except KeyError as e:
            return web.json_response({"error": f"not found: {e}"}, status=404)

    def acct_of(request: web.Request) -> Account:
        return sb.engine.accounts[request.match_info["key"]]

    async def create_account(request: web.Request) -> web.StreamResponse:
        body = AccountCreate.model_validate_json(await request.read())
        if body.api_key in sb.engine.accounts:
            return web.json_response({"error": "api_key exists"}, status=409)
        acct = Account(
            api_key=body.api_key,
            secret=body.secret,
            hedge_mode=body.hedge_mode,
            futures_wallet=body.futures_wallet,
            balances={a: [v, Decimal(0)] for a, v in body.spot_balances.items()},
        )
        sb.engine.add_account(acct)
        return _json(account_state(sb, acct), 201)

    async def get_state(request: web.Request) -> web.StreamResponse:
        return _json(account_state(sb, acct_of(request)))

    async def seed_orders(request: web.Request) -> web.StreamResponse:
        acct = acct_of(request)
        body = SeedOrders.model_validate_json(await request.read())
        ids: list[int] = []
        for s in body.orders:
            req = NewOrder(
                venue=s.venue,
                symbol=s.symbol,
                side=s.side,
                type=s.type,
                qty=s.qty,
                price=s.price,
                time_in_force="GTC" if s.type in ("LIMIT", "STOP", "TAKE_PROFIT") else None,
                client_order_id=s.client_order_id,
                reduce_only=(s.reduce_only or None) if not acct.hedge_mode else None,
                position_side=s.position_side
                or (
                    ("LONG" if s.side == "BUY" else "SHORT")
                    if acct.hedge_mode and s.venue == "futures"
                    else None
                ),
                close_position=s.close_position,
                trigger_price=s.trigger_price,
            )
            ids.append(
                sb.engine.submit(acct, req, seeded=True, seeded_filled=s.filled_qty).order_id
            )
        return _json(SeededIds(order_ids=ids), 201)

    async def set_positions(request: web.Request) -> web.StreamResponse:
        acct = acct_of(request)
        body = PositionsSet.model_validate_json(await request.read())
        for p in body.positions:
            side = p.position_side
            if acct.hedge_mode == (side == "BOTH"):
                raise VenueError(-4061, f"position_side {side} does not match the account's mode")
            entry = p.entry_price if p.entry_price is not None else sb.engine.mark(p.symbol)
            sb.engine.set_position(acct, p.symbol, side, p.qty, entry)
        return _json(account_state(sb, acct))

    async def set_balances(request: web.Request) -> web.StreamResponse:
        acct = acct_of(request)
        body = BalancesSet.model_validate_json(await request.read())
        for a, v in body.spot_balances.items():
            acct.balance(a)[0] = v
        if body.futures_wallet is not None:
            acct.futures_wallet = body.futures_wallet
        return _json(account_state(sb, acct))

    def prices_model() -> Prices:
        p = sb.prices
        return Prices(frozen=p.frozen, ticks=p.ticks, prices=dict(p.prices))

    async def get_prices(request: web.Request) -> web.StreamResponse:
        return _json(prices_model())

    async def set_price(request: web.Request) -> web.StreamResponse:
        body = PriceSet.model_validate_json(await request.read())
        sb.engine.market(body.symbol)
        sb.prices.set(body.symbol, body.price)
        # Matching runs at once so a price set across resting orders fills them like a tick would.
        sb.engine.on_price(body.symbol, sb.prices.prices[body.symbol])
        return _json(prices_model())

    async def control_prices(request: web.Request) -> web.StreamResponse:
        body = PriceControl.model_validate_json(await request.read())
        if body.reset_seed is not None:
            sb.prices.reset(body.reset_seed)
        if body.frozen is not None:
            sb.prices.frozen = body.frozen
        for _ in range(body.step):
            sb.engine.tick()
        return _json(prices_model())

    async def get_faults(request: web.Request) -> web.StreamResponse:
        return _json(FaultSet(rules=sb.faults.rules))

    async def put_faults(request: web.Request) -> web.StreamResponse:
        sb.faults.set(FaultSet.model_validate_json(await request.read()).rules)
        return _json(FaultSet(rules=sb.faults.rules))

    async def add_faults(request: web.Request) -> web.StreamResponse:
        sb.faults.add(FaultSet.model_validate_json(await request.read()).rules)
        return _json(FaultSet(rules=sb.faults.rules))

    async def clear_faults(request: web.Request) -> web.StreamResponse:
        sb.faults.clear()
        return _json(FaultSet(rules=[]))

    def limits_model() -> Limits:
        w = sb.weights
        return Limits(
            spot_weight_limit=w.spot_limit,
            fapi_weight_limit=w.fapi_limit,
            ban_after=w.ban_after,
            ban_s=w.ban_s,
        )

    def stats_model() -> Stats:
        return Stats(
            requests_by_endpoint=dict(sb.stats.by_endpoint),
            requests_by_status=dict(sb.stats.by_status),
            count_429=sb.stats.by_status.get("429", 0),
            count_418=sb.stats.by_status.get("418", 0),
            used_weight=sb.weights.snapshot(),
            limits=limits_model(),
        )

    async def get_stats(request: web.Request) -> web.StreamResponse:
        return _json(stats_model())

    async def get_requests(request: web.Request) -> web.StreamResponse:
        """Read-only: the journal of trading requests (``?since=<epoch s>&api_key=<key>``)."""
        since = float(request.query.get("since", "0"))
        key = request.query.get("api_key")
        records = [
            RequestRecord(arrived=a, answered=b, method=m, path=p, status=s, api_key=k)
            for a, b, m, p, s, k in list(sb.stats.journal)
            if a >= since and (key is None or k == key)
        ]
        return _json(RequestLog(records=records))

    async def reset_stats(request: web.Request) -> web.StreamResponse:
        """Clears counters, used weight and bans (so one test's hammering can't leak)."""
        sb.stats.reset()
        sb.weights.reset()
        return _json(stats_model())

    async def set_limits(request: web.Request) -> web.StreamResponse:
        body = Limits.model_validate_json(await request.read())
        w = sb.weights
        w.spot_limit = body.spot_weight_limit or w.spot_limit
        w.fapi_limit = body.fapi_weight_limit or w.fapi_limit
        w.ban_after = body.ban_after if body.ban_after is not None else w.ban_after
        w.ban_s = body.ban_s if body.ban_s is not None else w.ban_s
        return _json(limits_model())

    app = web.Application(middlewares=[guard], client_max_size=32 << 20)
    app.add_routes(
        [
            web.post("/admin/accounts", create_account),
            web.get("/admin/accounts/{key}", get_state),
            web.post("/admin/accounts/{key}/orders", seed_orders),
            web.put("/admin/accounts/{key}/positions", set_positions),
            web.put("/admin/accounts/{key}/balances", set_balances),
            web.get("/admin/prices", get_prices),
            web.put("/admin/prices", set_price),
            web.post("/admin/prices/control", control_prices),
            web.get("/admin/faults", get_faults),
            web.put("/admin/faults", put_faults),
            web.post("/admin/faults", add_faults),
            web.delete("/admin/faults", clear_faults),
            web.get("/admin/stats", get_stats),
            web.post("/admin/stats/reset", reset_stats),
            web.get("/admin/requests", get_requests),
            web.put("/admin/limits", set_limits),
        ]
    )
    return app
