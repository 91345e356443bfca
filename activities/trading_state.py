"""Freezing a managed strategy through its own database: the trading-state activity.

The strategy re-reads ACTIVE / REDUCING / HALTED from its state database every loop
(``sandbox/strategy/state.py`` is that contract's reference implementation), so the saga never
needs the strategy process to answer in order to stop it.
"""

from __future__ import annotations

import asyncio
import os

from psycopg.conninfo import make_conninfo
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from sandbox.strategy.state import set_trading_state
from workflows.rollback_models import TradingStateChange, TradingStateRequest
from workflows.snapshot_models import DatabaseKind, DatabaseRef


def db_target(database: DatabaseRef) -> str:
    """Path or DSN for the state module; a password comes from the env var the ref names."""
    if database.kind is DatabaseKind.SQLITE:
        return str(database.path)
    dsn = str(database.dsn)
    if database.password_env:
        password = os.environ.get(database.password_env)
        if password is None:
            raise ApplicationError(
                f"environment variable {database.password_env} is not set",
                type="ConfigError",
                non_retryable=True,
            )
        # libpq quoting: a password with a space, a quote or URI metacharacters stays whole
        # (pasted in raw it broke the conninfo, and the parse error quoted the password).
        dsn = make_conninfo(dsn, password=password)
    return dsn


class TradingStateActivities:
    @activity.defn(name="set_trading_state")
    async def set_state(self, request: TradingStateRequest) -> TradingStateChange:
        """Set the strategy's trading state (a repeat is a no-op that says so)."""
        try:
            async with heartbeating({"phase": f"setting {request.state.value}"}):
                change = await asyncio.to_thread(
                    set_trading_state,
                    db_target(request.database),
                    request.state.value,
                    request.who,
                    request.why,
                )
        except ValueError as e:
            raise ApplicationError(str(e), type="BadRequest", non_retryable=True) from None
        except OSError as e:  # unreachable database: retry, the workflow's policy bounds it
            raise ApplicationError(
                f"{request.database.label}: {e.strerror or type(e).__name__}",
                type="DatabaseUnavailable",
            ) from None
        activity.logger.info("trading state %s: %s", request.database.label, change.message)
        return TradingStateChange(
            state=request.state, changed=change.changed, message=change.message
        )
