"""The sample strategy as a real process on the sandbox: trading, states, faulty releases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import AccountState, Limits, PositionSet
from sandbox.strategy import lease
from sandbox.strategy.app import client_order_id
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import ReleaseConflict, build_release
from sandbox.strategy.state import (
    Database,
    TradingState,
    fold_cash,
    get_trading_state,
    missing_table,
    set_trading_state,
    state_history,
)
from sandbox.weights import weight_of
from tests.fixtures.sandbox import (
    REPO,
    NewAccount,
    SandboxHandle,
    TestAccount,
    start_sandbox,
    stop_sandbox,
)
from tests.helpers import assert_eventually

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def strategy_config(
    sandbox: SandboxHandle, workdir: Path, db: str | None = None, **overrides: Any
) -> StrategyConfig:
    """A config trading on ``sandbox``; credentials are read from STRATEGY_* variables."""
    return StrategyConfig(
        exchange_address=sandbox.address,
        ca_file=sandbox.ca_file,
        db=db or str(workdir / "strategy.sqlite"),
        port_file=workdir / "http.port",
        client_id_prefix=f"sg{secrets.token_hex(2)}",
        **overrides,
    )


def strategy_env(sandbox: SandboxHandle, account: TestAccount) -> dict[str, str]:
    return {
        **os.environ,
        "STRATEGY_API_KEY": account.api_key,
        "STRATEGY_API_SECRET": account.secret,
    }


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    config: StrategyConfig
    account: TestAccount
    workdir: Path

    @property
    def base_url(self) -> str:
        assert self.config.port_file is not None
        return f"http://127.0.0.1:{self.config.port_file.read_text()}"

    def log(self) -> str:
        return (self.workdir / "strategy.log").read_text(errors="replace")


Launch = Callable[..., Awaitable[Running]]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PROBE_S = 10.0
"""One HTTP request's timeout: the strategy answers from its event loop, which a busy machine
(or its own fold of a million fills) can hold up for seconds."""
START_S = 180.0
"""Polls that wait for a process to start or act; only a failing test waits this long (on a
loaded 2-core machine a strategy took a minute just to import ccxt and write its port file)."""
UNREACHABLE = (aiohttp.ClientError, OSError)
"""What a probe of a process that is still starting raises (no port file yet, connection
refused, a timeout): "not yet" to ``assert_eventually``."""


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(PROBE_S)
    async with aiohttp.ClientSession() as s, s.get(url, timeout=timeout) as r:
        return r.status, await r.json()


async def metrics(run: Running) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser, keyed by name+labels."""
    timeout = aiohttp.ClientTimeout(PROBE_S)
    async with aiohttp.ClientSession() as s, s.get(run.base_url + "/metrics", timeout=timeout) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


