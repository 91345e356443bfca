"""Request -> first cancel applied at the venue: its measure, its floor and where the time goes.

The venue's own records decide: the sandbox journal (``GET /admin/requests``) gives, per trading
request, when it arrived and when its answer was ready (the cancel was applied by then; the
injected latency comes before the handler). "First cancel" is the earliest answered cancel request
(any cancel endpoint, HTTP 200) of the kill's accounts. Its clock starts just before the client's
``start_workflow`` (``breakglass kill``'s own start call), on ``time.time()``, the clock the journal
and Temporal's history use too (one machine).

The floor: one cancel-all of one symbol sent directly over ccxt (throttle off, markets loaded,
connection warm), from just before the call to the venue's answer time; the median of a few.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import ccxt.async_support as ccxt
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from activities.venue_routing import loopback_session
from bench.common import Stack, wall
from sandbox.admin_models import RequestRecord
from sandbox.markets import MARKETS
from sandbox.seed import BookSpec, SeedAccount, seed_book
from tests.fixtures.venues import SandboxAccount

CANCELS = frozenset(
    {
        ("DELETE", "/fapi/v1/allOpenOrders"),
        ("DELETE", "/fapi/v1/order"),
        ("DELETE", "/fapi/v1/batchOrders"),
        ("DELETE", "/fapi/v1/algoOpenOrders"),
        ("DELETE", "/fapi/v1/algoOrder"),
        ("DELETE", "/api/v3/openOrders"),
        ("DELETE", "/api/v3/order"),
    }
)
TARGET_MS = 150.0


@dataclass(frozen=True)
class FirstCancel:
    ms: float
    """Go -> the first cancel's answer at the venue."""
    api_key: str
    cancel: RequestRecord
    before: list[RequestRecord]
    """That account's requests that arrived between go and its first cancel."""


async def first_cancel(stack: Stack, keys: Collection[str], go_wall: float) -> FirstCancel | None:
    """The first cancel the venue applied for any of ``keys`` after ``go_wall`` (None: none)."""
    records = [r for r in await stack.admin.requests(since=go_wall) if r.api_key in keys]
    cancels = [r for r in records if (r.method, r.path) in CANCELS and r.status == 200]
    if not cancels:
        return None
    first = min(cancels, key=lambda r: r.answered)
    before = [r for r in records if r.api_key == first.api_key and r.arrived < first.arrived]
    return FirstCancel((first.answered - go_wall) * 1000, first.api_key or "", first, before)


def first_cancels_per_key(
    records: Sequence[RequestRecord], go_wall: float
) -> dict[str | None, float]:
    """Per account: go -> its first applied cancel, in ms (the 100-kills spread)."""
    out: dict[str | None, float] = {}
    for r in records:
        if (r.method, r.path) in CANCELS and r.status == 200:
            ms = (r.answered - go_wall) * 1000
            out[r.api_key] = min(out.get(r.api_key, ms), ms)
    return out


# --------------------------------------------------------------------------- the floor


@dataclass(frozen=True)
class CancelFloor:
    applied_ms: list[float]
    """Call -> the venue's answer time (the cancel applied), one per repetition."""
    round_trip_ms: list[float]
    """Call -> ccxt returned."""

    @property
    def ms(self) -> float:
        return statistics.median(self.applied_ms)

    @property
    def rtt_ms(self) -> float:
        return statistics.median(self.round_trip_ms)


async def direct_cancel_floor(stack: Stack, account: SandboxAccount, reps: int) -> CancelFloor:
    """One cancel-all of one symbol with one open order, over plain ccxt, ``reps`` times (after
    one unmeasured warm-up): what no tool can beat at this RTT."""
    market = MARKETS[0]
    spec = {"symbols": 1, "open_orders": 1, "positions": 0, "spot_orders_fraction": 0.0}
    seed_as = [SeedAccount(api_key=account.api_key, secret=account.secret)]
    exchange = ccxt.binanceusdm(
        {
            "apiKey": account.api_key,
            "secret": account.secret,
            "session": loopback_session(stack.sandbox.address, stack.sandbox.ca_file),
            "enableRateLimit": False,
            "options": {"fetchCurrencies": False, "fetchMargins": False},
        }
    )
    applied: list[float] = []
    round_trip: list[float] = []
    try:
        for i in range(reps + 1):
            book = BookSpec(accounts=seed_as, create_accounts=i == 0, **spec)
            await seed_book(stack.admin, book)
            if i == 0:
                await exchange.load_markets()
            symbol = exchange.markets_by_id[market.symbol][0]["symbol"]
            go = time.time()
            await exchange.cancel_all_orders(symbol)
            back = time.time()
            records = await stack.admin.requests(since=go, api_key=account.api_key)
            cancel = next(r for r in records if (r.method, r.path) in CANCELS)
            if i > 0:
                applied.append((cancel.answered - go) * 1000)
                round_trip.append((back - go) * 1000)
    finally:
        session = exchange.session
        await exchange.close()
        await session.close()
    return CancelFloor(applied, round_trip)


