"""Request weight per IP per minute, one pool for spot and one for futures, and the 418 ban.

Binance counts weight in fixed one-minute windows. Past the limit it answers 429; a client that
keeps sending while limited is banned with 418 and ``Retry-After``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

Pool = Literal["spot", "fapi"]

# (method, path) -> (weight, weight when the request has no symbol)
FAPI_WEIGHTS: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/fapi/v1/exchangeInfo"): (1, 1),
    ("GET", "/fapi/v1/time"): (1, 1),
    ("GET", "/fapi/v1/ping"): (1, 1),
    ("GET", "/fapi/v1/premiumIndex"): (1, 1),  # every symbol for 1, as Binance documents it
    ("GET", "/fapi/v1/ticker/price"): (1, 2),
    ("GET", "/fapi/v2/ticker/price"): (1, 2),
    ("POST", "/fapi/v1/order"): (1, 1),
    ("GET", "/fapi/v1/order"): (1, 1),
    ("DELETE", "/fapi/v1/order"): (1, 1),
    ("DELETE", "/fapi/v1/batchOrders"): (1, 1),
    ("DELETE", "/fapi/v1/allOpenOrders"): (1, 1),
    ("GET", "/fapi/v1/openOrders"): (1, 40),
    ("GET", "/fapi/v3/positionRisk"): (5, 5),
    ("GET", "/fapi/v2/positionRisk"): (5, 5),
    ("GET", "/fapi/v3/account"): (5, 5),
    ("GET", "/fapi/v2/account"): (5, 5),
    ("GET", "/fapi/v1/leverageBracket"): (1, 1),
    ("GET", "/fapi/v1/positionSide/dual"): (30, 30),
    ("POST", "/fapi/v1/countdownCancelAll"): (10, 10),
    ("POST", "/fapi/v1/algoOrder"): (1, 1),
    ("GET", "/fapi/v1/algoOrder"): (1, 1),
    ("DELETE", "/fapi/v1/algoOrder"): (1, 1),
    ("GET", "/fapi/v1/openAlgoOrders"): (1, 40),
    ("DELETE", "/fapi/v1/algoOpenOrders"): (1, 1),
}
SPOT_WEIGHTS: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/api/v3/exchangeInfo"): (20, 20),
    ("GET", "/api/v3/time"): (1, 1),
    ("GET", "/api/v3/ping"): (1, 1),
    ("POST", "/api/v3/order"): (1, 1),
    ("GET", "/api/v3/order"): (4, 4),
    ("DELETE", "/api/v3/order"): (1, 1),
    ("GET", "/api/v3/openOrders"): (6, 80),
    ("DELETE", "/api/v3/openOrders"): (1, 1),
    ("GET", "/api/v3/account"): (20, 20),
}


def weight_of(method: str, path: str, has_symbol: bool) -> tuple[Pool, int]:
    if path.startswith("/fapi/"):
        w = FAPI_WEIGHTS.get((method, path), (1, 1))
        return "fapi", w[0] if has_symbol else w[1]
    w = SPOT_WEIGHTS.get((method, path), (1, 1))
    return "spot", w[0] if has_symbol else w[1]


@dataclass
class _Usage:
    window: int = 0
    used: int = 0
    limited_hits: int = 0  # requests sent while already over the limit in this window
    banned_until: float = 0.0


@dataclass
class WeightLimiter:
    spot_limit: int = 6000
    fapi_limit: int = 2400
    ban_after: int = 5
    """Requests sent after a 429 within the same window before the IP is banned (418)."""
    ban_s: float = 120.0
    """Ban length; Binance starts at 2 minutes and escalates, the sandbox keeps it fixed."""
    _usage: dict[tuple[str, Pool], _Usage] = field(default_factory=dict)

    def limit(self, pool: Pool) -> int:
        return self.spot_limit if pool == "spot" else self.fapi_limit

    def _get(self, ip: str, pool: Pool, now: float) -> _Usage:
        u = self._usage.setdefault((ip, pool), _Usage())
        window = int(now // 60)
        if u.window != window:
            u.window, u.used, u.limited_hits = window, 0, 0
        return u

    def charge(self, ip: str, pool: Pool, weight: int) -> tuple[int, str | None, float]:
        """Count a request; return (used weight, verdict None/'429'/'418', retry_after_s)."""
        now = time.time()
        u = self._get(ip, pool, now)
        if u.banned_until > now:
            return u.used, "418", u.banned_until - now
        u.used += weight
        if u.used > self.limit(pool):
            u.limited_hits += 1
            if u.limited_hits > self.ban_after:
                u.banned_until = now + self.ban_s
                return u.used, "418", self.ban_s
            return u.used, "429", 60 - now % 60
        return u.used, None, 0.0

    def used(self, ip: str, pool: Pool) -> int:
        return self._get(ip, pool, time.time()).used

    def snapshot(self) -> dict[str, int]:
        now = time.time()
        out: dict[str, int] = {}
        for (ip, pool), u in self._usage.items():
            if u.window == int(now // 60):
                out[f"{ip} {pool}"] = u.used
        return out

    def reset(self) -> None:
        self._usage.clear()
