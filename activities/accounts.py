"""Trading accounts and the venues they live on, read from a YAML file under ``runbooks/``.

Only references travel through workflows; the secrets named here are read from the environment
by the activity that needs them, and never leave it.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from workflows.shared import ACCOUNT_NAME_PATTERN

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """Configuration that cannot be used; the message names the file, line and field."""


class Route(StrEnum):
    LIVE = "live"
    """ccxt talks to the venue's real hosts."""
    SANDBOX = "sandbox"
    """ccxt keeps the venue's real URLs but its connections resolve to the local sandbox."""


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Credentials(_Config):
    api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    """Name of the environment variable holding the API key (never the key itself)."""
    secret_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    """Name of the environment variable holding the API secret."""


class Account(_Config):
    exchange: Literal["binance", "binanceusdm"]
    """ccxt exchange class: ``binance`` (spot) or ``binanceusdm`` (USDⓈ-M futures)."""
    route: Route = Route.LIVE
    credentials: Credentials
    quote_asset: str = "USDT"
    """Spot only: the asset balances are sold into when flattening."""
    keep_assets: list[str] = []
    """Spot only: assets a flatten must not sell (besides the quote asset)."""
    dead_man_seconds: int = Field(default=120, ge=0, le=3600)
    """Futures only: venue-side countdown cancel-all armed while a kill runs (0: don't arm)."""


class AccountsFile(_Config):
    accounts: dict[str, Account]

    @field_validator("accounts")
    @classmethod
    def _names(cls, accounts: dict[str, Account]) -> dict[str, Account]:
        import re

        for name in accounts:
            if not re.match(ACCOUNT_NAME_PATTERN, name):
                raise ValueError(f"account name {name!r} must match {ACCOUNT_NAME_PATTERN}")
        return accounts

    def get(self, name: str) -> Account:
        try:
            return self.accounts[name]
        except KeyError:
            known = ", ".join(sorted(self.accounts)) or "none"
            raise ConfigError(f"unknown account {name!r} (known: {known})") from None


class ApiCredentials(BaseModel):
    """The secret pair, only ever built inside an activity; its repr hides both values."""

    api_key: SecretStr
    secret: SecretStr


def read_credentials(name: str, account: Account) -> ApiCredentials:
    """Read an account's key pair from the environment; errors name the variable, not the value."""
    missing = [
        var
        for var in (account.credentials.api_key_env, account.credentials.secret_env)
        if not os.environ.get(var)
    ]
    if missing:
        raise ConfigError(f"account {name!r}: environment variable(s) {', '.join(missing)} not set")
    return ApiCredentials(
        api_key=SecretStr(os.environ[account.credentials.api_key_env]),
        secret=SecretStr(os.environ[account.credentials.secret_env]),
    )


def load_accounts(path: Path) -> AccountsFile:
    """Parse and validate an accounts file; any error names the file, line and field."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_yaml_model(AccountsFile, text, path)


def parse_yaml_model(model: type[M], text: str, path: Path) -> M:
    """Validate YAML text against a pydantic model, reporting ``file:line: field: message``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            line = _line_of(node, loc)
            field = ".".join(loc) or "(top level)"
            lines.append(f"{path}:{line}: {field}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _line_of(node: Any, loc: list[str]) -> int:
    """Line (1-based) of the deepest YAML node along a pydantic error location."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if str(k.value) == key:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            return line
    return line
