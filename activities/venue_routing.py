"""Route unmodified ccxt to the local sandbox while it keeps the venue's real URLs.

ccxt picks some Binance error tables by hostname, so rewriting its URLs changes behaviour. Instead
the session's resolver maps the real hostnames to the sandbox address, and TLS is verified
against the sandbox's own CA (whose certificate carries the real hostnames). Any other hostname
fails to resolve, so a misrouted request can never leave loopback.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

SANDBOX_HOSTS = frozenset({"api.binance.com", "fapi.binance.com"})


class LoopbackResolver(AbstractResolver):
    """Resolves the venue hostnames (any port) to ``host:port``; refuses everything else."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in SANDBOX_HOSTS:
            raise OSError(f"{host} is not routed to the sandbox")
        # aiohttp connects to the port returned here, not the one in the URL.
        return [
            {
                "hostname": host,
                "host": self._host,
                "port": self._port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def loopback_session(address: str, ca_file: Path, **session_kwargs: Any) -> aiohttp.ClientSession:
    """A session for ``ccxt.async_support.<venue>({'session': ...})`` that talks to ``address``.

    ``address`` is ``"127.0.0.1:PORT"``. Must be called inside a running event loop; the caller
    closes the session (ccxt does not close a session it did not create).
    """
    host, _, port = address.rpartition(":")
    ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(
        resolver=LoopbackResolver(host, int(port)), ssl=ssl_ctx, use_dns_cache=False
    )
    return aiohttp.ClientSession(connector=connector, **session_kwargs)