# --------------------------------------------------------------------------- where the time goes


@dataclass
class Breakdown:
    """Go -> first cancel applied, cut at the milestones every layer records (ms)."""

    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _at(event: object) -> float:
    stamp = event.event_time  # type: ignore[attr-defined]
    return float(stamp.seconds) + stamp.nanos / 1e9


async def cut_first_cancel(
    stack: Stack,
    handle: WorkflowHandle,
    go_wall: float,
    first: FirstCancel,
    names: dict[str, str],
) -> Breakdown:
    """Cut (a) at: the server's WorkflowExecutionStarted, the first workflow task picked up, the
    workflow task completion that scheduled the cancelling activity, that activity's start in the
    worker, the venue reads it made before the cancel, the cancel itself."""
    out = Breakdown()
    events = (await handle.fetch_history()).events
    started = next(
        _at(e) for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    )
    picked = [_at(e) for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED]
    completed = [
        _at(e) for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]
    account = names.get(first.api_key, "?")
    cancel = first.cancel
    # The activity that sent the first cancel: the account's activity running when it arrived;
    # when several ran (the halt runs beside the cancel), the one whose name says it cancels.
    holders = [
        (kind, s, e)
        for kind, acct, s, e in stack.clock.marks
        if acct == account and wall(s) <= cancel.arrived <= wall(e) + 0.001
    ]
    holders.sort(key=lambda h: ("cancel" not in h[0], -h[1]))
    ms = 1000.0
    out.parts["client -> server (start_workflow)"] = (started - go_wall) * ms
    out.parts["server -> worker (first workflow task)"] = (picked[0] - started) * ms
    if not holders:
        out.notes.append(f"no activity of {account} was running when its first cancel arrived")
        out.parts["rest"] = (cancel.answered - picked[0]) * ms
        return out
    kind, mono_start, _ = holders[0]
    local = (kind, account, mono_start) in stack.clock.local
    act_start = wall(mono_start)
    beside = [
        f"{k} {1000 * (wall(s) - go_wall):.0f}..{1000 * (wall(e) - go_wall):.0f} ms"
        for k, a, s, e in stack.clock.marks
        if a == account and wall(s) <= cancel.answered and (k, s) != (kind, mono_start)
    ]
    if beside:
        out.notes.append(
            f"{account}'s other activities started before its first cancel: " + ", ".join(beside)
        )
    scheduled_by = [t for t in completed if t <= act_start]
    if local or not scheduled_by:
        label = f"workflow task -> {kind} starts (local activity)"
        out.parts[label] = (act_start - picked[0]) * ms
    else:
        out.parts[f"workflow task (until it scheduled {kind})"] = (
            scheduled_by[-1] - picked[0]
        ) * ms
        out.parts[f"activity dispatch ({kind} starts in the worker)"] = (
            act_start - scheduled_by[-1]
        ) * ms
    reads = [r for r in first.before if r.arrived >= act_start - 0.001]
    # Only the part of each request that fell between the activity's start and the cancel.
    clipped = [(max(r.arrived, act_start), min(r.answered, cancel.arrived)) for r in reads]
    at_venue = _covered([(a, b) for a, b in clipped if b > a])
    gap = cancel.arrived - act_start
    listed = ", ".join(
        f"{r.method} {r.path} {1000 * (r.answered - r.arrived):.0f}" for r in reads[:6]
    )
    out.parts["venue requests before the cancel (at the venue, overlaps once)"] = at_venue * ms
    out.parts["in the worker before the cancel (parse, sign, connect, code)"] = (
        gap - at_venue
    ) * ms
    out.parts["cancel (arrives -> applied at the venue)"] = (cancel.answered - cancel.arrived) * ms
    if reads:
        out.notes.append(
            f"{account}'s venue requests from {kind}'s start to its first cancel "
            f"(ms at the venue): {listed}"
        )
    return out


def _covered(spans: list[tuple[float, float]]) -> float:
    """Time during which at least one span was open (concurrent reads counted once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def print_breakdowns(found: list[Breakdown], first_ms: list[float]) -> None:
    """Median of each part over the runs (parts sum to about the median first cancel)."""
    if not found:
        return
    labels: list[str] = []
    for b in found:
        labels += [label for label in b.parts if label not in labels]
    print("(a) request -> first cancel, where the time goes (median ms over runs)")
    for label in labels:
        values = [b.parts[label] for b in found if label in b.parts]
        print(f"  {label:<58}{statistics.median(values):>8.1f}  ({len(values)} run(s))")
    print(f"  {'= request -> first cancel applied':<58}{statistics.median(first_ms):>8.1f}")
    for note in found[-1].notes:
        print(f"  last run: {note}")
