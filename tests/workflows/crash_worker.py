"""The real worker (``worker.main``) that SIGKILLs itself on cue: the crash matrix's worker.

``python -m tests.workflows.crash_worker`` with

- ``BG_CRASH_AT``: comma-separated ``activity:phase`` cues, e.g. ``flatten:middle,notify:start``;
- ``BG_CRASH_LEDGER``: a file where each cue is written (and fsynced) just before the process
  kills itself; a restarted worker reads it and does not fire the same cue twice.

Phases, for the first attempt of an activity type that reaches this worker (an armed attempt
that raises, or is cancelled, e.g. timed out on a busy machine, re-arms the cue for the next
one; while an attempt is armed, other attempts of its type in this worker wait for it, so a
retry running beside it cannot do its effect first):

- ``start``: before the activity's code runs;
- ``end``: after it returned, before Temporal heard the result;
- ``middle``: right after the activity's first *effect* outside the worker — a venue request that
  changes something (POST/PUT/DELETE) got its answer, a supervisord call that changes processes
  returned, a state-database transaction committed, or a restore wrote the snapshot back (before
  its verification). An activity that only reads has no middle to cut; it dies at its end, and
  the ledger says so (``middle=end``). So does an effectful one whose effect an attempt before
  it had already made (``middle=end attempt N``: a worker died while that attempt ran).

The hooks are monkeypatches in this test process only; production code has no crash points.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ccxt.async_support as ccxt
from supervisor.xmlrpc import SupervisorTransport
from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

import activities.db_postgres as db_postgres
import activities.db_sqlite as db_sqlite
from sandbox.strategy import state as strategy_state
from worker import main as worker_main

PHASES = ("start", "middle", "end")
MUTATING_HTTP = {"POST", "PUT", "DELETE"}
MUTATING_RPC = (
    "stopProcessGroup",
    "startProcessGroup",
    "addProcessGroup",
    "removeProcessGroup",
    "reloadConfig",
)

_armed_middle: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "armed_middle", default=None
)


def parse_cues(text: str) -> dict[str, str]:
    cues = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, phase = item.partition(":")
        if phase not in PHASES:
            raise SystemExit(f"BG_CRASH_AT: {item!r}: phase must be one of {PHASES}")
        cues[name] = phase
    return cues


def fired(ledger: Path) -> dict[str, str]:
    """Cue name -> how it fired (``start``, ``end``, ``middle: after …``, ``middle=end``)."""
    if not ledger.exists():
        return {}
    lines = [line.split(" ", 1) for line in ledger.read_text().splitlines() if line.strip()]
    return {name: how for name, how in lines}


class Cues:
    def __init__(self, cues: dict[str, str], ledger: Path) -> None:
        self.ledger = ledger
        done = fired(ledger)
        self.pending = {name: phase for name, phase in cues.items() if name not in done}
        self.armed: dict[str, asyncio.Lock] = {}
        """Per activity type with a cue: held by its armed attempt while it runs."""

    def take(self, name: str) -> str | None:
        return self.pending.pop(name, None)

    def rearm(self, name: str, phase: str) -> None:
        """The armed attempt ended without dying (it raised or was cancelled): the next one."""
        self.pending.setdefault(name, phase)

    def die(self, name: str, how: str) -> None:
        with self.ledger.open("a") as f:
            f.write(f"{name} {how}\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


class CrashOnCue(Interceptor):
    def __init__(self, cues: Cues) -> None:
        self.cues = cues

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next, self.cues)


class _Inbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, cues: Cues) -> None:
        super().__init__(next)
        self.cues = cues

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        name = info.activity_type
        lock = self.cues.armed.get(name)
        if lock is None:
            if name not in self.cues.pending:
                return await super().execute_activity(input)
            lock = self.cues.armed[name] = asyncio.Lock()
        async with lock:  # one armed attempt at a time; others of the type wait for it
            phase = self.cues.take(name)
            if phase == "start":
                self.cues.die(name, "start")
            token = _armed_middle.set(name) if phase == "middle" else None
            try:
                result = await super().execute_activity(input)
            except BaseException:
                if phase is not None:
                    self.cues.rearm(name, phase)
                raise
            finally:
                if token is not None:
                    _armed_middle.reset(token)
            if phase == "end":
                self.cues.die(name, "end")
            elif phase == "middle":
                # Nothing outside the worker changed: a read-only activity, or its effect was
                # made by an attempt before this one (which a dead worker ran).
                retry = f" attempt {info.attempt}" if info.attempt > 1 else ""
                self.cues.die(name, f"middle=end{retry}")
        return result


def install_effect_hooks(cues: Cues) -> None:
    """After the first effect of an activity armed for ``middle``, die."""

    def effect(what: str) -> None:
        name = _armed_middle.get()
        if name is not None:
            cues.die(name, f"middle: after {what}")

    real_fetch = ccxt.Exchange.fetch

    async def fetch(self: Any, url: str, method: str = "GET", *args: Any, **kwargs: Any) -> Any:
        response = await real_fetch(self, url, method, *args, **kwargs)
        if method.upper() in MUTATING_HTTP:
            effect(f"{method.upper()} {url.split('?')[0]}")
        return response

    ccxt.Exchange.fetch = fetch

    real_request = SupervisorTransport.request

    def request(self: Any, host: Any, handler: Any, body: bytes, verbose: int = 0) -> Any:
        response = real_request(self, host, handler, body, verbose)
        called = next((m for m in MUTATING_RPC if m.encode() in body), None)
        if called is not None:
            effect(f"supervisor.{called}")
        return response

    SupervisorTransport.request = request

    # A state-database transaction is an effect once it committed a write (reads are not).
    wrote: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("wrote")
    real_execute = strategy_state._Cursor.execute

    def execute(self: Any, sql: str, params: Any = ()) -> Any:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            with contextlib.suppress(LookupError):
                wrote.get()[0] = True
        return real_execute(self, sql, params)

    strategy_state._Cursor.execute = execute  # type: ignore[method-assign]
    real_transaction = strategy_state.Database.transaction

    @contextlib.contextmanager
    def transaction(self: Any) -> Iterator[Any]:
        flag = [False]
        token = wrote.set(flag)
        try:
            with real_transaction(self) as cur:
                yield cur
        finally:
            wrote.reset(token)
        if flag[0]:
            effect("a state-database write committed")

    strategy_state.Database.transaction = transaction  # type: ignore[method-assign]

    def after(fn: Callable[..., Any], what: str, is_async: bool) -> Callable[..., Any]:
        if is_async:

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                result = await fn(*args, **kwargs)
                effect(what)
                return result

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            effect(what)
            return result

        return wrapper

    db_sqlite.restore = after(db_sqlite.restore, "the SQLite restore wrote", False)
    db_postgres.restore = after(db_postgres.restore, "pg_restore committed", True)


def main() -> None:
    ledger = Path(os.environ["BG_CRASH_LEDGER"])
    cues = Cues(parse_cues(os.environ.get("BG_CRASH_AT", "")), ledger)
    install_effect_hooks(cues)
    worker_main.main(interceptors=[CrashOnCue(cues)])


if __name__ == "__main__":
    main()
