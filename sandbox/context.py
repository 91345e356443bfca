"""What a trading-API handler receives, and the small param parsers every handler shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from sandbox.engine import Account, Engine, VenueError, now_ms
from sandbox.markets import BY_SYMBOL


@dataclass
class Ctx:
    engine: Engine
    params: dict[str, str]
    account: Account | None
    race: str | None = None
    """fill_races_cancel mode ('full'/'partial') if a fault rule hit this cancel request."""
    weight_limit: int = 0
    liquidity: Decimal | None = None
    """thin_book fault: share of a market order the book can fill."""

    @property
    def acct(self) -> Account:
        assert self.account is not None
        return self.account

    def str(self, name: str) -> str | None:
        v = self.params.get(name)
        return v if v not in (None, "") else None

    def symbol(self, required: bool = True) -> str | None:
        """The ``symbol`` parameter, checked against the listed markets."""
        sym = self.need("symbol") if required else self.str("symbol")
        if sym is not None and sym not in BY_SYMBOL:
            raise VenueError(-1121, "Invalid symbol.")
        return sym

    def need(self, name: str) -> str:
        v = self.str(name)
        if v is None:
            raise VenueError(
                -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
            )
        return v

    def dec(self, name: str) -> Decimal | None:
        v = self.str(name)
        if v is None:
            return None
        try:
            d = Decimal(v)
        except InvalidOperation:
            raise VenueError(-1100, f"Illegal characters found in parameter '{name}'.") from None
        if not d.is_finite():
            raise VenueError(-1100, f"Illegal characters found in parameter '{name}'.")
        return d

    def int(self, name: str) -> int | None:
        v = self.str(name)
        if v is None:
            return None
        try:
            return int(v)
        except ValueError:
            raise VenueError(-1100, f"Illegal characters found in parameter '{name}'.") from None

    def bool(self, name: str) -> bool | None:
        v = self.str(name)
        if v is None:
            return None
        if v.lower() not in ("true", "false"):
            raise VenueError(-1100, f"Illegal characters found in parameter '{name}'.")
        return v.lower() == "true"

    def json_list(self, name: str) -> list[Any] | None:
        v = self.str(name)
        if v is None:
            return None
        try:
            out = json.loads(v)
        except ValueError:
            raise VenueError(-1100, f"Illegal characters found in parameter '{name}'.") from None
        if not isinstance(out, list):
            raise VenueError(-1100, f"Illegal characters found in parameter '{name}'.")
        return out


Handler = Callable[[Ctx], object]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    signed: bool = True


def server_time(ctx: Ctx) -> object:
    """``GET /time`` (spot and futures alike)."""
    return {"serverTime": now_ms()}


def ping(ctx: Ctx) -> object:
    """``GET /ping`` (spot and futures alike)."""
    return {}
