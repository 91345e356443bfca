"""K100: many concurrent kills (one per account) on one worker, against one kill of one account.

Each of the N accounts (default 100, fresh keys, all in the stack's accounts.yaml) holds the same
small book (``FLEET_BOOK`` per account: 5 symbols, 20 resting orders, 2 positions). "One kill" is
``breakglass kill --account <one>`` (the CLI's own start call, one workflow per account); "N
kills" starts N such kills at once from one client, as N operators (or a guardian) would, and all
run on the one in-process worker. Time, as in K1: from just before the first ``start_workflow`` to
the end of the last account's verifying look (seen at the activity boundary in the worker); the
wall time to the last result is printed too. Every account must end verified by the tool and flat
on the sandbox's own view; every 429 answered is counted.

Request weight: Binance counts it per IP (USDⓈ-M 2,400/min; we allow ourselves 90 %), so N kills
from one worker share one budget. By default the venue's limits and our limiter's budget are
multiplied by N for this phase (``per-account``: as if each account had its own budget; what the
ratio then measures is the worker, Temporal and the event loop under N kills). ``binance`` keeps
the real single-IP budget; the weight the N kills spent and what it costs under that budget are
printed in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType, TimeoutType

from activities.venues import BUDGET_SHARE, VENUE_WEIGHT_BUDGETS
from bench.common import (
    Stack,
    check_flat,
    cpu_line,
    fresh_budget,
    scale_weight_limits,
    seed,
    shout,
)
from bench.first_cancel import first_cancels_per_key
from tests.fixtures.venues import SandboxAccount
from worker.cli_kill import _start as cli_start_kill
from workflows.shared import KillOutcome, KillReport, KillSwitchInput, kill_workflow_id

FLEET_BOOK = {"symbols": 5, "open_orders": 20, "positions": 2, "spot_orders_fraction": 0.0}
"""Per account (seed() splits totals over the accounts it is given)."""
TARGET = 3.0
FAPI_BUDGET = int(VENUE_WEIGHT_BUDGETS["fapi.binance.com"] * BUDGET_SHARE)


@dataclass
class FleetRun:
    kills: int
    seconds: float
    """Go -> the last account's verifying look returned."""
    wall_s: float
    """Go -> the last result at the client."""
    verified: int
    problem: str | None
    http429: int
    weight: int
    first_cancel_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    lag: tuple[float, float] = (0.0, 0.0)
    """This process's event loop: (p99, max) lateness of a 20 ms sleeper during the run."""
    failed_attempts: dict[str, int] = field(default_factory=dict)
    """Activity attempts that raised (timed out, cancelled, failed) and were retried."""
    retried: dict[str, int] = field(default_factory=dict)
    """Why, per the histories (the last retried attempt's failure per activity)."""
    steps: dict[str, float] = field(default_factory=dict)
    """Median per kill: seconds in each activity type, and idle between them (``idle``)."""

    @property
    def ok(self) -> bool:
        return self.verified == self.kills and self.problem is None and not self.errors


def book_for(count: int) -> dict[str, float]:
    """FLEET_BOOK on each of ``count`` accounts (seed_book takes totals)."""
    per = dict(FLEET_BOOK)
    per["open_orders"] = FLEET_BOOK["open_orders"] * count
    per["positions"] = FLEET_BOOK["positions"] * count
    return per