@contextlib.contextmanager
def launcher(sandbox: SandboxHandle, new_account: NewAccount, tmp_path: Path) -> Iterator[Launch]:
    """``await launch(fault=..., **config)``: build a release and run it on ``sandbox``; every
    process started is stopped on the way out."""
    procs: list[subprocess.Popen[bytes]] = []

    async def start(
        fault: Fault = Fault.NONE,
        version: str | None = None,
        account: TestAccount | None = None,
        wait_healthy: bool = True,
        **overrides: Any,
    ) -> Running:
        account = account or await new_account()
        version = version or f"v-{fault.value}"
        workdir = tmp_path / f"run-{len(procs)}"
        workdir.mkdir()
        release = build_release(tmp_path / "releases", "sample", version, fault)
        config = strategy_config(sandbox, workdir, **overrides)
        (workdir / "config.json").write_text(config.model_dump_json())
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the test needs the handle
            [sys.executable, "-m", "sandbox.strategy", "--release", str(release),
             "--config", str(workdir / "config.json")],
            cwd=REPO, env=strategy_env(sandbox, account),
            stdout=(workdir / "strategy.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        run = Running(proc, config, account, workdir)
        if wait_healthy:

            async def healthy() -> None:
                assert proc.poll() is None, run.log()
                assert config.port_file is not None and config.port_file.exists()
                status, body = await get_json(run.base_url + "/healthz")
                assert status == 200, body

            await assert_eventually(healthy, timeout=START_S, retry_on=UNREACHABLE)
        return run

    try:
        yield start
    finally:
        for proc in procs:
            stop_process(proc)


@pytest.fixture
def launch(sandbox: SandboxHandle, new_account: NewAccount, tmp_path: Path) -> Iterator[Launch]:
    """``await launch(fault=..., **config)``: build a release and run it until the test ends."""
    with launcher(sandbox, new_account, tmp_path) as start:
        yield start


def ours(state: AccountState, run: Running) -> list[Any]:
    return [o for o in state.orders if o.client_order_id.startswith(run.config.client_id_prefix)]


# ---------------------------------------------------------------------- the good release


async def test_good_release_trades_keeps_state_and_is_healthy(
    launch: Launch, sandbox_admin: SandboxAdmin
) -> None:
    await sandbox_admin.reset_stats()
    run = await launch()

    async def quoting() -> None:
        state = await sandbox_admin.state(run.account.api_key)
        sides = {(o.symbol, o.side) for o in state.open_orders}
        assert sides == {(s, side) for s in run.config.symbols for side in ("BUY", "SELL")}

    await assert_eventually(quoting, timeout=START_S)
    state = await sandbox_admin.state(run.account.api_key)
    assert all(o.client_order_id.startswith(run.config.client_id_prefix) for o in state.orders)
    prices = (await sandbox_admin.prices()).prices
    for o in state.open_orders:
        assert o.qty * prices[o.symbol] <= run.config.max_position_notional

    status, body = await get_json(run.base_url + "/healthz")
    assert status == 200
    assert body["version"] == "v-none" and body["trading_state"] == "ACTIVE"
    assert body["feed_fresh"] and body["db_ok"] and body["last_loop_at"]
    samples = await metrics(run)
    assert total(samples, "strategy_orders_placed_total") >= 4
    assert total(samples, "strategy_order_rejects_total") == 0
    assert samples["strategy_release_info{fault=none,version=v-none}"] == 1
    for name in ("strategy_pnl_usdt", "strategy_feed_staleness_seconds", "strategy_fill_rate"):
        assert f"{name}{{}}" in samples
    assert "strategy_order_latency_seconds_count{}" in samples

    # Its own database mirrors the venue: every accepted order is there by client id.
    import sqlite3

    with sqlite3.connect(run.config.db) as conn:
        rows = dict(conn.execute("SELECT client_order_id, status FROM orders").fetchall())
    assert {o.client_order_id for o in state.orders} <= set(rows)


async def test_halted_stops_orders_within_one_loop_and_reducing_only_reduces(
    launch: Launch, sandbox_admin: SandboxAdmin, new_account: NewAccount
) -> None:
    account = await new_account()
    await sandbox_admin.set_positions(
        account.api_key, [PositionSet(symbol="BTCUSDT", qty=Decimal("0.004"))]
    )
    run = await launch(account=account, loop_interval_s=0.3)
    await assert_eventually(lambda: _has_open_orders(sandbox_admin, run), timeout=START_S)

    change = set_trading_state(run.config.db, TradingState.HALTED, "test", "halt drill")
    assert change.changed

    async def nothing_rests() -> None:
        # A loop that read HALTED runs, so every loop that read ACTIVE has ended (a requote's
        # cancel-then-place would otherwise look like nothing resting for a moment).
        _, body = await get_json(run.base_url + "/healthz")
        assert body["trading_state"] == "HALTED", body
        state = await sandbox_admin.state(run.account.api_key)
        assert state.open_orders == []

    # The next loop reads the state and cancels. Polled, not timed: on a busy machine a loop
    # takes what it takes (the loop-count checks below are what bounds the strategy).
    await assert_eventually(nothing_rests, timeout=START_S, retry_on=UNREACHABLE)
    count = len(ours(await sandbox_admin.state(run.account.api_key), run))
    # Three more loops: still nothing new.
    await assert_eventually(lambda: _loops_at_least(run, 3), timeout=START_S)
    assert len(ours(await sandbox_admin.state(run.account.api_key), run)) == count
    _, body = await get_json(run.base_url + "/healthz")
    assert body["trading_state"] == "HALTED"

    halted = await sandbox_admin.state(run.account.api_key)
    size_before = {p.symbol: abs(p.qty) for p in halted.positions}
    set_trading_state(run.config.db, TradingState.REDUCING, "test", "wind down")

    async def reducing() -> None:
        state = await sandbox_admin.state(run.account.api_key)
        new = ours(state, run)[count:]
        assert new, "no reduce-only order yet"
        assert all(o.reduce_only for o in new), [(o.symbol, o.side, o.reduce_only) for o in new]
        assert all(o.reduce_only for o in state.open_orders)

    await assert_eventually(reducing, timeout=START_S)
    await assert_eventually(lambda: _loops_at_least(run, 3), timeout=START_S)
    await reducing()
    state = await sandbox_admin.state(run.account.api_key)
    # Reduce-only orders shrink positions, never grow them.
    assert all(abs(p.qty) <= size_before.get(p.symbol, 0) for p in state.positions)


async def _has_open_orders(admin: SandboxAdmin, run: Running) -> bool:
    return bool((await admin.state(run.account.api_key)).open_orders)


_loop_marks: dict[int, float] = {}


async def _loops_at_least(run: Running, n: int) -> bool:
    """True once ``n`` loops have finished since the first call for this process."""
    loops = total(await metrics(run), "strategy_loops_total")
    start = _loop_marks.setdefault(run.proc.pid, loops)
    if loops - start >= n:
        del _loop_marks[run.proc.pid]
        return True
    return False


# ---------------------------------------------------------------------- faulty releases


async def test_faulty_releases_misbehave_observably(
    launch: Launch, sandbox_admin: SandboxAdmin
) -> None:
    await sandbox_admin.reset_stats()
    one = {"symbols": ["ETHUSDT"], "loop_interval_s": 0.5}
    storm = await launch(Fault.REJECT_STORM, **one)
    slow = await launch(Fault.LATENCY, **one)
    big = await launch(Fault.OVERSIZED, **one)
    crash = await launch(Fault.CRASH_LOOP, wait_healthy=False, **one)

    async def storming() -> None:
        samples = await metrics(storm)
        assert total(samples, "strategy_order_rejects_total") >= 6
        assert total(samples, "strategy_orders_placed_total") == 0

    await assert_eventually(storming, timeout=START_S)
    stats = await sandbox_admin.stats()
    assert stats.requests_by_status.get("400", 0) >= 6
    assert ours(await sandbox_admin.state(storm.account.api_key), storm) == []

    async def oversized() -> None:
        state = await sandbox_admin.state(big.account.api_key)
        prices = (await sandbox_admin.prices()).prices
        cap = big.config.max_position_notional
        assert any(o.qty * prices[o.symbol] > 10 * cap for o in state.open_orders)

    await assert_eventually(oversized, timeout=START_S)

    async def slow_orders() -> None:
        samples = await metrics(slow)
        count = samples["strategy_order_latency_seconds_count{}"]
        fast = samples["strategy_order_latency_seconds_bucket{le=0.5}"]
        assert count >= 2 and fast == 0

    await assert_eventually(slow_orders, timeout=START_S)

    assert crash.proc.wait(timeout=START_S) == 3
    assert "crash-loop release: exiting on purpose" in crash.log()


# ---------------------------------------------------------------------- state module


def test_set_trading_state_records_who_when_why_and_repeats_are_noops(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    assert get_trading_state(db).state == TradingState.ACTIVE
    first = set_trading_state(db, TradingState.HALTED, "alice", "incident 42")
    assert first.changed and first.current.changed_by == "alice"
    again = set_trading_state(db, "HALTED", "bob", "double click")
    assert not again.changed and "already HALTED" in again.message and "alice" in again.message
    record = get_trading_state(db)
    assert (record.state, record.changed_by, record.reason) == ("HALTED", "alice", "incident 42")
    assert [(h[1], h[2], h[3], h[4]) for h in state_history(db)] == [
        ("ACTIVE", "HALTED", "alice", "incident 42")
    ]
    with pytest.raises(ValueError):
        set_trading_state(db, TradingState.ACTIVE, "", "no one")


async def test_postgres_backend_runs_the_strategy(
    launch: Launch, sandbox_admin: SandboxAdmin
) -> None:
    name = f"bg_strategy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        run = await launch(db=dsn, symbols=["ETHUSDT"])
        await assert_eventually(lambda: _has_open_orders(sandbox_admin, run), timeout=START_S)
        assert set_trading_state(dsn, TradingState.HALTED, "test", "pg halt").changed
        assert not set_trading_state(dsn, TradingState.HALTED, "test", "again").changed

        async def halted() -> None:
            _, body = await get_json(run.base_url + "/healthz")
            assert body["trading_state"] == "HALTED"
            assert (await sandbox_admin.state(run.account.api_key)).open_orders == []

        await assert_eventually(halted, timeout=START_S)
        with psycopg.connect(dsn) as conn:
            orders = conn.execute("SELECT count(*) FROM orders WHERE order_id IS NOT NULL")
            row = orders.fetchone()
            assert row is not None and row[0] >= 2
        stop_process(run.proc)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------- the trading lease


async def test_without_the_lease_it_decides_but_sends_nothing_until_granted(
    launch: Launch, sandbox_admin: SandboxAdmin, tmp_path: Path
) -> None:
    db = str(tmp_path / "leased.sqlite")
    key = StrategyConfig.model_fields["api_key_env"].default  # no ``account``: the lease key
    other = lease.grant(db, key, "v-other", "test", "another version trades")
    run = await launch(db=db, symbols=["ETHUSDT"], loop_interval_s=0.3)
    await assert_eventually(lambda: _loops_at_least(run, 4), timeout=START_S)

    # A shadow: nothing on the venue, its decisions logged unsent, the epoch acknowledged.
    assert (await sandbox_admin.state(run.account.api_key)).orders == []
    with Database(db).transaction() as cur:
        logged = cur.execute("SELECT DISTINCT sent FROM decisions WHERE version = 'v-none'")
        assert logged.fetchall() == [(0,)]
    assert lease.acknowledged(db, key, "v-none") == other.epoch
    _, body = await get_json(run.base_url + "/healthz")
    assert body["healthy"] and not body["sending"] and body["lease_epoch"] == other.epoch

    granted = lease.grant(db, key, "v-none", "test", "handed over")
    await assert_eventually(lambda: _has_open_orders(sandbox_admin, run), timeout=START_S)
    state = await sandbox_admin.state(run.account.api_key)
    tag = f"{run.config.client_id_prefix}-v_none-"  # the version, "-" made "_"
    assert state.orders and all(o.client_order_id.startswith(tag) for o in state.orders)

    # Acknowledged at the end of the loop that sent (its orders are on the venue before that).
    def acknowledged() -> None:
        assert lease.acknowledged(db, key, "v-none") == granted.epoch

    await assert_eventually(acknowledged, timeout=START_S)


def test_client_order_ids_carry_the_version_within_the_venues_limit() -> None:
    assert client_order_id("sgab12", "2.0.0", 3, "ETHUSDT", "buy", 17) == (
        "sgab12-2.0.0-3-ETHUSDT-B-17"
    )
    long = client_order_id("prefix123456", "1.2.3-rc.1+b", 123456, "1000PEPEUSDT", "sell", 10**9)
    assert len(long) == 36 and long.startswith("prefix123456-1.2.3_rc.1-"), long
    assert re.fullmatch(r"[.A-Z:/a-z0-9_-]{1,36}", long)  # Binance's newClientOrderId


# ---------------------------------------------------------------------- releases


def test_releases_are_immutable_and_idempotent(tmp_path: Path) -> None:
    first = build_release(tmp_path, "sample", "1.0.0", Fault.NONE)
    manifest = json.loads((first / "release.json").read_text())
    assert manifest["version"] == "1.0.0" and manifest["fault"] == "none"
    assert build_release(tmp_path, "sample", "1.0.0", "none") == first
    assert json.loads((first / "release.json").read_text()) == manifest
    with pytest.raises(ReleaseConflict, match="refusing to overwrite"):
        build_release(tmp_path, "sample", "1.0.0", Fault.CRASH_LOOP)
    assert (first / "run.sh").stat().st_mode & 0o111
    assert "--release" in (first / "run.sh").read_text()
    with pytest.raises(ValueError):
        build_release(tmp_path, "sample", "current", Fault.NONE)


# ---------------------------------------------------------------------- P&L, stopping, weight


def seed_fills(db: Path, n: int) -> None:
    """``n`` old fills in the strategy's schema, written server-side (a million in about 1 s)."""
    Database(db).init_schema()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO fills (client_order_id, symbol, side, qty, price, at) "
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?) "
            "SELECT 'old-' || (i / 10), 'ETHUSDT', CASE i % 3 WHEN 0 THEN 'buy' ELSE 'sell' END, "
            "'0.0' || (i % 97 + 3), '2400.' || (i % 89 + 10), '2026-01-01T00:00:00+00:00' FROM k",
            (n,),
        )


