"""The two listeners: the Binance-dialect trading API over TLS, and the plain-HTTP admin API.

One request runs through: latency fault -> weight/ban -> 429 burst -> signature -> 5xx / -1007 /
no-answer faults -> handler. Weight is charged before authentication, as on Binance.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from aiohttp import web

from sandbox import routes_futures, routes_spot
from sandbox.admin_models import FaultRule
from sandbox.auth import authenticate, parse_params
from sandbox.context import Ctx, Route
from sandbox.engine import Engine, VenueError
from sandbox.faults import FaultInjector
from sandbox.prices import PriceProcess
from sandbox.weights import WeightLimiter, weight_of

log = logging.getLogger("sandbox")

TICK_S = 0.2
ORDER_ENDPOINTS = {"/fapi/v1/order", "/api/v3/order"}
CANCEL_ENDPOINTS = {
    ("DELETE", "/fapi/v1/order"),
    ("DELETE", "/fapi/v1/batchOrders"),
    ("DELETE", "/fapi/v1/allOpenOrders"),
    ("DELETE", "/api/v3/order"),
    ("DELETE", "/api/v3/openOrders"),
}


JOURNAL_SIZE = 100_000
# (arrived, answered, method, path, status, api_key): wall-clock seconds, for benchmarks.
Journaled = tuple[float, float, str, str, int, str | None]


@dataclass
class RequestStats:
    by_endpoint: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    journal: deque[Journaled] = field(default_factory=lambda: deque(maxlen=JOURNAL_SIZE))
    """The last requests with their times: when a cancel was applied, seen from the venue."""

    def reset(self) -> None:
        self.by_endpoint.clear()
        self.by_status.clear()
        self.journal.clear()


def _error(code: int, msg: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)


class Sandbox:
    """The whole venue: state, limits, faults, and the aiohttp handler for the trading port."""

    def __init__(self, seed: int, spot_weight_limit: int, fapi_weight_limit: int) -> None:
        self.seed = seed
        self.prices = PriceProcess(seed)
        self.engine = Engine(self.prices, id_seed=seed)
        self.weights = WeightLimiter(spot_limit=spot_weight_limit, fapi_limit=fapi_weight_limit)
        self.faults = FaultInjector(seed)
        self.stats = RequestStats()
        self.routes: dict[tuple[str, str], Route] = {
            (r.method, r.path): r for r in routes_futures.ROUTES + routes_spot.ROUTES
        }

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if not self.prices.frozen:
                self.engine.tick()

    def _take(self, kind: str, method: str, path: str, api_key: str | None) -> FaultRule | None:
        return self.faults.take(kind, method, path, api_key)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        arrived = time.time()
        resp = await self._handle(request, method, path)
        self.stats.by_status[str(resp.status)] += 1
        # Answered = applied: a cancel or order has changed the book by now (latency comes first).
        api_key = request.headers.get("X-MBX-APIKEY")
        self.stats.journal.append((arrived, time.time(), method, path, resp.status, api_key))
        return resp

    async def _handle(self, request: web.Request, method: str, path: str) -> web.StreamResponse:
        raw_query = request.rel_url.raw_query_string
        raw_body = await request.text() if request.can_read_body else ""
        params = parse_params(raw_query, raw_body)
        api_key = request.headers.get("X-MBX-APIKEY")
        self.stats.by_endpoint[f"{method} {path}"] += 1

        rule = self._take("latency", method, path, api_key)
        if rule is not None:
            await asyncio.sleep(rule.latency_ms / 1000)

        route = self.routes.get((method, path))
        if route is None:
            return web.Response(status=404, text="<html><body><h2>404 Not found</h2></body></html>")

        ip = request.remote or "unknown"
        pool, weight = weight_of(method, path, "symbol" in params)
        used, verdict, retry = self.weights.charge(ip, pool, weight)
        headers = {"X-MBX-USED-WEIGHT-1M": str(used)}
        if verdict == "418":
            headers["Retry-After"] = str(int(retry) + 1)
            return _error(
                -1003,
                f"Way too many requests; IP({ip}) banned for {int(retry) + 1} s.",
                418,
                headers,
            )
        limit = self.weights.limit(pool)
        too_many = (
            f"Too many requests; current limit of IP({ip}) request weight per minute is {limit}. "
            "Please use WebSocket Streams for live updates to avoid polling the API."
        )
        if verdict == "429":
            headers["Retry-After"] = str(int(retry) + 1)
            return _error(-1003, too_many, 429, headers)
        if self._take("burst_429", method, path, api_key) is not None:
            return _error(-1003, too_many, 429, {**headers, "Retry-After": "1"})

        ctx = Ctx(self.engine, params, None, weight_limit=limit)
        try:
            if route.signed:
                ctx.account = authenticate(self.engine, api_key, raw_query, raw_body, params)
        except VenueError as e:
            return _error(e.code, e.msg, e.status, headers)

        rule = self._take("http_error", method, path, api_key)
        if rule is not None:
            # Plain text, as a load balancer answers: ccxt then maps the HTTP status itself.
            return web.Response(status=rule.status, text="Service Unavailable.", headers=headers)
        rule = self._take("error_1007", method, path, api_key)
        if rule is not None:
            if rule.applied:
                self._run(route, ctx)
            return _error(
                -1007,
                "Timeout waiting for response from backend server. "
                "Send status unknown; execution status unknown.",
                503,
                headers,
            )
        if (method, path) in CANCEL_ENDPOINTS:
            race = self._take("fill_races_cancel", method, path, api_key)
            ctx.race = race.fill if race is not None else None
        if method == "POST" and path in ORDER_ENDPOINTS:
            thin = self._take("thin_book", method, path, api_key)
            ctx.liquidity = Decimal(str(thin.liquidity)) if thin is not None else None
        hold = self._take("no_answer", method, path, api_key)

        status, body = self._run(route, ctx)
        if hold is not None:
            await asyncio.sleep(hold.hold_s)
            if request.transport is not None:
                request.transport.close()
            # The client never sees this: the connection is already gone.
            return web.Response(status=599)
        return web.json_response(body, status=status, headers=headers, dumps=json.dumps)

    @staticmethod
    def _run(route: Route, ctx: Ctx) -> tuple[int, object]:
        try:
            return 200, route.handler(ctx)
        except VenueError as e:
            return e.status, {"code": e.code, "msg": e.msg}


def trading_app(sandbox: Sandbox) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app.router.add_route("*", "/{tail:.*}", sandbox.handle)
    return app


async def start_sites(
    sandbox: Sandbox,
    admin_app: web.Application,
    host: str,
    port: int,
    admin_port: int,
    state_dir: Path,
) -> list[web.AppRunner]:
    """Start both listeners; raises OSError if a port is taken."""
    from sandbox.tls import server_context

    ssl_ctx = server_context(state_dir)
    runners: list[web.AppRunner] = []
    try:
        for app, p, ssl in ((trading_app(sandbox), port, ssl_ctx), (admin_app, admin_port, None)):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            # SO_REUSEADDR: a restart binds through TIME_WAIT; a live listener still refuses it.
            await web.TCPSite(runner, host, p, ssl_context=ssl, reuse_address=True).start()
    except OSError:
        for r in runners:
            await r.cleanup()
        raise
    return runners