async def kill_each(stack: Stack, accounts: list[SandboxAccount], label: str) -> FleetRun:
    """Seed, then one ``breakglass kill`` per account, all started at once; judge on the venue."""
    names = [a.futures for a in accounts]
    await seed(stack, accounts, book_for(len(accounts)))
    for name in names:  # a long-running worker has its connections warm and markets loaded
        await stack.gateway.session(name)
    await fresh_budget(stack)
    stack.clock.marks.clear()
    stack.clock.failed.clear()

    async def one(name: str) -> KillReport:
        request = KillSwitchInput(accounts=[name], reason=f"bench {label}", requested_by="bench")
        handle = await cli_start_kill(stack.temporal.client, request, stack.settings)
        report: KillReport = await handle.result()
        return report

    with contextlib.redirect_stdout(io.StringIO()):  # the console notifier's messages
        stack.cpu.start()
        stack.lag.start()
        go_wall, go = time.time(), time.monotonic()
        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        wall_s = time.monotonic() - go
        cpu = stack.cpu.stop()
        lag = stack.lag.stop()
    weight = sum(limiter.used() for limiter in stack.gateway.limiters.values())
    stats = await stack.admin.stats()
    looks = [e for kind, _, _, e in stack.clock.marks if kind == "snapshot_venue_state"]
    errors = [
        f"{n}: {r!r}"[:200]
        for n, r in zip(names, results, strict=True)
        if isinstance(r, BaseException)
    ]
    verified = sum(
        1 for r in results if isinstance(r, KillReport) and r.outcome is KillOutcome.VERIFIED
    )
    keys = {a.api_key for a in accounts}
    journal = [r for r in await stack.admin.requests(since=go_wall) if r.api_key in keys]
    run = FleetRun(
        kills=len(names),
        seconds=(max(looks) - go) if looks else float("nan"),
        wall_s=wall_s,
        verified=verified,
        problem=await check_flat(stack, accounts),
        http429=stats.count_429,
        weight=weight,
        first_cancel_ms=sorted(first_cancels_per_key(journal, go_wall).values()),
        errors=errors,
        cpu=cpu,
        lag=lag,
        failed_attempts=dict(stack.clock.failed),
        retried=await retried_why(stack, names),
        steps=per_kill_steps(stack.clock.marks, go),
    )
    if stats.count_418:
        run.problem = f"{stats.count_418} answer(s) 418 (IP ban)"
    first = f"{run.first_cancel_ms[0]:.0f} ms" if run.first_cancel_ms else "none"
    print(
        f"  {label:<10} {run.kills:>3} kill(s) {run.seconds:7.3f} s  (to the last result "
        f"{run.wall_s:.3f} s)  verified {run.verified}/{run.kills}, "
        f"{'flat' if run.problem is None else 'NOT FLAT (' + run.problem + ')'}, "
        f"429s {run.http429}, weight {run.weight:,}, first cancel {first}",
        flush=True,
    )
    if not run.ok:
        shout(f"{label}: {run.verified}/{run.kills} verified, {run.problem}, {run.errors[:2]}")
    return run


async def retried_why(stack: Stack, names: list[str]) -> dict[str, int]:
    """Why activities needed another attempt, from the kills' histories: each started attempt
    after the first carries the previous attempt's failure (a timeout says which one; other
    failures are encoded by the worker's converter and counted as "failed")."""
    why: Counter[str] = Counter()
    for name in names:
        handle = stack.temporal.client.get_workflow_handle(kill_workflow_id([name]))
        events = (await handle.fetch_history()).events
        kinds = {
            e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        }
        for e in events:
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                why["workflow task timed out"] += 1
            if e.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                continue
            started = e.activity_task_started_event_attributes
            if started.attempt <= 1:
                continue
            failure = started.last_failure
            if failure.HasField("timeout_failure_info"):
                cause = TimeoutType.Name(failure.timeout_failure_info.timeout_type)
                cause = cause.removeprefix("TIMEOUT_TYPE_").lower().replace("_", "-") + " timeout"
            else:
                cause = "failed"
            why[f"{kinds.get(started.scheduled_event_id, '?')} {cause}"] += started.attempt - 1
    return dict(why)


def per_kill_steps(marks: list[tuple[str, str, float, float]], go: float) -> dict[str, float]:
    """Median over kills of the seconds each spent per activity type, and idle (no activity of
    its own running: Temporal's start, dispatch and step boundaries, from go to its last end)."""
    per: dict[str, dict[str, float]] = {}
    ends: dict[str, list[tuple[float, float]]] = {}
    for kind, account, start, end in marks:
        mine = per.setdefault(account, {})
        mine[kind] = mine.get(kind, 0.0) + end - start
        ends.setdefault(account, []).append((start, end))
    for account, spans in ends.items():
        busy, edge = 0.0, go
        for start, end in sorted(spans):
            busy += max(0.0, end - max(start, edge))
            edge = max(edge, end)
        per[account]["idle"] = edge - go - busy
    kinds = sorted({k for steps in per.values() for k in steps})
    return {k: statistics.median(s.get(k, 0.0) for s in per.values()) for k in kinds}


@dataclass
class FleetResult:
    one: list[FleetRun]
    many: FleetRun
    budget: str

    @property
    def one_s(self) -> float:
        return statistics.median(r.seconds for r in self.one)

    @property
    def ratio(self) -> float:
        return self.many.seconds / self.one_s

    @property
    def http429(self) -> int:
        return self.many.http429 + sum(r.http429 for r in self.one)

    @property
    def ok(self) -> bool:
        return self.many.ok and all(r.ok for r in self.one) and self.http429 == 0