def cash_and_fills(db: str) -> tuple[Decimal | None, Decimal, int]:
    """``pnl_cash.cash``, the same sum over every fill, and the fill count: one transaction."""
    with Database(db).transaction() as cur:
        row = cur.execute("SELECT cash FROM pnl_cash WHERE id = 1").fetchone()
        total = Decimal(0)
        fills = cur.execute("SELECT side, qty, price FROM fills").fetchall()
        for side, qty, price in fills:
            total += Decimal(qty) * Decimal(price) * (-1 if side == "buy" else 1)
    return (Decimal(row[0]) if row else None), total, len(fills)


def copy_database(source: Path, target: Path) -> None:
    """A consistent whole-database copy, as the snapshot activity takes and restores them."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


async def test_pnl_cash_is_the_sum_over_fills_across_restarts_and_restores(
    launch: Launch, tmp_path: Path
) -> None:
    db = tmp_path / "pnl.sqlite"

    async def fills_beyond(n: int) -> None:
        assert cash_and_fills(str(db))[2] > n

    async def consistent(run: Running) -> None:
        await assert_eventually(lambda: _loops_at_least(run, 2), timeout=START_S)
        cash, total, _ = cash_and_fills(str(db))
        assert cash == total

    first = await launch(db=str(db), loop_interval_s=0.3)
    await assert_eventually(lambda: fills_beyond(3), timeout=START_S)
    snapshot = tmp_path / "snapshot.sqlite"
    copy_database(db, snapshot)
    stop_process(first.proc)
    cash, total, count = cash_and_fills(str(db))
    assert cash == total and count > 3

    # A restart carries on from the database's own row.
    again = await launch(db=str(db), loop_interval_s=0.3, account=first.account)
    await assert_eventually(lambda: fills_beyond(count), timeout=START_S)
    await consistent(again)

    # The snapshot restored under the running process: its cash comes back with its fills.
    copy_database(snapshot, db)
    await consistent(again)
    # A snapshot from before pnl_cash existed: the cash is summed once from every fill.
    legacy = tmp_path / "legacy.sqlite"
    copy_database(snapshot, legacy)
    with contextlib.closing(sqlite3.connect(legacy)) as conn:
        conn.execute("DROP TABLE pnl_cash")
    copy_database(legacy, db)
    await consistent(again)
    stop_process(again.proc)
    cash, total, _ = cash_and_fills(str(db))
    assert cash == total
    assert "lacks a table" in again.log()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.servers)])
def test_fold_cash_is_exact_incremental_and_recovers(backend: str, tmp_path: Path) -> None:
    with _database(backend, tmp_path) as ref:
        db = Database(ref)
        db.init_schema()
        rng = random.Random(7)

        def add(n: int) -> None:
            with db.transaction() as cur:
                for _ in range(n):
                    side = rng.choice(["buy", "sell"])
                    qty = f"0.{rng.randrange(1, 10**6):06d}"
                    price = f"{rng.randrange(1, 70000)}.{rng.randrange(100):02d}"
                    cur.execute(
                        "INSERT INTO fills (client_order_id, symbol, side, qty, price, at) "
                        "VALUES ('c', 'BTCUSDT', ?, ?, ?, 'now')",
                        (side, qty, price),
                    )

        def fold() -> tuple[Decimal, Decimal, int]:
            with db.transaction() as cur:
                cash = fold_cash(cur)
                row = cur.execute("SELECT fills_through FROM pnl_cash").fetchone()
                top = cur.execute("SELECT MAX(id) FROM fills").fetchone()
                assert row is not None and top is not None and int(row[0]) == int(top[0] or 0)
                truth = Decimal(0)
                for side, qty, price in cur.execute(
                    "SELECT side, qty, price FROM fills"
                ).fetchall():
                    truth += Decimal(qty) * Decimal(price) * (-1 if side == "buy" else 1)
            return cash, truth, int(row[0])

        assert fold()[:2] == (Decimal(0), Decimal(0))
        add(300)
        cash, truth, through = fold()
        assert cash == truth != 0
        add(3)
        cash, truth, later = fold()
        assert cash == truth and later == through + 3
        # Fills rewound below the row (restored without it): summed again from scratch.
        with db.transaction() as cur:
            cur.execute("DELETE FROM fills WHERE id > ?", (through - 50,))
        cash, truth, _ = fold()
        assert cash == truth
        with db.transaction() as cur:
            cur.execute("DELETE FROM pnl_cash")
        assert fold()[0] == truth
        # A database from before the table: the strategy creates it and folds every fill.
        with db.transaction() as cur:
            cur.execute("DROP TABLE pnl_cash")
        with pytest.raises(Exception) as missing:
            fold()
        assert missing_table(missing.value)
        db.init_schema()
        assert fold()[0] == truth


@contextlib.contextmanager
def _database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield str(tmp_path / "fold.sqlite")
        return
    name = f"bg_strategy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _sigterm(run: Running) -> None:
    """SIGTERM, then the exit: clean (0) and logged. How soon is not asserted (a busy machine
    decides that); what the stop did not wait for is, by each caller."""
    run.proc.send_signal(signal.SIGTERM)
    # A hang detector, not a bound: a stop that waited for the work below takes minutes.
    code = await asyncio.to_thread(run.proc.wait, START_S)
    assert code == 0, run.log()
    assert "stopped" in run.log()


def _decided(db: Path, version: str) -> bool:
    """``version`` logged decisions it was about to send (what it does before deciding slowly)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM decisions WHERE version = ? AND sent = 1", (version,)
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.timeout(900)  # a hang detector: six strategy starts take minutes on a busy machine
async def test_sigterm_exits_within_a_loop_even_mid_read_and_records_what_it_sent(
    launch: Launch, sandbox_admin: SandboxAdmin, tmp_path: Path
) -> None:
    db = tmp_path / "million.sqlite"
    seed_fills(db, 1_000_000)
    # The first loop on this database sums a million fills into pnl_cash: seconds of reading.
    cold = await launch(db=str(db), wait_healthy=False)

    async def in_first_loop() -> None:
        samples = await metrics(cold)
        assert samples.get("strategy_feed_staleness_seconds{}", 0) > 0, "prices not read yet"
        assert total(samples, "strategy_loops_total") == 0, "the first loop already ended"

    # Prices read, no loop ended: it is reconciling, and its fold of a million fills is next.
    await assert_eventually(in_first_loop, timeout=START_S, retry_on=UNREACHABLE)
    await _sigterm(cold)
    # It did not wait for the read: the abandoned fold committed nothing.
    assert cash_and_fills(str(db))[0] is None

    warm = await launch(db=str(db), account=cold.account, loop_interval_s=0.5)
    for offset in (0.0, 0.17, 0.31):  # somewhere in the loop or its pause
        await assert_eventually(lambda: _loops_at_least(warm, 2), timeout=START_S)  # noqa: B023
        await asyncio.sleep(offset)  # where in the loop the stop lands, not a wait for anything
        await _sigterm(warm)
        cash, truth, _ = cash_and_fills(str(db))
        assert cash == truth
        warm = await launch(db=str(db), account=cold.account, loop_interval_s=0.5)

    # The slow release "thinks" before each order, far longer than any test runs: a stop then
    # cuts the thinking short and sends nothing. It logs its decisions before thinking.
    # Not waited healthy: once its first loop is thinking, /healthz rightly says it is stuck,
    # and on a busy machine that can come before the first probe. Its decisions are the cue.
    slow = await launch(
        Fault.LATENCY,
        db=str(db),
        account=cold.account,
        loop_interval_s=0.5,
        latency_fault_s=600,
        wait_healthy=False,
    )
    stop_process(warm.proc)
    await assert_eventually(lambda: _decided(db, "v-latency"), timeout=START_S)
    await _sigterm(slow)
    assert "finishing the orders in flight" in slow.log()
    assert ours(await sandbox_admin.state(cold.account.api_key), slow) == []
    # Nothing half-recorded: every order the venue has from these runs is in the database with
    # the venue's id.
    state = await sandbox_admin.state(cold.account.api_key)
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT client_order_id, order_id FROM orders").fetchall())
    assert state.orders
    for o in state.orders:
        assert rows.get(o.client_order_id) == str(o.order_id), o.client_order_id


