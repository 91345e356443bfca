"""K1 kill-switch benchmark: time-to-verified-flat through Temporal, the direct floor, naive ccxt.

Run ``python -m bench.kill_switch`` from the repo root (``make bench``). It starts its own sandbox
exchange, Temporal dev server and in-process worker in a temp dir, and seeds a fresh pair of
USDⓈ-M futures accounts (new keys) for every run: 2 accounts x 25 symbols, 1,000 open orders,
20 one-way positions, 20 ms latency on every venue request.

Time-to-verified-flat, one definition for every variant: the clock starts at "go" (a: just before
the client's ``start_workflow`` call, exactly as ``breakglass kill`` makes it; b, c: just before
the first venue call) and stops when the tool's own verify step has *returned* the look at the
venue that showed it flat (a, b: the last ``snapshot_venue_state`` of the verifying round, seen
at the activity boundary in the worker; c: the script's re-fetch). What an operator waits for
beyond that (a: the notify activity and the result long-poll) is printed as ``wall-to-result``;
the workflow's own ``time_to_flat_s`` (server start time to ``workflow.now()`` in the verify
task) is printed too. Excluded everywhere alike: seeding, and one warm connection with markets
loaded per account (a long-running worker or script has loaded them before the emergency).

The dev server runs with ``system.enableActivityEagerExecution=true`` (measured: no difference
within noise; ``--no-eager`` compares). Each run also prints, per account, the idle time between
its steps: in (a) that is Temporal's orchestration (start, task dispatch, step barriers).

Speed at the venue (issue 8), measured in the same run and printed beside the above:
- request -> first cancel applied at the venue, per run of (a) (``bench.first_cancel``: the
  sandbox journal's answer time of the first cancel), with its floor (one direct cancel over ccxt
  at the same latency) and where the time goes (client -> server, workflow task, activity
  dispatch, venue reads, cancel); target <= 150 ms;
- K1 (a) against the RTT-bound floor: the sequential round trips the protocol cannot avoid
  (``PROTOCOL_RTTS``) times the latency; target <= 2x;
- K100 (``bench.fleet``): 100 concurrent kills of 100 accounts on the one worker against one kill
  of one such account; target <= 3x with no 429.

Fairness: the worker runs in this process (as do b and c), on a fresh task queue; every variant
is warmed up once on a small book first. Runs of a and b alternate. Between runs the venue's
one-minute weight window and our client-side weight limiter are reset, as if runs were a minute
apart (one K1 kill spends about half the 2,400/min USDⓈ-M budget). Exit code 1 when any run was
not verified or not flat on the sandbox's own admin view, or any 429 was answered; targets
(a/b <= 1.25, c/a >= 10, first cancel <= 150 ms, <= 2x the RTT-bound floor, K100 <= 3x) are
reported, not enforced. ``--quick`` is a smoke run (1 run, no naive run, 20 concurrent kills).
The last two lines are machine-readable: ``K100 …`` then ``K1 a/b=… c/a=… http429=…
first_cancel_ms=… rtt_bound_ratio=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ccxt.async_support as ccxt
from temporalio.testing import ActivityEnvironment

from activities.kill import KillActivities
from activities.venue_routing import loopback_session
from bench.common import (
    K1,
    LATENCY_MS,
    WARMUP,
    Stack,
    bench_settings,
    check_flat,
    cpu_line,
    fresh_budget,
    make_pairs,
    make_singles,
    open_stack,
    seed,
    shout,
)
from bench.first_cancel import (
    TARGET_MS as TARGET_FIRST_CANCEL_MS,
)
from bench.first_cancel import (
    Breakdown,
    CancelFloor,
    cut_first_cancel,
    direct_cancel_floor,
    first_cancel,
    print_breakdowns,
)
from bench.fleet import FleetResult, measure_fleet, report_fleet
from tests.fixtures.sandbox import SandboxHandle
from tests.fixtures.venues import SandboxAccount
from worker.cli_kill import _start as cli_start_kill
from worker.process import exit_now
from workflows.kill_switch import unverified_positions
from workflows.shared import (
    AccountRequest,
    CancelAllRequest,
    FlattenRequest,
    HaltRequest,
    KillOutcome,
    KillReport,
    KillSwitchInput,
)

T = TypeVar("T")

MAX_ROUNDS = KillSwitchInput.model_fields["max_rounds"].default
TARGET_AB = 1.25
TARGET_CA = 10.0
TARGET_RTT = 2.0
STEPS = ("halt_account", "cancel_all", "flatten", "snapshot_venue_state")
PROTOCOL_RTTS = (
    ("read open orders (plain | conditional, every account at once)", 1),
    ("cancel-all per book, all at once", 1),
    ("read positions (after the cancels: a racing fill moves them)", 1),
    ("close: reduce-only market orders, all at once", 1),
    ("verify: read open orders | positions", 1),
)
"""The round trips a verified flatten needs one after the other; within a line they overlap."""


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Span:
    """One step for one account, in seconds from "go"."""

    step: str
    account: str
    start: float
    end: float


@dataclass
class RunResult:
    variant: str
    seconds: float
    """Go -> verified flat (the module docstring's definition)."""
    verified: bool
    """The tool's own verdict."""
    problem: str | None = None
    """Why the sandbox's admin view says the venue is not flat; None when it is."""
    spans: list[Span] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    cut: Breakdown | None = None
    """(a): request -> first cancel, cut at each layer's milestones."""
    cpu: dict[str, float] = field(default_factory=dict)
    """(a): CPU seconds per process from go to the result."""
    lag: tuple[float, float] = (0.0, 0.0)
    """(a): the worker's event loop, (p99, max) lateness of a 20 ms sleeper."""

    @property
    def ok(self) -> bool:
        return self.verified and self.problem is None


async def timed(spans: list[Span], step: str, account: str, go: float, call: Awaitable[T]) -> T:
    started = time.monotonic()
    try:
        return await call
    finally:
        spans.append(Span(step, account, started - go, time.monotonic() - go))


def verified_at(spans: list[Span]) -> float:
    """End of the last verify look: the verifying round is the last one."""
    return max(s.end for s in spans if s.step == "snapshot_venue_state")


# --------------------------------------------------------------------------- (a) Temporal


async def run_temporal(stack: Stack, pair: list[SandboxAccount]) -> RunResult:
    """``breakglass kill`` for both accounts: the CLI's own start call, then the result."""
    names = [a.futures for a in pair]
    for name in names:
        await stack.gateway.session(name)
    request = KillSwitchInput(accounts=names, reason="bench K1", requested_by="bench")
    stack.clock.marks.clear()
    with contextlib.redirect_stdout(io.StringIO()):  # the console notifier's message
        stack.cpu.start()
        stack.lag.start()
        go_wall, go = time.time(), time.monotonic()
        handle = await cli_start_kill(stack.temporal.client, request, stack.settings)
        report: KillReport = await handle.result()
        wall = time.monotonic() - go
        cpu = stack.cpu.stop()
        lag_p99, lag_max = stack.lag.stop()
    spans = [Span(n, a, s - go, e - go) for n, a, s, e in stack.clock.marks]
    result = RunResult(
        "a",
        verified_at(spans),
        report.outcome is KillOutcome.VERIFIED,
        spans=spans,
        extra={"time_to_flat_s": report.time_to_flat_s or float("nan"), "wall_to_result": wall},
        cpu=cpu,
        lag=(lag_p99, lag_max),
    )
    first = await first_cancel(stack, {a.api_key for a in pair}, go_wall)
    if first is not None:
        result.extra["first_cancel_ms"] = first.ms
        names_by_key = {a.api_key: a.futures for a in pair}
        result.cut = await cut_first_cancel(stack, handle, go_wall, first, names_by_key)
    return result


# --------------------------------------------------------------------------- (b) direct floor


async def direct_one(
    acts: KillActivities,
    account: str,
    tag: str,
    go: float,
    spans: list[Span],
    dead_man: bool = True,
) -> bool:
    """The same activities and requests as the workflow, awaited directly: the first cancel-all
    goes out at once with the halt (arming the dead-man) beside it, never in front (issue 8);
    before the first flatten one look at the positions as they were (the report's "before");
    cancel, flatten and verify follow each other, round after round. ``dead_man=False``: no
    halt (a caller that stopped the sender itself, as the rollback saga does)."""
    env = ActivityEnvironment()

    def step(name: str, fn: Callable[[Any], Awaitable[T]], request: Any) -> Awaitable[T]:
        return timed(spans, name, account, go, env.run(fn, request))

    look = AccountRequest(account=account)

    async def unwind() -> bool:
        for round_no in range(1, MAX_ROUNDS + 1):
            await step("cancel_all", acts.cancel_all, CancelAllRequest(account=account))
            if round_no == 1:
                await step("snapshot_venue_state", acts.snapshot_venue_state, look)
            prefix = f"{tag}r{round_no}"
            flatten = FlattenRequest(account=account, client_id_prefix=prefix)
            flat = await step("flatten", acts.flatten, flatten)
            snap = await step("snapshot_venue_state", acts.snapshot_venue_state, look)
            if not snap.open_orders and not unverified_positions(snap, flat.dust):
                return True
        return False

    if not dead_man:
        return await unwind()
    verified, _ = await asyncio.gather(
        unwind(), step("halt_account", acts.halt, HaltRequest(account=account))
    )
    return verified


async def run_direct_without_dead_man(stack: Stack, pair: list[SandboxAccount]) -> RunResult:
    """(b) without the halt: the rollback saga's kill (its sender is already stopped)."""
    return await run_direct(stack, pair, dead_man=False)


async def run_direct(stack: Stack, pair: list[SandboxAccount], dead_man: bool = True) -> RunResult:
    names = [a.futures for a in pair]
    for name in names:
        await stack.gateway.session(name)
    acts = KillActivities(stack.gateway)
    tag = "bn" + secrets.token_hex(4)
    spans: list[Span] = []
    go_wall, go = time.time(), time.monotonic()
    done = await asyncio.gather(*(direct_one(acts, n, tag, go, spans, dead_man) for n in names))
    result = RunResult("b", verified_at(spans), all(done), spans=spans)
    first = await first_cancel(stack, {a.api_key for a in pair}, go_wall)
    if first is not None:
        result.extra["first_cancel_ms"] = first.ms
    return result


# --------------------------------------------------------------------------- (c) naive ccxt


def naive_exchange(sandbox: SandboxHandle, account: SandboxAccount) -> ccxt.binanceusdm:
    """ccxt defaults (its rate limiter on), plus only what loading offline requires."""
    return ccxt.binanceusdm(
        {
            "apiKey": account.api_key,
            "secret": account.secret,
            "session": loopback_session(sandbox.address, sandbox.ca_file),
            "options": {
                "fetchCurrencies": False,
                "fetchMargins": False,
                "warnOnFetchOpenOrdersWithoutSymbol": False,
            },
        }
    )


def _amount(position: dict[str, Any]) -> float:
    return float(position["info"].get("positionAmt") or 0)


async def naive_one(ex: ccxt.binanceusdm, name: str, go: float, spans: list[Span]) -> bool:
    """Fetch, cancel one by one, close one by one (reduce-only market), re-fetch."""
    started = time.monotonic() - go
    for order in await ex.fetch_open_orders():
        await ex.cancel_order(order["id"], order["symbol"])
    spans.append(Span("cancel_all", name, started, time.monotonic() - go))
    started = time.monotonic() - go
    for p in await ex.fetch_positions():
        if amount := _amount(p):
            side = "sell" if amount > 0 else "buy"
            close_only = {"reduceOnly": True}
            await ex.create_order(p["symbol"], "market", side, abs(amount), None, close_only)
    spans.append(Span("flatten", name, started, time.monotonic() - go))
    started = time.monotonic() - go
    left = await ex.fetch_open_orders()
    open_positions = [p for p in await ex.fetch_positions() if _amount(p)]
    spans.append(Span("snapshot_venue_state", name, started, time.monotonic() - go))
    return not left and not open_positions


async def run_naive(stack: Stack, pair: list[SandboxAccount]) -> RunResult:
    exchanges = [naive_exchange(stack.sandbox, a) for a in pair]
    try:
        for ex in exchanges:
            await ex.load_markets()
        spans: list[Span] = []
        go = time.monotonic()
        done = []
        for ex, account in zip(exchanges, pair, strict=True):  # one account after the other
            done.append(await naive_one(ex, account.futures, go, spans))
        return RunResult("c", time.monotonic() - go, all(done), spans=spans)
    finally:
        for ex in exchanges:
            session = ex.session
            await ex.close()
            await session.close()


# --------------------------------------------------------------------------- runs

Runner = Callable[[Stack, list[SandboxAccount]], Awaitable[RunResult]]
VARIANTS: dict[str, tuple[str, Runner]] = {
    "a": ("breakglass kill via Temporal", run_temporal),
    "b": ("direct activities (floor)", run_direct),
    "c": ("naive sequential ccxt", run_naive),
}


async def one_run(
    stack: Stack, variant: str, spec: dict[str, Any], label: str, runner: Runner | None = None
) -> RunResult:
    """Seed a fresh pair, start from a fresh weight window, run (``variant``'s runner unless
    ``runner`` is given), then judge on the admin view."""
    pair = stack.next_pair()
    await seed(stack, pair, spec)
    await fresh_budget(stack)
    result = await (runner or VARIANTS[variant][1])(stack, pair)
    stats = await stack.admin.stats()
    if label != "warm-up":
        stack.http429 += stats.count_429
    result.problem = await check_flat(stack, pair)
    if stats.count_418:
        result.problem = f"{stats.count_418} answer(s) 418 (IP ban)"
    extra = "".join(f"  {k} {v:.3f}" for k, v in result.extra.items())
    verdict = "verified" if result.verified else "NOT VERIFIED by the tool"
    flat = "flat" if result.problem is None else f"NOT FLAT ({result.problem})"
    print(f"  {variant} {label:<8} {result.seconds:7.3f} s  {verdict}, {flat}{extra}", flush=True)
    if not result.ok:
        shout(f"run {variant} {label}: {verdict}, {flat}")
    return result


async def measure(stack: Stack, runs: int, naive_runs: int) -> dict[str, list[RunResult]]:
    results: dict[str, list[RunResult]] = {v: [] for v in VARIANTS}
    warm = [await one_run(stack, v, WARMUP, "warm-up") for v in VARIANTS if v != "c" or naive_runs]
    results["warm-up"] = warm
    for i in range(runs):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")  # no variant always goes first
        for v in order:
            results[v].append(await one_run(stack, v, K1, f"run {i + 1}"))
    for i in range(naive_runs):
        results["c"].append(await one_run(stack, "c", K1, f"run {i + 1}"))
    return results


# --------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_window(result: RunResult, step: str) -> tuple[float, float] | None:
    spans = [s for s in result.spans if s.step == step]
    if not spans:
        return None
    return min(s.start for s in spans), max(s.end for s in spans)


def breakdown(results: dict[str, list[RunResult]]) -> list[str]:
    """Median start/end of each step (first start .. last end over both accounts), s from go."""
    lines = ["where the time goes (medians; s from go; first start .. last end of both accounts)"]
    lines.append(f"  {'step':<22}" + "".join(f"{v + ' start':>10}{v + ' end':>9}" for v in "abc"))
    for step in STEPS:
        cells = []
        for v in "abc":
            windows = [w for r in results[v] if (w := step_window(r, step)) is not None]
            if windows:
                cells.append(f"{median([w[0] for w in windows]):>10.3f}")
                cells.append(f"{median([w[1] for w in windows]):>9.3f}")
            else:
                cells.append(f"{'-':>10}{'-':>9}")
        lines.append(f"  {step:<22}" + "".join(cells))
    return lines


def gaps(results: list[RunResult]) -> str:
    """Median idle time of one account, when none of its own steps ran (steps may overlap: the
    halt runs beside the cancel), named by the step that ended last and the one that started."""
    found: dict[str, list[float]] = {}
    for result in results:
        for account in {s.account for s in result.spans if s.account}:
            mine = sorted((s for s in result.spans if s.account == account), key=lambda s: s.start)
            previous, end = "go", 0.0
            for span in mine:
                if span.start >= end:
                    found.setdefault(f"{previous}->{span.step}", []).append(span.start - end)
                if span.end > end:
                    previous, end = span.step, span.end
    parts = [f"{k} {median(v) * 1000:.0f}" for k, v in found.items()]
    total = sum(median(v) for v in found.values()) * 1000
    return ", ".join(parts) + f" (sum {total:.0f} ms)"


def rtt_floor_s() -> float:
    return sum(n for _, n in PROTOCOL_RTTS) * LATENCY_MS / 1000


def report_speed(results: dict[str, list[RunResult]], floor: CancelFloor) -> tuple[float, float]:
    """Request -> first cancel against its floor, K1 against the RTT-bound floor; returns
    (median first cancel ms of a, a / RTT-bound floor)."""
    firsts = [r.extra["first_cancel_ms"] for r in results["a"] if "first_cancel_ms" in r.extra]
    first_ms = median(firsts)
    first_b = median(
        [r.extra["first_cancel_ms"] for r in results["b"] if "first_cancel_ms" in r.extra]
    )
    print(
        f"(a) request -> first cancel applied at the venue: median {first_ms:.1f} ms over "
        f"{len(firsts)} run(s) (target <= {TARGET_FIRST_CANCEL_MS:g} ms: "
        f"{'met' if first_ms <= TARGET_FIRST_CANCEL_MS else 'NOT MET'}); floor, one direct "
        f"cancel over ccxt: {floor.ms:.1f} ms to applied, {floor.rtt_ms:.1f} ms round trip "
        f"(median of {len(floor.applied_ms)}); (b) direct activities: {first_b:.1f} ms"
    )
    print_breakdowns([r.cut for r in results["a"] if r.cut is not None], firsts)
    bound = rtt_floor_s()
    a_s, b_s = median([r.seconds for r in results["a"]]), median([r.seconds for r in results["b"]])
    print(f"RTT-bound floor of a verified flatten: {bound * 1000:.0f} ms =")
    for what, n in PROTOCOL_RTTS:
        print(f"  {n} x {LATENCY_MS} ms  {what}")
    ratio = a_s / bound
    print(
        f"(a)/RTT-bound = {ratio:.2f} (target <= {TARGET_RTT:g}: "
        f"{'met' if ratio <= TARGET_RTT else 'NOT MET'}); (b)/RTT-bound = {b_s / bound:.2f}; "
        f"one round trip over ccxt measured {floor.rtt_ms:.1f} ms"
    )
    return first_ms, ratio


def report(
    results: dict[str, list[RunResult]], http429: int, eager: bool, floor: CancelFloor
) -> tuple[str, bool]:
    medians = {v: median([r.seconds for r in results[v]]) for v in VARIANTS}
    print()
    print(
        f"K1: 2 USDⓈ-M accounts x {K1['symbols']} symbols, {K1['open_orders']:,} open orders, "
        f"{K1['positions']} positions, {LATENCY_MS} ms latency per request; in-process worker; "
        f"eager activities {'on' if eager else 'off'}"
    )
    print(f"{'variant':<36}{'runs':>5}{'median s':>10}{'min s':>9}{'max s':>9}")
    for v, (title, _) in VARIANTS.items():
        secs = [r.seconds for r in results[v]]
        low, high = (min(secs), max(secs)) if secs else (float("nan"),) * 2
        print(f"({v}) {title:<32}{len(secs):>5}{medians[v]:>10.3f}{low:>9.3f}{high:>9.3f}")
    for key in ("time_to_flat_s", "wall_to_result"):
        print(f"(a) {key} median: {median([r.extra[key] for r in results['a']]):.3f} s")
    measured = [r for r in results["a"] if r.cpu]
    if measured:
        walls = [r.extra["wall_to_result"] for r in measured]
        print(f"(a) {cpu_line([r.cpu for r in measured], walls)}")
        late = median([r.lag[1] * 1000 for r in measured])
        p99 = median([r.lag[0] * 1000 for r in measured])
        print(
            f"(a) the worker's event loop woke a 20 ms sleeper up to {late:.0f} ms late "
            f"(p99 {p99:.0f} ms)"
        )
    naive = results["c"]
    if naive and medians["c"] > 20:
        print(f"(c) ran {len(naive)} time(s) only (--naive-runs): slow by design, >20 s per run")
    for line in breakdown(results):
        print(line)
    print("  (c is sequential: its windows span both accounts)")
    for v in "ab":
        print(f"({v}) idle ms between an account's steps (median): {gaps(results[v])}")
    ab, ca = medians["a"] / medians["b"], medians["c"] / medians["a"]
    first_ms, rtt_ratio = report_speed(results, floor)
    print(f"a/b = {ab:.2f} (target <= {TARGET_AB}: {'met' if ab <= TARGET_AB else 'NOT MET'})")
    print(f"c/a = {ca:.2f} (target >= {TARGET_CA:g}: {'met' if ca >= TARGET_CA else 'NOT MET'})")
    print(f"HTTP 429 answers during the measured runs: {http429} (must be 0)")
    failed = [r for rs in results.values() for r in rs if not r.ok]
    if failed:
        shout(f"{len(failed)} run(s) not verified flat")
    if http429:
        shout(f"{http429} HTTP 429 answer(s)")
    ok = not failed and http429 == 0
    last = (
        f"K1 a/b={ab:.2f} c/a={ca:.2f} http429={http429} first_cancel_ms={first_ms:.1f} "
        f"rtt_bound_ratio={rtt_ratio:.2f}"
    )
    return last, ok


# --------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace) -> tuple[list[str], bool]:
    runs, naive_runs, eager = args.runs, args.naive_runs, not args.no_eager
    with tempfile.TemporaryDirectory(prefix="bench-k1-") as tmp:
        pairs = make_pairs(len(VARIANTS) + 2 * runs + naive_runs)
        singles = make_singles(1 + (1 + args.one_kill_runs + args.kills if args.kills else 0))
        settings = bench_settings()
        async with open_stack(Path(tmp), pairs, settings, eager=eager, singles=singles) as stack:
            floor = await direct_cancel_floor(stack, stack.next_single(), args.floor_reps)
            results = await measure(stack, runs, naive_runs)
            fleet: FleetResult | None = None
            if args.kills:  # last: it may scale the weight limits
                fleet = await measure_fleet(
                    stack, args.kills, args.one_kill_runs, args.fleet_budget
                )
    last, ok = report(results, stack.http429, eager, floor)
    lines = [last]
    if fleet is not None:
        lines.insert(0, report_fleet(fleet))
        ok = ok and fleet.ok
    return lines, ok


QUICK = {"runs": 1, "naive_runs": 0, "kills": 20, "one_kill_runs": 1, "floor_reps": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.kill_switch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=5, help="measured runs of (a) and (b)")
    p.add_argument("--naive-runs", type=int, default=1, help="measured runs of (c): ~1 min each")
    p.add_argument(
        "--kills", type=int, default=100, help="K100: concurrent kills, one per account (0: skip)"
    )
    p.add_argument("--one-kill-runs", type=int, default=3, help="K100: runs of the single kill")
    p.add_argument(
        "--fleet-budget",
        choices=("per-account", "binance"),
        default="per-account",
        help="K100 weight limits: x kills (default) or Binance's single-IP budget",
    )
    p.add_argument("--floor-reps", type=int, default=9, help="direct cancels for the floor")
    p.add_argument(
        "--no-eager",
        action="store_true",
        help="dev server without system.enableActivityEagerExecution",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    rc = 1
    try:
        lines, ok = asyncio.run(bench(args))
        rc = 0 if ok else 1
        for line in lines:
            print(line)
    finally:
        exit_now(rc)


if __name__ == "__main__":
    main()
