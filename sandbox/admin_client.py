"""Async typed client for the sandbox admin API (see sandbox/admin.py for the server side)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

from sandbox.admin_models import (
    AccountCreate,
    AccountState,
    BalancesSet,
    FaultRule,
    FaultSet,
    Limits,
    PositionSet,
    PositionsSet,
    PriceControl,
    Prices,
    PriceSet,
    RequestLog,
    RequestRecord,
    SeededIds,
    SeedOrder,
    SeedOrders,
    Stats,
)

M = TypeVar("M", bound=BaseModel)


class AdminError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"admin API answered {status}: {body}")
        self.status = status
        self.body = body


class SandboxAdmin:
    """``SandboxAdmin("http://127.0.0.1:9444", token)``; use ``async with`` or call ``close()``."""

    def __init__(self, base_url: str, token: str) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SandboxAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, answer: type[M], body: BaseModel | None = None
    ) -> M:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        data: Any = body.model_dump_json(exclude_none=False) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        async with self._session.request(
            method, self._base + path, data=data, headers=headers
        ) as r:
            text = await r.text()
            if r.status >= 300:
                raise AdminError(r.status, text)
            return answer.model_validate_json(text)

    # accounts ---------------------------------------------------------------------------------
    async def create_account(
        self,
        api_key: str,
        secret: str,
        *,
        hedge_mode: bool = False,
        spot_balances: dict[str, Decimal] | None = None,
        futures_wallet: Decimal = Decimal(100000),
    ) -> AccountState:
        body = AccountCreate(
            api_key=api_key,
            secret=secret,
            hedge_mode=hedge_mode,
            futures_wallet=futures_wallet,
            **({"spot_balances": spot_balances} if spot_balances is not None else {}),
        )
        return await self._call("POST", "/admin/accounts", AccountState, body)

    async def state(self, api_key: str) -> AccountState:
        return await self._call("GET", f"/admin/accounts/{api_key}", AccountState)

    async def seed_orders(self, api_key: str, orders: list[SeedOrder]) -> list[int]:
        body = SeedOrders(orders=orders)
        ids = await self._call("POST", f"/admin/accounts/{api_key}/orders", SeededIds, body)
        return ids.order_ids

    async def set_positions(self, api_key: str, positions: list[PositionSet]) -> AccountState:
        body = PositionsSet(positions=positions)
        return await self._call("PUT", f"/admin/accounts/{api_key}/positions", AccountState, body)

    async def set_balances(
        self,
        api_key: str,
        spot_balances: dict[str, Decimal] | None = None,
        futures_wallet: Decimal | None = None,
    ) -> AccountState:
        body = BalancesSet(spot_balances=spot_balances or {}, futures_wallet=futures_wallet)
        return await self._call("PUT", f"/admin/accounts/{api_key}/balances", AccountState, body)

    # prices -----------------------------------------------------------------------------------
    async def prices(self) -> Prices:
        return await self._call("GET", "/admin/prices", Prices)

    async def set_price(self, symbol: str, price: Decimal) -> Prices:
        return await self._call(
            "PUT", "/admin/prices", Prices, PriceSet(symbol=symbol, price=price)
        )

    async def control_prices(
        self, *, frozen: bool | None = None, reset_seed: int | None = None, step: int = 0
    ) -> Prices:
        body = PriceControl(frozen=frozen, reset_seed=reset_seed, step=step)
        return await self._call("POST", "/admin/prices/control", Prices, body)

    # faults -----------------------------------------------------------------------------------
    async def faults(self) -> list[FaultRule]:
        return (await self._call("GET", "/admin/faults", FaultSet)).rules

    async def set_faults(self, rules: list[FaultRule]) -> list[FaultRule]:
        return (await self._call("PUT", "/admin/faults", FaultSet, FaultSet(rules=rules))).rules

    async def add_faults(self, rules: list[FaultRule]) -> list[FaultRule]:
        return (await self._call("POST", "/admin/faults", FaultSet, FaultSet(rules=rules))).rules

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/admin/faults", FaultSet)

    # stats and limits -------------------------------------------------------------------------
    async def stats(self) -> Stats:
        return await self._call("GET", "/admin/stats", Stats)

    async def requests(self, since: float = 0.0, api_key: str | None = None) -> list[RequestRecord]:
        """The venue's journal of trading requests that arrived at or after ``since`` (epoch s)."""
        query = f"?since={since!r}" + (f"&api_key={api_key}" if api_key else "")
        return (await self._call("GET", "/admin/requests" + query, RequestLog)).records

    async def reset_stats(self) -> Stats:
        """Also clears used weight and IP bans."""
        return await self._call("POST", "/admin/stats/reset", Stats)

    async def set_limits(self, limits: Limits) -> Limits:
        return await self._call("PUT", "/admin/limits", Limits, limits)
