"""The strategy's configuration (a JSON file) and its release manifest (release.json)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

LEGACY_FEED_FIELDS = frozenset({"feed_url", "feed_token_env"})
"""Config fields of the admin-API price feed the strategy no longer has."""
HTTP_PORT_ENV = "STRATEGY_HTTP_PORT"
"""Overrides ``http_port`` of the config file: two versions started side by side (blue/green)
share one config but cannot share one port."""
PORT_FILE_ENV = "STRATEGY_PORT_FILE"
"""Overrides ``port_file`` of the config file, for the same reason."""


class Fault(StrEnum):
    """What a release does wrong, on purpose: the failures rollbacks are rehearsed against."""

    NONE = "none"
    REJECT_STORM = "reject-storm"
    """Sends orders below the venue's minimum notional: every one is rejected."""
    LATENCY = "latency"
    """Takes ``latency_fault_s`` to decide before every order."""
    OVERSIZED = "oversized"
    """Orders ``oversize_factor`` times its position cap."""
    CRASH_LOOP = "crash-loop"
    """Exits with code 3 shortly after start."""


class Release(BaseModel):
    """``release.json`` of one immutable release directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    strategy: str
    version: str
    fault: Fault = Fault.NONE
    created: datetime
    entrypoint: list[str] = Field(default_factory=lambda: ["-m", "sandbox.strategy"])
    """Arguments after the interpreter; the launcher adds ``--release <dir>``."""

    @classmethod
    def load(cls, release_dir: Path) -> Release:
        return cls.model_validate_json((release_dir / "release.json").read_text())


class StrategyConfig(BaseModel):
    """Where the strategy trades and keeps its state; secrets are named here, read from env."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = "sample"
    """Strategy name (client order ids start with ``client_id_prefix``)."""
    account: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """The account's name in breakglass (a runbook's ``accounts`` entry, e.g. ``alpha-futures``):
    the key of its trading lease. None: the name of ``api_key_env``."""
    exchange_address: str
    """``127.0.0.1:PORT`` of the sandbox's TLS trading API (ccxt keeps Binance's real URLs)."""
    ca_file: Path
    """The sandbox CA certificate."""
    api_key_env: str = "STRATEGY_API_KEY"
    """Environment variable holding the API key (never passed on the command line)."""
    secret_env: str = "STRATEGY_API_SECRET"
    """Environment variable holding the API secret."""
    db: str
    """SQLite file path, or a ``postgresql://`` DSN."""
    http_host: str = "127.0.0.1"
    http_port: int = 0
    """Port of /healthz and /metrics (0 picks a free one, written to ``port_file``)."""
    port_file: Path | None = None
    symbols: list[str] = Field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    """Binance ids of the USDⓈ-M perpetuals quoted."""
    client_id_prefix: str = Field(default="sg", pattern=r"^[A-Za-z0-9_]{1,12}$")
    """Client order ids are ``<prefix>-<version tag>-…`` (Binance allows 36 characters)."""
    loop_interval_s: float = 0.5
    quote_offset_bps: Decimal = Decimal(3)
    """Distance of each quote from the feed price: close enough to fill in a test run."""
    requote_bps: Decimal = Decimal(10)
    """A resting quote further than this from where it would go now is cancelled and replaced."""
    order_notional: Decimal = Decimal(150)
    """USDT per quote (rounded down to the lot step, at least the venue minimum)."""
    max_position_notional: Decimal = Decimal(600)
    """Position cap per symbol: no quote that would grow a position beyond it."""
    feed_stale_s: float = 3.0
    """/healthz fails once the last good price (the venue's public mark prices) is older."""
    positions_refresh_s: float = Field(default=5.0, gt=0)
    """Positions are read from the venue (weight 5) at least this often, on the first loop, and
    after a state change or a venue error; in between the strategy's own fills move them."""
    loop_stale_s: float = 5.0
    """/healthz fails once the last finished loop is older than this."""
    latency_fault_s: float = 1.2
    oversize_factor: Decimal = Decimal(20)
    fault_after_s: float = Field(default=0.0, ge=0)
    """The release's fault starts this many seconds after the process starts (a slow burn that
    short bakes miss); 0 (default): from the start. A release without a fault ignores it."""

    @property
    def lease_account(self) -> str:
        """The account whose trading lease this strategy obeys."""
        return self.account or self.api_key_env

    @model_validator(mode="before")
    @classmethod
    def _drop_admin_feed(cls, data: Any) -> Any:
        """Configs written before prices came from the venue name the sandbox's admin feed: its
        fields are ignored (the strategy holds no admin token), anything else unknown fails."""
        if isinstance(data, dict) and LEGACY_FEED_FIELDS & data.keys():
            logging.getLogger("sandbox.strategy").warning(
                "config: ignoring %s: prices come from the venue's public endpoint",
                ", ".join(sorted(LEGACY_FEED_FIELDS & data.keys())),
            )
            data = {k: v for k, v in data.items() if k not in LEGACY_FEED_FIELDS}
        return data

    @classmethod
    def load(cls, path: Path) -> StrategyConfig:
        """The config file, with ``http_port``/``port_file`` taken from ``STRATEGY_HTTP_PORT`` /
        ``STRATEGY_PORT_FILE`` when those are set (the deploy target sets them per version)."""
        data = json.loads(path.read_text())
        for env, field in ((HTTP_PORT_ENV, "http_port"), (PORT_FILE_ENV, "port_file")):
            if os.environ.get(env):
                data[field] = os.environ[env]
        return cls.model_validate(data)
