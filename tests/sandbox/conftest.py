"""ccxt clients wired to the sandbox through loopback_session, one per test account."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import ccxt.async_support as ccxt
import pytest

from activities.venue_routing import loopback_session
from tests.fixtures.sandbox import SandboxHandle, TestAccount

Venue = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture
def venue(sandbox: SandboxHandle) -> Venue:
    """``async with venue(account, "usdm" | "spot", **config) as exchange``: unmodified ccxt."""

    @asynccontextmanager
    async def open_venue(
        account: TestAccount, kind: str = "usdm", **config: Any
    ) -> AsyncIterator[Any]:
        session = loopback_session(sandbox.address, sandbox.ca_file)
        options: dict[str, Any] = {
            "fetchCurrencies": False,
            "fetchMargins": False,
            "fetchOpenOrders": {"warnWithoutSymbol": False},
        }
        cls = ccxt.binanceusdm
        if kind == "spot":
            cls = ccxt.binance
            options["fetchMarkets"] = {"types": ["spot"]}
        exchange = cls(
            {
                "session": session,
                "apiKey": account.api_key,
                "secret": account.secret,
                "enableRateLimit": False,
                "options": options,
                **config,
            }
        )
        try:
            await exchange.load_markets()
            yield exchange
        finally:
            await exchange.close()
            await session.close()

    return open_venue
