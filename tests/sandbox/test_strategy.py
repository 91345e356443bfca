"""The sample strategy as a real process on the sandbox: trading, states, faulty releases."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandbox.admin_client import SandboxAdmin
from sandbox.admin_models import AccountState, PositionSet
from sandbox.strategy.config import Fault, StrategyConfig
from sandbox.strategy.releases import ReleaseConflict, build_release
from sandbox.strategy.state import (
    TradingState,
    get_trading_state,
    set_trading_state,
    state_history,
)
from tests.fixtures.sandbox import REPO, NewAccount, SandboxHandle, TestAccount
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


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(2)) as r:
        return r.status, await r.json()


async def metrics(run: Running) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser, keyed by name+labels."""
    async with aiohttp.ClientSession() as s, s.get(run.base_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


@pytest.fixture
def launch(sandbox: SandboxHandle, new_account: NewAccount, tmp_path: Path) -> Iterator[Launch]:
    """``await launch(fault=..., **config)``: build a release and run it until the test ends."""
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

            await assert_eventually(healthy, timeout=15)
        return run

    yield start
    for proc in procs:
        stop_process(proc)


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

    await assert_eventually(quoting, timeout=10)
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
    await assert_eventually(lambda: _has_open_orders(sandbox_admin, run), timeout=10)

    change = set_trading_state(run.config.db, TradingState.HALTED, "test", "halt drill")
    assert change.changed
    halted_at = time.monotonic()

    async def nothing_rests() -> None:
        state = await sandbox_admin.state(run.account.api_key)
        assert state.open_orders == []

    # One loop to read the state and cancel (plus the request round trips).
    await assert_eventually(nothing_rests, timeout=3, interval=0.05)
    assert time.monotonic() - halted_at < 2 * run.config.loop_interval_s + 1.0
    count = len(ours(await sandbox_admin.state(run.account.api_key), run))
    await assert_eventually(
        lambda: _loops_at_least(run, 3), timeout=5
    )  # three more loops: still nothing new
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

    await assert_eventually(reducing, timeout=5)
    await assert_eventually(lambda: _loops_at_least(run, 3), timeout=5)
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

    await assert_eventually(storming, timeout=10)
    stats = await sandbox_admin.stats()
    assert stats.requests_by_status.get("400", 0) >= 6
    assert ours(await sandbox_admin.state(storm.account.api_key), storm) == []

    async def oversized() -> None:
        state = await sandbox_admin.state(big.account.api_key)
        prices = (await sandbox_admin.prices()).prices
        cap = big.config.max_position_notional
        assert any(o.qty * prices[o.symbol] > 10 * cap for o in state.open_orders)

    await assert_eventually(oversized, timeout=10)

    async def slow_orders() -> None:
        samples = await metrics(slow)
        count = samples["strategy_order_latency_seconds_count{}"]
        fast = samples["strategy_order_latency_seconds_bucket{le=0.5}"]
        assert count >= 2 and fast == 0

    await assert_eventually(slow_orders, timeout=10)

    assert crash.proc.wait(timeout=10) == 3
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
        await assert_eventually(lambda: _has_open_orders(sandbox_admin, run), timeout=10)
        assert set_trading_state(dsn, TradingState.HALTED, "test", "pg halt").changed
        assert not set_trading_state(dsn, TradingState.HALTED, "test", "again").changed

        async def halted() -> None:
            _, body = await get_json(run.base_url + "/healthz")
            assert body["trading_state"] == "HALTED"
            assert (await sandbox_admin.state(run.account.api_key)).open_orders == []

        await assert_eventually(halted, timeout=5)
        with psycopg.connect(dsn) as conn:
            orders = conn.execute("SELECT count(*) FROM orders WHERE order_id IS NOT NULL")
            row = orders.fetchone()
            assert row is not None and row[0] >= 2
        stop_process(run.proc)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