# ---------------------------------------------------------------------- on a venue of its own


@dataclass
class OwnVenue:
    """A sandbox only these tests use: its request counts and weight are the strategy's."""

    handle: SandboxHandle
    admin: SandboxAdmin
    launch: Launch


@pytest.fixture(scope="module")
def own_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    proc, handle = start_sandbox(tmp_path_factory.mktemp("own-sandbox"))
    try:
        yield handle
    finally:
        stop_sandbox(proc)


@pytest.fixture
async def own_venue(own_sandbox: SandboxHandle, tmp_path: Path) -> AsyncIterator[OwnVenue]:
    async with SandboxAdmin(own_sandbox.admin_url, own_sandbox.admin_token) as admin:

        async def account(**kwargs: object) -> TestAccount:
            key, secret = secrets.token_hex(16), secrets.token_hex(32)
            state = await admin.create_account(key, secret, **kwargs)  # type: ignore[arg-type]
            return TestAccount(api_key=key, secret=secret, state=state)

        with launcher(own_sandbox, account, tmp_path) as start:
            yield OwnVenue(own_sandbox, admin, start)
        await admin.set_limits(Limits(fapi_weight_limit=2400, ban_after=5, ban_s=120))
        await admin.reset_stats()


async def test_weight_per_loop_is_small_and_no_admin_token_is_needed(own_venue: OwnVenue) -> None:
    """At 0.5 s loops on two symbols: one premiumIndex per loop for every price, one openOrders
    per symbol, positionRisk every 5 s, order lookups only for orders it did not cancel."""
    run = await own_venue.launch(loop_interval_s=0.5)
    env = strategy_env(own_venue.handle, run.account)
    config_text = (run.workdir / "config.json").read_text()
    assert own_venue.handle.admin_token not in {*env.values(), config_text}
    assert "feed" not in json.loads(config_text)

    if time.time() % 60 > 45:  # count inside one of the venue's minute windows if we can
        await asyncio.sleep(60.5 - time.time() % 60)
    minute = int(time.time() // 60)
    await own_venue.admin.reset_stats()
    started = time.monotonic()
    loops_before = total(await metrics(run), "strategy_loops_total")
    # Counted over loops, not seconds: a busy machine runs fewer loops in a given time.
    await assert_eventually(lambda: _loops_at_least(run, 20), timeout=START_S)
    stats = await own_venue.admin.stats()
    loops = total(await metrics(run), "strategy_loops_total") - loops_before
    elapsed = time.monotonic() - started
    same_window = int(time.time() // 60) == minute

    calls = stats.requests_by_endpoint
    # Nothing but these: one mark-price request for every symbol, open orders per symbol,
    # positions now and then, and what it does per order (place, cancel, look up a fill).
    reads = {"GET /fapi/v1/premiumIndex", "GET /fapi/v1/openOrders", "GET /fapi/v3/positionRisk"}
    per_order = {"POST /fapi/v1/order", "DELETE /fapi/v1/order", "GET /fapi/v1/order"}
    assert set(calls) <= reads | per_order, calls
    assert calls.get("GET /fapi/v1/premiumIndex", 0) <= loops + 1
    assert calls.get("GET /fapi/v1/openOrders", 0) <= 2 * (loops + 1)
    # positionRisk at most every positions_refresh_s of the strategy's clock, however slow.
    assert calls.get("GET /fapi/v3/positionRisk", 0) <= elapsed / run.config.positions_refresh_s + 1
    assert calls.get("GET /fapi/v1/order", 0) <= calls.get("POST /fapi/v1/order", 0) + 2
    weight = 0
    for endpoint, count in calls.items():
        method, path = endpoint.split(" ", 1)
        weight += count * weight_of(method, path, has_symbol=True)[1]
    if same_window:  # every symbol-dependent request carried its symbol
        assert stats.used_weight["127.0.0.1 fapi"] == weight, (stats.used_weight, calls)
    assert loops >= 15
    # Reading costs at most 3 per loop (it was 10: 1,200 a minute) plus positions every
    # positions_refresh_s. What orders cost per loop is not bounded here: it follows how far the
    # price moved in a loop, and a busy machine runs fewer, longer loops (8.6 a loop was seen).
    read_weight = sum(
        count * weight_of(*endpoint.split(" ", 1), has_symbol=True)[1]
        for endpoint, count in calls.items()
        if endpoint in reads - {"GET /fapi/v3/positionRisk"}
    )
    assert read_weight <= 3 * (loops + 1), (read_weight, loops, calls)
    print(f"weight {weight} in {loops:g} loops ({weight / loops:.1f} a loop) over {elapsed:.1f}s")
    _, body = await get_json(run.base_url + "/healthz")
    assert body["feed_fresh"] and body["healthy"]


async def test_rate_limited_it_waits_instead_of_getting_the_ip_banned(
    own_venue: OwnVenue,
) -> None:
    """The weight budget is the IP's, shared with the kill switch: after a 429 the strategy sends
    nothing until the window turns, so the venue never bans the IP (418)."""
    await own_venue.admin.set_limits(Limits(fapi_weight_limit=40, ban_after=5, ban_s=120))
    await own_venue.admin.reset_stats()
    run = await own_venue.launch(loop_interval_s=0.2)

    async def limited() -> None:
        assert (await own_venue.admin.stats()).count_429 >= 1

    await assert_eventually(limited, timeout=START_S)
    # Then 15 more loops (3 s when the machine is idle): it keeps quiet, it is never banned.
    await assert_eventually(lambda: _loops_at_least(run, 15), timeout=START_S)
    stats = await own_venue.admin.stats()
    assert stats.count_418 == 0, stats
    assert stats.count_429 <= 5, stats
    assert "rate-limited by the venue" in run.log()
    assert run.proc.poll() is None