async def measure_fleet(stack: Stack, kills: int, runs: int, budget: str) -> FleetResult:
    """Warm-up, ``runs`` single kills, then ``kills`` kills at once (accounts from
    ``stack.singles``); the weight limits as ``budget`` says (see the module docstring)."""
    print(f"K100: {kills} concurrent kills of {kills} accounts on one worker ({budget} budget)")
    if budget == "per-account":
        await scale_weight_limits(stack, kills)
    await kill_each(stack, [stack.next_single()], "warm-up")
    one = [await kill_each(stack, [stack.next_single()], f"one {i + 1}") for i in range(runs)]
    many = await kill_each(stack, stack.take_singles(kills), f"{kills} at once")
    return FleetResult(one, many, budget)


def report_fleet(result: FleetResult) -> str:
    """Print the K100 summary; return its machine-readable line."""
    many, ratio = result.many, result.ratio
    spread = many.first_cancel_ms
    print(
        f"K100: one kill {result.one_s:.3f} s (median of {len(result.one)}), {many.kills} at "
        f"once {many.seconds:.3f} s: ratio {ratio:.2f} (target <= {TARGET:g}: "
        f"{'met' if ratio <= TARGET else 'NOT MET'}); 429 answers {result.http429} (must be 0)"
    )
    if spread:
        p50, p90 = statistics.median(spread), spread[int(0.9 * (len(spread) - 1))]
        print(
            f"K100: request -> each account's first cancel applied: first {spread[0]:.0f} ms, "
            f"median {p50:.0f} ms, p90 {p90:.0f} ms, last {spread[-1]:.0f} ms"
        )
    per_kill = many.weight / max(many.kills, 1)
    beyond = max(0.0, many.weight - FAPI_BUDGET) / FAPI_BUDGET * 60
    print(
        f"K100: request weight {many.weight:,} ({per_kill:.0f} per kill); one IP's budget is "
        f"{FAPI_BUDGET:,}/min (ours of Binance's 2,400): from one IP these kills need at least "
        f"{beyond:.0f} s more than the first minute allows"
        + (" (this run: limits x kills)" if result.budget == "per-account" else "")
    )
    print(
        f"K100: one kill: {cpu_line([r.cpu for r in result.one], [r.wall_s for r in result.one])}"
    )
    print(f"K100: {many.kills} kills: {cpu_line([many.cpu], [many.wall_s])}")
    cores = os.cpu_count() or 1
    core_s = sum(v for v in many.cpu.values() if v == v)  # nan: a process we could not read
    per_kill_ms = core_s / many.kills * 1000
    print(
        f"K100: CPU-bound: the {many.kills} kills used {core_s:.2f} core-s ({per_kill_ms:.0f} ms "
        f"per kill: worker, sandbox, Temporal); on {cores} cores that alone takes >= "
        f"{core_s / cores:.2f} s = {core_s / cores / result.one_s:.1f}x one kill"
    )
    failed = ", ".join(f"{k} {v}" for k, v in sorted(many.failed_attempts.items())) or "none"
    print(f"K100: activity attempts that raised and were retried (timeouts too): {failed}")
    why = ", ".join(f"{k} {v}" for k, v in sorted(many.retried.items())) or "none"
    print(f"K100: retries per the histories, by the failure before the last attempt: {why}")
    for label, run in (("one kill", result.one[-1]), (f"{many.kills} kills", many)):
        print(
            f"K100: {label}: the worker's event loop woke a 20 ms sleeper up to "
            f"{run.lag[1] * 1000:.0f} ms late (p99 {run.lag[0] * 1000:.0f} ms)"
        )
    for label, run in (("one kill", result.one[-1]), (f"{many.kills} kills", many)):
        steps = ", ".join(f"{k} {v:.3f}" for k, v in run.steps.items())
        print(f"K100: {label}, median s per kill: {steps}")
    if not result.ok:
        shout("K100: not every kill was verified flat without 429s")
    return (
        f"K100 kills={many.kills} one_s={result.one_s:.3f} all_s={many.seconds:.3f} "
        f"ratio={ratio:.2f} http429={result.http429} verified={many.verified}/{many.kills} "
        f"weight={many.weight} budget={result.budget}"
    )
